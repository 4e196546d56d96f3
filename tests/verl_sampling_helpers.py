"""What verl's V1 trainer needs besides its own code, faked for CPU tests: the TransferQueue
key-value store (a service) and the agent-loop manager (vLLM rollouts and the reward loop, here
draws at a known pass rate per prompt). The trainer, its replay buffer, its dataset (RLHFDataset
over a small parquet file), data loader and advantage step are verl's own.

A trajectory is stored as verl's AgentLoopWorkerTQ stores it: key `{uid}_{session_id}_{index}`, the
agent loop's output fields plus the prompt's fields (`uid`, `index`, ...), `rm_scores` with the
score on the last response token and the `compute_score` dict's extra keys in
`extra_fields["reward_extra_info"]`; the prompt's key `uid` is tagged pending, then finished.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict

PASS_RATES = (0.0, 0.03, 0.25, 0.5, 0.75, 1.0)  # a prompt's true pass rate: PASS_RATES[index % 6]


def true_pass_rate(index: int) -> float:
    return PASS_RATES[index % len(PASS_RATES)]


def write_prompts(path, size: int, seed: int = 0, index_offset: int = 1000, duplicate_index: bool = False) -> str:
    """A parquet file as verl's data preprocessing scripts write it; row r has the stable index
    `extra_info.index` = index_offset + permutation[r] (not the row)."""
    import datasets

    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    indices = [index_offset + p for p in perm]
    if duplicate_index:
        indices[1] = indices[0]
    rows = [
        {"data_source": "tiny", "prompt": [{"role": "user", "content": f"question {i}"}], "extra_info": {"index": i}}
        for i in indices
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


class FakeTransferQueue:
    """transfer_queue's kv interface (kv_list, kv_batch_get, kv_batch_put, kv_put, kv_clear) in memory."""

    def __init__(self):
        self.tags: dict[str, dict[str, dict]] = defaultdict(dict)
        self.values: dict[str, dict[str, dict]] = defaultdict(dict)
        self.on_poll: list = []  # called at each kv_list, before it answers (rollouts finishing meanwhile)

    def install(self, monkeypatch):
        import transfer_queue

        for name in ("kv_list", "kv_batch_get", "kv_batch_put", "kv_put", "kv_clear"):
            monkeypatch.setattr(transfer_queue, name, getattr(self, name), raising=False)

    def kv_list(self, partition_id=None):
        for hook in self.on_poll:
            hook()
        parts = [partition_id] if partition_id is not None else list(self.tags)
        return {p: {k: dict(t) for k, t in self.tags[p].items()} for p in parts}

    def kv_put(self, key, partition_id, tag=None, fields=None):
        self.tags[partition_id].setdefault(key, {}).update(tag or {})

    def kv_batch_put(self, keys, partition_id, tags=None, fields=None):
        from transfer_queue import KVBatchMeta

        for i, key in enumerate(keys):
            self.tags[partition_id].setdefault(key, {}).update(tags[i] if tags else {})
        if fields is not None:
            for name in fields.keys():
                column = fields[name]
                if isinstance(column, torch.Tensor):
                    rows = column.unbind(0)
                else:
                    rows = [getattr(v, "data", v) for v in column]
                for key, value in zip(keys, rows, strict=True):
                    self.values[partition_id].setdefault(key, {})[name] = value
        return KVBatchMeta(partition_id=partition_id, keys=list(keys), tags=[self.tags[partition_id][k] for k in keys])

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        rows = [self.values[partition_id][k] for k in keys]
        names = [n for n in (select_fields or rows[0].keys()) if all(n in r for r in rows)]
        return list_of_dict_to_tensordict([{n: r[n] for n in names} for r in rows])

    def kv_clear(self, keys, partition_id):
        for key in keys:
            self.tags[partition_id].pop(key, None)
            self.values[partition_id].pop(key, None)


