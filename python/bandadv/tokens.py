"""`python -m bandadv simulate --testbed tokens`: a small transformer trained by GRPO on token traces.

A prompt is a 3-digit string and k = 1..K operations (padded to K with a no-op slot); the answer
is the final string's first digit mod M. The policy may reason, writing every
intermediate string then "= a", or guess, writing "= a" at once (right with probability 1/M).
A supervised warm-up on mostly short traces (k <= 3, a few longer) with a few percent direct answers sets its starting
skills and its shortcut tendency; GRPO on `group_advantages` then trains it on a dataset whose
difficulty mix holds many too-easy and too-hard prompts. Rewards: outcome only (the answer), or
process-verified (the answer and every written intermediate string).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from .advantages import group_advantages
from .band import BandController
from .tracker import PromptTracker

# -- tasks ------------------------------------------------------------------------------------
OPS = "RLIS"  # reverse, rotate left, increment every digit mod 10, swap the first two
NOOP, BAR, SEMI, EQ, EOS, PAD = range(14, 20)
VOCAB = [*"0123456789", *OPS, ".", "|", ";", "=", "$", "_"]
WIDTH = 3  # digits of the string
VERSION = 1  # of the task and policy code, part of the warm-up cache key


@dataclass(frozen=True)
class TokenConfig:
    max_ops: int = 6  # K: difficulty k = 1..K operations
    modulus: int = 5  # M: a guess is right with probability 1/M
    # difficulty mix of the RL dataset, weight per k = 1..K: many too-easy and too-hard prompts
    mix: tuple[float, ...] = (0.3, 0.15, 0.1, 0.1, 0.1, 0.25)
    num_prompts: int = 2000
    # warm-up mix, weight per k: mostly short traces, a few long ones (so long traces start rare)
    warmup_mix: tuple[float, ...] = (1.0, 1.0, 1.0, 0.06, 0.03, 0.015)
    warmup_direct: float = 0.03  # share of warm-up examples answered directly (the shortcut)
    warmup_steps: int = 600
    warmup_batch: int = 128
    warmup_lr: float = 3e-3
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    group_size: int = 8
    prompts_per_step: int = 32
    candidates_per_step: int = 128  # pool the tracker selects from
    steps: int = 150  # budget = steps * prompts_per_step * group_size rollouts, for every method
    lr: float = 1e-4  # Adam; 1e-3 undoes the warm-up within a few dozen steps
    temperature: float = 1.0
    eval_every: int = 10
    eval_per_k: int = 48
    final_eval_per_k: int = 200
    target_accuracy: float = 0.2  # solved (process-verified) accuracy averaged over k = 4..K (warm-up: 0.12)
    seed: int = 0

    @property
    def prompt_len(self) -> int:
        return WIDTH + self.max_ops + 1

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.max_ops * (WIDTH + 1) + 3


def apply_op(state: list[int], op: str) -> list[int]:
    if op == "R":
        return state[::-1]
    if op == "L":
        return state[1:] + state[:1]
    if op == "I":
        return [(d + 1) % 10 for d in state]
    if op == "S":
        return [state[1], state[0], *state[2:]]
    raise ValueError(f"unknown op {op!r}")


@dataclass(frozen=True)
class Task:
    start: tuple[int, ...]
    ops: str
    modulus: int

    @property
    def k(self) -> int:
        return len(self.ops)

    def states(self) -> list[list[int]]:
        state, out = list(self.start), []
        for op in self.ops:
            state = apply_op(state, op)
            out.append(state)
        return out

    @property
    def answer(self) -> int:
        return self.states()[-1][0] % self.modulus

    def prompt(self, max_ops: int) -> list[int]:
        if not 1 <= self.k <= max_ops:
            raise ValueError(f"a task needs 1..{max_ops} ops, got {self.k}")
        return [*self.start, *(10 + OPS.index(o) for o in self.ops), *[NOOP] * (max_ops - self.k), BAR]

    def trace(self, direct: bool = False) -> list[int]:
        """The completion a solver writes: every intermediate string, then "= a" (or only "= a")."""
        lines = [] if direct else [t for s in self.states() for t in (*s, SEMI)]
        return [*lines, EQ, self.answer, EOS]


def random_task(k: int, modulus: int, gen: torch.Generator) -> Task:
    start = torch.randint(0, 10, (WIDTH,), generator=gen).tolist()
    ops = "".join(OPS[i] for i in torch.randint(0, len(OPS), (k,), generator=gen).tolist())
    return Task(tuple(start), ops, modulus)


def parse(completion: list[int]) -> tuple[list[list[int]] | None, int | None, bool]:
    """(written lines, answer, guessed) of a completion; lines None when malformed."""
    tokens = completion[: completion.index(EOS)] if EOS in completion else completion
    if EQ not in tokens:
        return None, None, False
    cut = tokens.index(EQ)
    tail = tokens[cut + 1 :]
    answer = tail[0] if len(tail) == 1 and tail[0] < 10 else None
    body = tokens[:cut]
    lines: list[list[int]] | None = []
    for start in range(0, len(body), WIDTH + 1):
        line = body[start : start + WIDTH + 1]
        if len(line) != WIDTH + 1 or line[-1] != SEMI or any(t >= 10 for t in line[:-1]):
            lines = None
            break
        lines.append(line[:-1])
    return lines, answer, cut == 0


def rewards(task: Task, completion: list[int]) -> tuple[float, float, bool]:
    """(outcome reward, process-verified reward, guessed): outcome needs the right answer after
    "="; process also needs exactly the right intermediate strings before it."""
    lines, answer, guessed = parse(completion)
    outcome = float(answer is not None and answer == task.answer)
    process = float(outcome == 1.0 and lines == task.states())
    return outcome, process, guessed


# -- policy -----------------------------------------------------------------------------------
def _sinusoid(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(100.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    out = torch.zeros(n, d)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return out


class Policy(torch.nn.Module):
    """A decoder-only transformer. Every completion token is placed by its line (a fixed
    sinusoid, shared with the prompt's op slots so that line j can find op j) and its column in
    the line, not by its absolute position, so a trace longer than the warm-up's reads alike."""

    def __init__(self, cfg: TokenConfig) -> None:
        super().__init__()
        d, self.cfg = cfg.d_model, cfg
        self.tok = torch.nn.Embedding(len(VOCAB), d)
        self.pos = torch.nn.Embedding(cfg.prompt_len + 1, d)
        self.col = torch.nn.Embedding(WIDTH + 2, d)
        self.register_buffer("line", _sinusoid(cfg.max_ops + 2, d), persistent=False)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                dict(
                    ln1=torch.nn.LayerNorm(d),
                    qkv=torch.nn.Linear(d, 3 * d),
                    proj=torch.nn.Linear(d, d),
                    ln2=torch.nn.LayerNorm(d),
                    up=torch.nn.Linear(d, 4 * d),
                    down=torch.nn.Linear(4 * d, d),
                )
            )
            for _ in range(cfg.layers)
        )
        self.ln = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, len(VOCAB))

    def places(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position, column, line) ids of every token of full sequences [B, T]."""
        b, t = tokens.shape
        p, k = self.cfg.prompt_len, self.cfg.max_ops
        idx = torch.arange(t)
        pos = idx.clamp(max=p).expand(b, t)
        semi = (tokens == SEMI) & (idx >= p)
        before = torch.cumsum(semi, 1) - semi.long()  # separators strictly before each token
        last = torch.where(semi, idx, torch.full_like(idx, p - 1)).cummax(1).values
        last_before = torch.cat([torch.full((b, 1), p - 1), last[:, :-1]], 1)
        col = (idx - last_before - 1).clamp(0, WIDTH)
        line = (1 + before).clamp(max=k + 1)
        prompt_col = torch.full((t,), WIDTH + 1)
        prompt_line = torch.zeros(t, dtype=torch.long)
        slots = (idx >= WIDTH) & (idx < WIDTH + k)
        prompt_line[slots] = idx[slots] - WIDTH + 1  # op slot j carries line j
        in_prompt = idx < p
        col = torch.where(in_prompt, prompt_col, col)
        line = torch.where(in_prompt, prompt_line, line)
        return pos, col, line

    def embed(self, tokens, pos, col, line) -> torch.Tensor:
        return self.tok(tokens) + self.pos(pos) + self.col(col) + self.line[line]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of full sequences."""
        x = self.embed(tokens, *self.places(tokens))
        for blk in self.blocks:
            x = x + self._attend(blk, x, None, 0)
            x = x + blk.down(F.gelu(blk.up(blk.ln2(x))))
        return self.head(self.ln(x))

    def _attend(self, blk, x, cache, at: int) -> torch.Tensor:
        b, t, d = x.shape
        h = self.cfg.heads
        q, k, v = blk.qkv(blk.ln1(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            cache[0][:, :, at : at + t], cache[1][:, :, at : at + t] = k, v
            keys, values = cache[0][:, :, : at + t], cache[1][:, :, : at + t]
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1)
        return blk.proj(y.transpose(1, 2).reshape(b, t, d))

    def _step(self, x, caches, at: int) -> torch.Tensor:
        for blk, cache in zip(self.blocks, caches, strict=True):
            x = x + self._attend(blk, x, cache, at)
            x = x + blk.down(F.gelu(blk.up(blk.ln2(x))))
        return self.head(self.ln(x[:, -1]))

    @torch.inference_mode()
    def generate(self, prompts: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
        """Samples completions of equal-length prompts [B, P] with a KV cache: [B, T - P], PAD
        after the first EOS."""
        cfg = self.cfg
        b, p = prompts.shape
        d, h = cfg.d_model, cfg.heads
        caches = [[torch.zeros(b, h, cfg.max_len, d // h) for _ in range(2)] for _ in self.blocks]
        pos, col, line = self.places(prompts)
        logits = self._step(self.embed(prompts, pos, col, line), caches, 0)
        out = torch.full((b, cfg.max_len - p), PAD, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        col_now = torch.zeros(b, dtype=torch.long)
        line_now = torch.ones(b, dtype=torch.long)
        for i in range(cfg.max_len - p):
            probs = torch.softmax(logits.float() / temperature, -1)
            token = torch.multinomial(probs, 1, generator=gen)[:, 0]
            token = torch.where(done, PAD, token)
            out[:, i] = token
            done |= token == EOS
            if bool(done.all()) or i + 1 == cfg.max_len - p:
                break
            place = (
                torch.full((b,), p),
                col_now.clamp(max=WIDTH),
                line_now.clamp(max=cfg.max_ops + 1),
            )
            # the place of the token just sampled, as places() gives it in a full sequence
            x = self.embed(token[:, None], *(v[:, None] for v in place))
            logits = self._step(x, caches, p + i)
            sep = token == SEMI
            line_now = torch.where(sep, line_now + 1, line_now)
            col_now = torch.where(sep, 0, col_now + 1)
        return out

    def completion_logp(
        self, prompts: torch.Tensor, completions: torch.Tensor, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability of each completion token under the sampling distribution [B, T - P],
        mask of real tokens: up to and including EOS)."""
        seq = torch.cat([prompts, completions], 1)
        logits = self(seq[:, :-1])[:, prompts.shape[1] - 1 :]
        logp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, completions[..., None])[..., 0]
        mask = completions != PAD
        return logp, mask


# -- warm-up ----------------------------------------------------------------------------------
def warmup_batch(cfg: TokenConfig, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n supervised examples (tokens [n, max_len], loss mask on the completion): k drawn from
    warmup_mix, a share warmup_direct answered at once."""
    ks = (torch.multinomial(torch.tensor(cfg.warmup_mix), n, replacement=True, generator=gen) + 1).tolist()
    direct = (torch.rand(n, generator=gen) < cfg.warmup_direct).tolist()
    seqs = torch.full((n, cfg.max_len), PAD, dtype=torch.long)
    mask = torch.zeros(n, cfg.max_len, dtype=torch.bool)
    for i, (k, d) in enumerate(zip(ks, direct, strict=True)):
        task = random_task(k, cfg.modulus, gen)
        row = task.prompt(cfg.max_ops) + task.trace(direct=d)
        seqs[i, : len(row)] = torch.tensor(row)
        mask[i, cfg.prompt_len : len(row)] = True
    return seqs, mask


def warmup(cfg: TokenConfig, log=None) -> Policy:
    """A fresh policy (seeded by cfg.seed) trained by teacher forcing on short traces."""
    torch.manual_seed(cfg.seed)
    policy = Policy(cfg)
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.warmup_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.warmup_lr, total_steps=max(cfg.warmup_steps, 1))
    for step in range(cfg.warmup_steps):
        seqs, mask = warmup_batch(cfg, cfg.warmup_batch, gen)
        logits = policy(seqs[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), seqs[:, 1:].flatten(), reduction="none")
        loss = (loss * mask[:, 1:].flatten()).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step + 1) % 100 == 0:
            log(f"warm-up step {step + 1}/{cfg.warmup_steps}: loss {loss.item():.3f}")
    return policy


def warm_policy(cfg: TokenConfig, log=None) -> Policy:
    """The warm-up checkpoint of cfg.seed, trained once and cached in a temp file that every
    method (and every process of --compare) reloads."""
    keys = ("max_ops", "modulus", "warmup_mix", "warmup_direct", "warmup_steps", "warmup_batch", "warmup_lr")
    keys += ("d_model", "layers", "heads", "seed")
    tag = hashlib.sha1(repr((VERSION, *(getattr(cfg, k) for k in keys))).encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"bandadv_tokens_warmup_{tag}.pt")
    policy = Policy(cfg)
    if os.path.exists(path):
        policy.load_state_dict(torch.load(path))
        return policy
    policy = warmup(cfg, log)
    tmp = f"{path}.{os.getpid()}"
    torch.save(policy.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: processes sharing the cache never read half a file
    return policy


# -- GRPO -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    options: dict = field(default_factory=dict)
    tracker: str | None = None  # PromptTracker model: its prior feeds the accidental-success rule
    select: str | None = None  # tracker.select strategy before rollouts
    dynamic: bool = False  # DAPO dynamic sampling: screen groups, refill, screening rollouts counted
    band_controller: bool = False


BAND = (0.2, 0.8)  # with 8 rollouts a group: keeps 2..6 successes
ACCIDENTAL = dict(band=BAND, accidental_max_successes=2)
METHODS = (
    Method("grpo", dict(mask_all_equal=False, mask_too_few=False)),
    Method("all-equal filter (DAPO)", dict(), dynamic=True),
    Method("band", dict(band=BAND)),
    Method("band+accidental", ACCIDENTAL),
    Method("band+accidental+prior", ACCIDENTAL, tracker="beta"),
    Method("tracker-beta", ACCIDENTAL, tracker="beta", select="thompson"),
    Method("tracker-logistic", ACCIDENTAL, tracker="logistic", select="thompson"),
    Method("tracker-features", ACCIDENTAL, tracker="features", select="thompson"),
    Method("learnability", ACCIDENTAL, tracker="beta", select="learnability"),
)
MAIN = Method(
    "tracker-beta + band controller",
    dict(accidental_max_successes=2),
    tracker="beta",
    select="thompson",
    band_controller=True,
)
REWARDS = ("outcome", "process")


@dataclass
class History:
    step_rollouts: list = field(default_factory=list)
    kept_fraction: list = field(default_factory=list)
    zero_variance: list = field(default_factory=list)  # share of all groups rolled out (screening too)
    guess_rate: list = field(default_factory=list)  # of the step's rollouts
    band: list = field(default_factory=list)
    eval_rollouts: list = field(default_factory=list)  # rollouts spent when each eval ran
    eval_solved: list = field(default_factory=list)  # [k] process-verified accuracy per eval
    eval_outcome: list = field(default_factory=list)  # [k] right answers per eval
    eval_guess: list = field(default_factory=list)  # guess rate per eval
    final_solved: list = field(default_factory=list)
    final_outcome: list = field(default_factory=list)
    final_guess: float = 0.0
    seconds: float = 0.0


def make_dataset(cfg: TokenConfig) -> list[Task]:
    gen = torch.Generator().manual_seed(20_000 + cfg.seed)
    ks = torch.multinomial(torch.tensor(cfg.mix), cfg.num_prompts, replacement=True, generator=gen) + 1
    return [random_task(int(k), cfg.modulus, gen) for k in ks]


def evaluate(policy: Policy, cfg: TokenConfig, per_k: int, seed: int) -> tuple[list, list, float]:
    """(solved per k, right answer per k, guess rate): one sample each of per_k fixed tasks per k."""
    gen = torch.Generator().manual_seed(seed)
    tasks = [random_task(k, cfg.modulus, gen) for k in range(1, cfg.max_ops + 1) for _ in range(per_k)]
    scores = score(policy, cfg, tasks, gen)
    outcome, process, guessed = (s.view(cfg.max_ops, per_k) for s in scores)
    return process.mean(1).tolist(), outcome.mean(1).tolist(), float(guessed.float().mean())


def score(policy, cfg, tasks, gen, completions=None):
    prompts = torch.tensor([t.prompt(cfg.max_ops) for t in tasks])
    if completions is None:
        completions = policy.generate(prompts, cfg.temperature, gen)
    rows = [rewards(t, c) for t, c in zip(tasks, completions.tolist(), strict=True)]
    outcome, process, guessed = zip(*rows, strict=True)
    return torch.tensor(outcome, dtype=torch.float64), torch.tensor(process, dtype=torch.float64), torch.tensor(guessed)


def grpo_loss(policy, prompts, completions, advantages, sample_mask, temperature) -> torch.Tensor:
    """Policy gradient over the generated tokens only: -sum(A * log pi(token)) over the kept
    samples' tokens, divided by their number (token-mean, DAPO)."""
    logp, tokens = policy.completion_logp(prompts, completions, temperature)
    tokens = tokens & sample_mask[:, None]
    return -(advantages[:, None].float() * logp * tokens).sum() / tokens.sum().clamp(min=1)


def _tracker(method: Method, cfg: TokenConfig, dataset: list[Task]) -> PromptTracker | None:
    if method.tracker == "features":  # the prompt's structure: k one-hot and the count of each op
        ks = torch.tensor([t.k for t in dataset])
        counts = torch.tensor([[t.ops.count(o) for o in OPS] for t in dataset], dtype=torch.float64)
        x = torch.cat([F.one_hot(ks - 1, cfg.max_ops).to(torch.float64), counts], 1)
        return PromptTracker(len(dataset), "features", features=x)
    return PromptTracker(len(dataset), method.tracker) if method.tracker else None


def train(method: Method, reward: str, cfg: TokenConfig, progress=None) -> History:
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {list(REWARDS)}, got {reward!r}")
    start = time.time()
    policy = warm_policy(cfg)
    torch.manual_seed(cfg.seed)
    dataset = make_dataset(cfg)
    gen = torch.Generator().manual_seed(30_000 + cfg.seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    tracker = _tracker(method, cfg, dataset)
    controller = (
        BandController(band=(0.1, 0.9), target_kept=0.5, step=0.02, min_width=0.2) if method.band_controller else None
    )
    g, b = cfg.group_size, cfg.prompts_per_step
    budget = cfg.steps * b * g
    hist = History()
    rollouts, step = 0, 0

    def do_eval() -> None:
        solved, outcome, guessed = evaluate(policy, cfg, cfg.eval_per_k, 40_000 + cfg.seed)
        hist.eval_rollouts.append(rollouts)
        hist.eval_solved.append(solved)
        hist.eval_outcome.append(outcome)
        hist.eval_guess.append(guessed)

    do_eval()
    while rollouts < budget:
        ids_all, comp_all, rew_all, zero_var, guesses, rounds = [], [], [], [], [], 0
        while True:  # one round, or DAPO's screening rounds until b groups vary (at most 3)
            if method.select:
                pool = torch.randperm(len(dataset), generator=gen)[: cfg.candidates_per_step]
                ids = tracker.select(pool, b, method.select, gen, validate=False)
            else:
                ids = torch.randint(0, len(dataset), (b,), generator=gen)
            tasks = [dataset[i] for i in ids.repeat_interleave(g).tolist()]
            prompts = torch.tensor([t.prompt(cfg.max_ops) for t in tasks])
            completions = policy.generate(prompts, cfg.temperature, gen)
            outcome, process, guessed = score(policy, cfg, tasks, gen, completions)
            r = outcome if reward == "outcome" else process
            rollouts += r.numel()
            rounds += 1
            varies = r.view(b, g).std(1) > 0
            zero_var.append(~varies)
            guesses.append(guessed)
            keep = varies if method.dynamic else torch.ones(b, dtype=torch.bool)
            ids_all.append(ids[keep])
            comp_all.append(completions.view(b, g, -1)[keep])
            rew_all.append(r.view(b, g)[keep])
            if not method.dynamic or sum(len(i) for i in ids_all) >= b or rounds == 3 or rollouts >= budget:
                break
        ids = torch.cat(ids_all)[:b]
        hist.step_rollouts.append(rollouts)
        hist.zero_variance.append(float(torch.cat(zero_var).float().mean()))
        hist.guess_rate.append(float(torch.cat(guesses).float().mean()))
        step += 1
        if ids.numel() == 0:  # DAPO found no varying group: nothing to train on this step
            hist.kept_fraction.append(0.0)
            hist.band.append(tuple(method.options.get("band") or (0.0, 1.0)))
        else:
            kept, band = _grpo_step(
                policy, optimizer, cfg, method, dataset, ids, comp_all, rew_all, tracker, controller, step - 1
            )
            hist.kept_fraction.append(kept)
            hist.band.append(band)
        if step % cfg.eval_every == 0 or rollouts >= budget:
            do_eval()
        if progress is not None:
            progress(step, rollouts, budget, hist)
    solved, outcome, guessed = evaluate(policy, cfg, cfg.final_eval_per_k, 50_000 + cfg.seed)
    hist.final_solved, hist.final_outcome, hist.final_guess = solved, outcome, guessed
    hist.seconds = time.time() - start
    return hist


def _grpo_step(policy, optimizer, cfg, method, dataset, ids, comp_all, rew_all, tracker, controller, step):
    """One update on the kept groups, through the op, the tracker and the band controller as a
    trainer would use them; returns the kept fraction and the band used."""
    g, b = cfg.group_size, cfg.prompts_per_step
    completions = torch.cat(comp_all)[:b].flatten(0, 1)
    r = torch.cat(rew_all)[:b].flatten()
    prompts = torch.tensor([dataset[i].prompt(cfg.max_ops) for i in ids.repeat_interleave(g).tolist()])
    options = dict(method.options)
    if controller is not None:
        options["band"] = controller.band
    prior = tracker.prior(ids, validate=False) if tracker is not None else None
    out = group_advantages(r, g, prior=prior, **options)
    loss = grpo_loss(policy, prompts, completions, out.advantages, out.sample_mask, cfg.temperature)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if tracker is not None:
        tracker.update(ids, out, step, validate=False)
    kept = out.metrics()["kept_fraction"]
    if controller is not None:
        controller.update(kept)
    return kept, tuple(options.get("band") or (0.0, 1.0))


def rollouts_to_target(hist: History, target: float, hard_from: int = 4) -> float:
    """Rollouts spent when the solved accuracy averaged over k >= hard_from (or over the largest k
    alone, for K < hard_from) first reached target."""
    for used, solved in zip(hist.eval_rollouts, hist.eval_solved, strict=True):
        if statistics.mean(solved[min(hard_from, len(solved)) - 1 :]) >= target:
            return used
    return math.inf


# -- command line -----------------------------------------------------------------------------
def _bar(fraction: float, width: int = 24) -> str:
    done = int(fraction * width)
    return "[" + "#" * done + "." * (width - done) + "]"


def describe(cfg: TokenConfig) -> str:
    mix = ", ".join(f"k={k}: {w / sum(cfg.mix):.2f}" for k, w in enumerate(cfg.mix, 1))
    params = sum(p.numel() for p in Policy(cfg).parameters())
    return (
        f"tasks: a {WIDTH}-digit string, k = 1..{cfg.max_ops} ops from {OPS} (reverse, rotate left, increment, "
        f"swap first two), answer = final first digit mod {cfg.modulus} (a guess wins 1 in {cfg.modulus})\n"
        f"dataset: {cfg.num_prompts} prompts, difficulty mix {mix}\n"
        f"policy: {cfg.layers}-layer transformer, d={cfg.d_model}, {params:,} parameters, {cfg.max_len} tokens; "
        f"warm-up {cfg.warmup_steps} x {cfg.warmup_batch} traces (mix per k {cfg.warmup_mix}, "
        f"{cfg.warmup_direct:.0%} direct answers)\n"
        f"GRPO: {cfg.prompts_per_step} prompts x {cfg.group_size} rollouts per step, budget {cfg.steps} steps = "
        f"{cfg.steps * cfg.prompts_per_step * cfg.group_size:,} rollouts (screening counted), lr {cfg.lr}, "
        f"temperature {cfg.temperature}"
    )


def main(
    cfg: TokenConfig, method: Method = MAIN, reward: str = "outcome", png: str | None = "simulate_tokens.png"
) -> History:
    print(f"bandadv simulate --testbed tokens\n{describe(cfg)}\nmethod: {method.name}, {reward} reward\n")
    start = time.time()
    width = cfg.max_ops * 5

    def progress(step: int, rollouts: int, budget: int, h: History) -> None:
        solved = " ".join(f"{v:.2f}" for v in h.eval_solved[-1])
        line = (
            f"{step:>5} {_bar(rollouts / budget)} {rollouts:>7} {h.zero_variance[-1]:>5.2f} {h.kept_fraction[-1]:>5.2f} "
            f"{h.guess_rate[-1]:>6.3f} {f'({h.band[-1][0]:.2f}, {h.band[-1][1]:.2f})':>12} {solved:>{width}}"
        )
        if sys.stdout.isatty():
            print(line, end="\n" if step % cfg.eval_every == 0 else "\r", flush=True)
        elif step % cfg.eval_every == 0 or rollouts >= budget:
            print(line, flush=True)

    print(f"{'step':>5} {'':26} {'rollouts':>7} {'0-var':>5} {'kept':>5} {'guess':>6} {'band':>12} "
          f"{'solved per k (last eval)':>{width}}")  # fmt: skip
    hist = train(method, reward, cfg, progress)
    print(f"\n{time.time() - start:.1f} s")
    print("solved per k:        warm-up " + " ".join(f"{v:.2f}" for v in hist.eval_solved[0]))
    print("                     final   " + " ".join(f"{v:.2f}" for v in hist.final_solved))
    print("right answer per k:  final   " + " ".join(f"{v:.2f}" for v in hist.final_outcome))
    print(f"guess rate: peak {max(hist.eval_guess):.3f}, final {hist.final_guess:.3f}")
    if png:
        save_png([(f"{method.name}, {reward} reward", hist)], cfg, png)
    return hist


def save_png(runs: list[tuple[str, History]], cfg: TokenConfig, path: str) -> None:
    """One row per run: solved pass rate per k over training; kept fraction, zero-variance share
    and band edges; guess rate and right-answer rate of the hardest k."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return
    fig, axes = plt.subplots(len(runs), 3, figsize=(15, 3.8 * len(runs)), squeeze=False)
    for row, (title, h) in zip(axes, runs, strict=True):
        solved = torch.tensor(h.eval_solved)  # [evals, k]
        for k in range(cfg.max_ops):
            row[0].plot(h.eval_rollouts, solved[:, k], label=f"k={k + 1}")
        # the band's edges in pass-rate space: the k whose curve lies between them are teachable
        row[0].plot(h.step_rollouts, [b[0] for b in h.band], "k--", lw=0.8, label="band")
        row[0].plot(h.step_rollouts, [b[1] for b in h.band], "k--", lw=0.8)
        row[0].set(title="solved pass rate per k, and the band", xlabel="rollouts", ylim=(-0.02, 1.02))
        row[0].set_ylabel(title, fontsize=9)
        row[0].legend(fontsize=7, ncol=2)
        row[1].plot(h.step_rollouts, h.kept_fraction, lw=0.8, label="kept fraction of groups")
        row[1].plot(h.step_rollouts, h.zero_variance, lw=0.8, label="zero-variance groups")
        row[1].plot(h.step_rollouts, [b[0] for b in h.band], "k--", lw=0.8, label="band lo")
        row[1].plot(h.step_rollouts, [b[1] for b in h.band], "k-.", lw=0.8, label="band hi")
        row[1].set(title="masks and the band", xlabel="rollouts", ylim=(-0.02, 1.02))
        row[1].legend(fontsize=7)
        outcome = torch.tensor(h.eval_outcome)
        row[2].plot(h.eval_rollouts, h.eval_guess, label="guess rate (direct answers)")
        row[2].plot(h.eval_rollouts, outcome[:, -1], label=f"right answers, k={cfg.max_ops}")
        row[2].plot(h.eval_rollouts, solved[:, -1], label=f"solved, k={cfg.max_ops}")
        row[2].set(title="shortcuts", xlabel="rollouts", ylim=(-0.02, 1.02))
        row[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


# -- the comparison: one process per run, `jobs` at a time ----------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def _init_worker() -> None:
    torch.set_num_threads(1)


def _warm_job(cfg: TokenConfig) -> int:
    warm_policy(cfg)
    return cfg.seed


def _train_job(job: tuple[int, str, TokenConfig]) -> tuple[int, str, int, History]:
    index, reward, cfg = job
    method = (*METHODS, MAIN)[index]
    return index, reward, cfg.seed, train(method, reward, cfg)


def _stat(values: list[float], digits: int = 2) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "never"
    spread = statistics.pstdev(finite) if len(finite) > 1 else 0.0
    missing = f" ({len(values) - len(finite)} never)" if len(finite) < len(values) else ""
    if max(finite) >= 100:
        return f"{statistics.mean(finite) / 1000:.0f}k±{spread / 1000:.0f}k{missing}"
    return f"{statistics.mean(finite):.{digits}f}±{spread:.{digits}f}{missing}"


def _peak(values: list[float], window: int = 10) -> float:
    """Largest mean over `window` consecutive steps."""
    if len(values) < window:
        return statistics.mean(values) if values else 0.0
    return max(statistics.mean(values[i : i + window]) for i in range(len(values) - window + 1))


def table(results: dict, cfg: TokenConfig, seeds: int) -> list[str]:
    methods = [*METHODS, MAIN]
    keys = ["method", "reward", *(f"k={k}" for k in range(1, cfg.max_ops + 1)), "mean", "right answers"]
    keys += [f"rollouts to {cfg.target_accuracy:.2f} (k>=4)", "0-var", "0-var peak", "guess peak", "guess final"]
    rows = []
    for reward in REWARDS:
        for index, method in enumerate(methods):
            runs = [results[(index, reward, s)] for s in range(seeds) if (index, reward, s) in results]
            if not runs:
                continue
            row = [method.name, reward]
            row += [_stat([h.final_solved[k] for h in runs]) for k in range(cfg.max_ops)]
            row += [_stat([statistics.mean(h.final_solved) for h in runs], 3)]
            row += [_stat([statistics.mean(h.final_outcome) for h in runs], 3)]
            row += [_stat([rollouts_to_target(h, cfg.target_accuracy) for h in runs])]
            row += [_stat([statistics.mean(h.zero_variance) for h in runs])]
            row += [_stat([_peak(h.zero_variance) for h in runs])]
            row += [_stat([max(h.eval_guess) for h in runs], 3), _stat([h.final_guess for h in runs], 3)]
            rows.append(row)
    widths = [max(len(k), *(len(r[i]) for r in rows)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return lines


def _record(method: Method, reward: str, seed: int, hist: History) -> dict:
    def rounded(value):
        if isinstance(value, float):
            return round(value, 4)
        return [rounded(v) for v in value] if isinstance(value, (list, tuple)) else value

    return dict(method=method.name, reward=reward, seed=seed, **{k: rounded(v) for k, v in asdict(hist).items()})


def compare(cfg: TokenConfig, seeds: int = 3, jobs: int = 2, out: str | None = None, png: str | None = None) -> dict:
    """Every method under both rewards over `seeds` seeds at equal rollout budgets; prints the
    table (solved accuracy per k at the end, mean ± std over seeds) and writes it to `out`."""
    import multiprocessing

    start = time.time()
    methods = [*METHODS, MAIN]
    header = [
        f"bandadv simulate --testbed tokens --compare: {len(METHODS)} methods x {len(REWARDS)} rewards x {seeds} seeds "
        f"(and {MAIN.name} on seed {cfg.seed}, for the plot)",
        describe(cfg),
        f"machine: {_cpu_name()}, {os.cpu_count()} cores, {jobs} runs at a time, "
        f"torch {torch.__version__}, 1 thread each",
    ]
    print("\n".join(header) + "\n", flush=True)
    seed_cfgs = [replace(cfg, seed=cfg.seed + s) for s in range(seeds)]
    # the band-controller run, for the plot, on the first seed only
    todo = [
        (i, r, c)
        for c in seed_cfgs
        for r in REWARDS
        for i in range(len(methods))
        if i < len(METHODS) or c is seed_cfgs[0]
    ]
    results: dict = {}
    with multiprocessing.get_context("spawn").Pool(jobs, initializer=_init_worker) as pool:
        for seed in pool.imap_unordered(_warm_job, seed_cfgs):
            print(f"warm-up of seed {seed} ready ({time.time() - start:.0f} s)", flush=True)
        for done, (index, reward, seed, hist) in enumerate(pool.imap_unordered(_train_job, todo), 1):
            results[(index, reward, seed - cfg.seed)] = hist
            solved = " ".join(f"{v:.2f}" for v in hist.final_solved)
            print(f"[{done}/{len(todo)}] {methods[index].name}, {reward}, seed {seed}: solved per k {solved}, "
                  f"guess {hist.final_guess:.3f}, {hist.seconds:.0f} s ({time.time() - start:.0f} s)", flush=True)  # fmt: skip
    warm = [[results[(0, "process", s)].eval_solved[0][k] for s in range(seeds)] for k in range(cfg.max_ops)]
    lines = [
        *header,
        "warm-up solved accuracy per k (before GRPO, mean over seeds): "
        + " ".join(f"k={k + 1}: {statistics.mean(v):.2f}" for k, v in enumerate(warm)),
        f"final accuracy per k and mean: solved (process-verified); right answers: mean over k of the answer alone; on {cfg.final_eval_per_k} fresh tasks per k, one sample each at "
        f"temperature {cfg.temperature}; mean ± std over seeds. 0-var: share of rolled-out groups with zero variance "
        f"(mean over steps; peak: largest 10-step mean). Tracker rows and learnability use band {BAND} + accidental "
        "masks with the tracker's prior.",
        "",
        *table(results, cfg, seeds),
        "",
        f"wall time {time.time() - start:.0f} s",
    ]
    print("\n" + "\n".join(lines[len(header) :]), flush=True)
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
        curves = os.path.splitext(out)[0] + ".json"
        with open(curves, "w") as f:  # every run's curves, so that other summaries need no re-run
            json.dump([_record(methods[i], r, cfg.seed + s, h) for (i, r, s), h in sorted(results.items())], f)
        print(f"wrote {out} and {curves}")
    if png:
        index = len(methods) - 1
        save_png([(f"{MAIN.name}, {r} reward, seed {cfg.seed}", results[(index, r, 0)]) for r in REWARDS], cfg, png)
    return results