class FakeAgentLoopManager:
    """`generate_sequences(batch)` of verl's AgentLoopManagerTQ, finished at once: n sessions per
    prompt, success ~ Bernoulli(true_pass_rate(index)), shaped score = success + 0.3 * format."""

    def __init__(self, tq: FakeTransferQueue, n: int, seed: int = 0, pass_rate=true_pass_rate):
        self.tq, self.n, self.pass_rate = tq, n, pass_rate
        self.gen = torch.Generator().manual_seed(seed)
        self.generated: list[dict] = []  # per prompt: uid, index, acc, score
        self.deferred: list[tuple[str, int]] | None = None  # a list: prompts finish at the next poll
        self.max_in_flight = 0

    def defer(self):
        """Rollouts stay pending until the replay buffer's next poll of the store."""
        self.deferred = []
        self.tq.on_poll.append(self.finish_deferred)

    def finish_deferred(self):
        pending, self.deferred = self.deferred, []
        self._finish(pending)

    def generate_sequences(self, batch):
        uids = [getattr(u, "data", u) for u in batch["uid"]]
        indices = [int(getattr(i, "data", i)) for i in batch["index"]]
        if self.deferred is None:
            self._finish(list(zip(uids, indices, strict=True)))
        else:
            self.deferred += zip(uids, indices, strict=True)
            self.max_in_flight = max(self.max_in_flight, len(self.deferred))

    def _finish(self, prompts):
        for uid, index in prompts:
            acc = (torch.rand(self.n, generator=self.gen) < self.pass_rate(index)).double()
            fmt = (torch.rand(self.n, generator=self.gen) < 0.5).double()
            score = acc + 0.3 * fmt
            keys, fields, tags = [], [], []
            for s in range(self.n):
                length = int(torch.randint(2, 6, (1,), generator=self.gen))
                rm_scores = torch.zeros(length)
                rm_scores[-1] = float(score[s])
                keys.append(f"{uid}_{s}_0")
                fields.append({
                    "prompts": torch.tensor([1, 2, 3]), "responses": torch.arange(length) + 10,
                    "response_mask": torch.ones(length, dtype=torch.int64), "rm_scores": rm_scores,
                    "extra_fields": {"reward_extra_info": {"acc": float(acc[s])}},
                    "uid": uid, "index": index, "data_source": "tiny",
                })  # fmt: skip
                tags.append({"status": "success", "global_steps": 1})
            from verl.utils.tensordict_utils import list_of_dict_to_tensordict

            self.tq.kv_batch_put(keys, "train", tags=tags, fields=list_of_dict_to_tensordict(fields))
            self.tq.kv_put(uid, "train", tag={"status": "finished"})
            self.generated.append({"uid": uid, "index": index, "acc": acc.numpy(), "score": score.numpy()})


def trainer_config(tmp_path, *, n=8, train_batch_size=6, size=48, duplicate_index=False, **overrides):
    """verl's full default PPO config (its generated yaml) over a parquet file of `size` prompts
    read by verl's RLHFDataset (no length filter, so no tokenizer), no shuffle, and `overrides`
    as dotted keys."""
    import verl

    path = os.path.join(os.path.dirname(verl.__file__), "trainer/config/_generated_ppo_trainer.yaml")
    cfg = OmegaConf.load(path)
    data = write_prompts(
        tmp_path / f"prompts_{size}_{int(duplicate_index)}.parquet", size, duplicate_index=duplicate_index
    )
    with open_dict(cfg):
        cfg.data.train_files = cfg.data.val_files = data
        cfg.data.filter_overlong_prompts = False
        cfg.data.train_batch_size = train_batch_size
        cfg.data.dataloader_num_workers = 0
        cfg.data.shuffle = False
        cfg.actor_rollout_ref.rollout.n = n
        cfg.algorithm.adv_estimator = "grpo"
        cfg.trainer.default_local_dir = str(tmp_path / "ckpt")
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def band_buffer_config(tmp_path, **overrides):
    return trainer_config(
        tmp_path,
        **{
            "trainer.v1.sampler.custom_sampler.path": "pkg://bandadv.integrations.verl_sampling",
            "trainer.v1.sampler.custom_sampler.name": "BandReplayBuffer",
            "algorithm.filter_groups.enable": True,
            **overrides,
        },
    )


def make_trainer(cfg, tq: FakeTransferQueue, seed: int = 0):
    """verl's trainer class for cfg.trainer.v1.trainer_mode, built by verl (replay buffer
    included) and with verl's data loaders; only the tokenizer is absent (the dataset needs none)."""
    from verl.trainer.ppo.v1 import get_trainer_cls

    trainer = get_trainer_cls(cfg.trainer.v1.trainer_mode)(cfg)
    trainer.tokenizer = trainer.processor = None
    trainer._init_dataloader()
    trainer.agent_loop_manager = FakeAgentLoopManager(tq, cfg.actor_rollout_ref.rollout.n, seed)
    trainer.global_steps = 1
    return trainer


def run_step(trainer, tq: FakeTransferQueue):
    """One step of verl's `PPOTrainer.fit`/`step` up to what needs GPUs: submit a train batch
    (`prepare_step`), sample from the replay buffer, compute advantages (verl's
    `_compute_advantage`, through the transfer queue), clear the batch. Returns (batch, metrics)."""
    metrics = dict(trainer.prepare_step() or {})
    batch, sample_metrics = trainer.replay_buffer.sample(
        global_steps=trainer.global_steps, partition_id="train", batch_size=trainer.config.data.train_batch_size
    )
    metrics.update(sample_metrics)
    trainer._compute_advantage(batch, metrics)
    advantages = tq.kv_batch_get(batch.keys, "train", select_fields=["advantages"])["advantages"]
    tq.kv_clear(keys=batch.keys, partition_id=batch.partition_id)
    trainer.global_steps += 1
    return batch, metrics, advantages


def groups_of(keys) -> dict[str, list[str]]:
    out = defaultdict(list)
    for key in keys:
        out[key.rsplit("_", 2)[0]].append(key)
    return dict(out)


def acc_by_uid(manager: FakeAgentLoopManager) -> dict[str, np.ndarray]:
    return {g["uid"]: g["acc"] for g in manager.generated}
