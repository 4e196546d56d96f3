"""Per-prompt difficulty across training steps, and prompt selection before rollouts.

Two models behind one interface, both updated on the device where the state lives, with no
host sync in `update`:

- "beta": the Beta(alpha, beta) posterior of MoPPS (arXiv 2507.04632),
  alpha <- lam*alpha + (1-lam)*alpha0 + k, with the decay applied once per elapsed training step
  since the prompt was last seen (lam**dt toward the prior), not once per visit.
- "logistic": p = sigmoid(theta - d_i), the policy's ability theta and each prompt's difficulty
  d_i updated online from every group's k of n (Elo / item-response style, with per-prompt
  precision as in a Laplace approximation). theta moves every step, so predictions for prompts
  not seen for a while stay current.
- "features": p = sigmoid(theta - x_i.w - b_i), shared weights w over fixed per-prompt features
  x_i (a [num_prompts, d] tensor the user supplies) and a per-prompt residual b_i shrunk toward 0
  until the prompt itself is seen, so prompts seen rarely or never borrow strength from related
  ones (as DOTS, arXiv 2506.05316, predicts from prompt embeddings). theta moves as in
  "logistic"; then (w, b) take one joint Newton step per batch from a Gaussian (Laplace) posterior,
  w with a full d x d precision, b_i with its own precision as d_i in "logistic". See
  `features_from_texts` for building x.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from .types import GroupAdvantages

f64 = torch.float64
Model = Literal["beta", "logistic", "features"]
MODELS = ("beta", "logistic", "features")
STRATEGIES = ("thompson", "band", "learnability", "greso")


class PromptTracker:
    """Difficulty state for every prompt of a dataset.

    Args:
        num_prompts: dataset size; prompt ids are 0..num_prompts-1.
        model: "beta", "logistic" or "features".
        device: where the state lives (updates take tensors on this device).
        decay: lam, the per-step forgetting factor toward the prior (both models).
        prior: (alpha0, beta0) of the beta model.
        difficulty_prior_precision: precision of a prompt's difficulty before any data (logistic),
            or of its residual b_i (features).
        ability_step: damping of the ability update (logistic), in (0, 1].
        greso_target: GRESO's target share of zero-variance groups (arXiv 2506.02177).
        greso_step: how far the GRESO exploration rates move per update.
        features: ``[num_prompts, d]`` floating tensor on `device`, one fixed vector per prompt
            (model "features" only; it is read once here to check it is finite, and kept, not copied).
        feature_prior_precision: prior precision of each feature weight (features); None takes
            the mean of |x_i|^2 over prompts, so that x_i.w has prior variance 1 on average.
    """

    def __init__(
        self,
        num_prompts: int,
        model: Model = "beta",
        device: torch.device | str = "cpu",
        *,
        decay: float = 0.95,
        prior: tuple[float, float] = (1.0, 1.0),
        difficulty_prior_precision: float = 1.0,
        ability_step: float = 0.5,
        greso_target: float = 0.25,
        greso_step: float = 0.01,
        features: torch.Tensor | None = None,
        feature_prior_precision: float | None = None,
    ) -> None:
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
            raise ValueError(f"num_prompts must be an int >= 1, got {num_prompts!r}")
        if model not in MODELS:
            raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if len(prior) != 2 or min(prior) <= 0:
            raise ValueError(f"prior must be (alpha0, beta0) > 0, got {prior}")
        if difficulty_prior_precision <= 0 or not 0 < ability_step <= 1:
            raise ValueError("difficulty_prior_precision must be > 0 and ability_step in (0, 1]")
        self.num_prompts = num_prompts
        self.model = model
        self.device = torch.device(device)
        self.decay = float(decay)
        self.prior_alpha, self.prior_beta = (float(prior[0]), float(prior[1]))
        self.difficulty_prior_precision = float(difficulty_prior_precision)
        self.ability_step = float(ability_step)
        self.greso_target = float(greso_target)
        self.greso_step = float(greso_step)
        self.step = 0  # latest training step seen by update (host-side, for checks only)
        # One spare slot at the end absorbs the writes of duplicate ids (see _merge).
        size = num_prompts + 1
        self.state: dict[str, torch.Tensor] = {
            "last_step": torch.full((size,), -1, dtype=torch.int64, device=self.device),
            "visits": torch.zeros(size, dtype=torch.int64, device=self.device),
            "zero_var_streak": torch.zeros(size, dtype=torch.int64, device=self.device),
            "last_all_correct": torch.zeros(size, dtype=torch.bool, device=self.device),
            "greso_rates": torch.tensor([0.5, 0.5], dtype=f64, device=self.device),  # easy, hard
        }
        if model == "beta":
            self.state["alpha"] = torch.full((size,), self.prior_alpha, dtype=f64, device=self.device)
            self.state["beta"] = torch.full((size,), self.prior_beta, dtype=f64, device=self.device)
        else:
            self.state["difficulty"] = torch.zeros(size, dtype=f64, device=self.device)
            self.state["precision"] = torch.full(
                (size,), self.difficulty_prior_precision, dtype=f64, device=self.device
            )
            self.state["ability"] = torch.zeros((), dtype=f64, device=self.device)
        self.features_fingerprint = 0.0
        self.features = self._check_features(features)
        self.num_features = 0 if self.features is None else self.features.shape[1]
        self.feature_prior_precision = 0.0
        if self.features is not None:
            self.feature_prior_precision = self._check_feature_prior(feature_prior_precision)
            d = self.num_features
            self.state["weights"] = torch.zeros(d, dtype=f64, device=self.device)
            eye = torch.eye(d, dtype=f64, device=self.device)
            self.state["weight_precision"] = self.feature_prior_precision * eye
            self.state["weights_last_step"] = torch.full((), -1, dtype=torch.int64, device=self.device)
        elif feature_prior_precision is not None:
            raise ValueError(f"feature_prior_precision is for model='features' only, got model={model!r}")

    # -- checks ---------------------------------------------------------------------------
    def _check_features(self, features: torch.Tensor | None) -> torch.Tensor | None:
        if self.model != "features":
            if features is not None:
                raise ValueError(f"features are for model='features' only, got model={self.model!r}")
            return None
        if features is None:
            raise ValueError("model='features' needs features=X, a [num_prompts, d] floating tensor")
        if not isinstance(features, torch.Tensor):
            raise ValueError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() != 2 or features.shape[0] != self.num_prompts or features.shape[1] < 1:
            raise ValueError(
                f"features must have shape [num_prompts={self.num_prompts}, d >= 1], got {list(features.shape)}"
            )
        if not features.is_floating_point():
            raise ValueError(f"features must be a floating tensor, got {features.dtype}")
        if features.device != self.device:
            raise ValueError(f"features is on {features.device} but the tracker lives on {self.device}")
        # the one read of X: finite?, mean |x_i|^2 (the default weight prior), and a fingerprint
        # that ties a checkpoint to these features (row order included)
        rows = features.to(f64)
        finite, mean_square, fingerprint = torch.stack([
            torch.isfinite(rows).all().to(f64),
            (rows**2).sum(1).mean(),
            (rows.sum(1) * torch.arange(1, self.num_prompts + 1, dtype=f64, device=rows.device).sqrt()).sum(),
        ]).tolist()  # fmt: skip
        if not finite:
            raise ValueError("features must be finite (found NaN or Inf)")
        self._features_mean_square, self.features_fingerprint = mean_square, fingerprint
        return features

    def _check_feature_prior(self, precision: float | None) -> float:
        if precision is None:
            precision = self._features_mean_square
            return precision if precision > 0 else 1.0  # all-zero features: w is never moved anyway
        if not precision > 0 or not math.isfinite(precision):
            raise ValueError(f"feature_prior_precision must be > 0 and finite, got {precision}")
        return float(precision)

    def _ids(self, prompt_ids: torch.Tensor, name: str = "prompt_ids", validate: bool = True) -> torch.Tensor:
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor of prompt ids")
        if prompt_ids.is_floating_point() or prompt_ids.is_complex() or prompt_ids.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {prompt_ids.dtype}")
        if prompt_ids.device != self.device:
            raise ValueError(f"{name} is on {prompt_ids.device} but the tracker lives on {self.device}")
        if validate and prompt_ids.numel():
            lo, hi = torch.stack([prompt_ids.min(), prompt_ids.max()]).tolist()
            if lo < 0 or hi >= self.num_prompts:
                raise ValueError(f"{name} must lie in [0, {self.num_prompts}), got values in [{lo}, {hi}]")
        return prompt_ids.long()

    def _check_step(self, step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an int, got {step!r}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.step:
            raise ValueError(f"step {step} is earlier than the last update's step {self.step}")
        return step

    # -- update ---------------------------------------------------------------------------
    def _merge(self, ids: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sums values over duplicate ids deterministically (stable sort and cumsum, no atomics).
        Returns, per row, the id to write (the spare slot for all but each id's last row) and
        the per-id totals on those rows."""
        order = torch.argsort(ids, stable=True)
        ids = ids[order]
        last = torch.ones_like(ids, dtype=torch.bool)
        last[:-1] = ids[1:] != ids[:-1]
        first = torch.ones_like(last)
        first[1:] = last[:-1]
        # start of each row's run, carried forward by a cumulative max of run starts
        starts = torch.where(first, torch.arange(ids.numel(), device=ids.device), 0).cummax(0).values
        totals = []
        for v in values:
            c = torch.cumsum(v[order].to(f64), 0)
            before = torch.where(starts > 0, c[(starts - 1).clamp(min=0)], torch.zeros_like(c))
            totals.append(c - before)
        target = torch.where(last, ids, self.num_prompts)
        return target, totals

    def update(self, prompt_ids: torch.Tensor, out: GroupAdvantages, step: int, *, validate: bool = True) -> None:
        """Folds one batch of groups into the state: group g was rollouts of prompt_ids[g].

        Args:
            prompt_ids: ``[num_groups]`` integer ids on the tracker's device; duplicates merge.
            out: the batch's :class:`GroupAdvantages` (its stats.count and stats.successes).
            step: the training step (non-decreasing across calls).
            validate: check the id range (one host read); False for no sync at all.
        """
        step = self._check_step(step)
        ids = self._ids(prompt_ids, validate=validate)
        n_obs, k_obs = out.stats.count, out.stats.successes
        if n_obs.shape != ids.shape:
            raise ValueError(f"prompt_ids has {ids.numel()} entries but the result has {n_obs.numel()} groups")
        if n_obs.device != self.device:
            raise ValueError(f"the result is on {n_obs.device} but the tracker lives on {self.device}")
        self.step = step
        if ids.numel() == 0:
            return
        zero_var = ((out.stats.std == 0) & (n_obs >= 2)).to(f64)
        all_correct = ((out.stats.pass_rate == 1) & (n_obs >= 1)).to(f64)
        target, (n, k, zero, correct) = self._merge(ids, n_obs, k_obs, zero_var, all_correct)
        target = torch.where(n > 0, target, self.num_prompts)  # groups with no valid sample teach nothing
        s = self.state
        dt = (step - s["last_step"][target]).clamp(min=0).to(f64)
        forget = torch.where(s["last_step"][target] >= 0, self.decay**dt, torch.zeros_like(dt))
        if self.model == "beta":
            alpha = forget * s["alpha"][target] + (1 - forget) * self.prior_alpha + k
            beta = forget * s["beta"][target] + (1 - forget) * self.prior_beta + (n - k)
            s["alpha"].index_copy_(0, target, alpha)
            s["beta"].index_copy_(0, target, beta)
        elif self.model == "logistic":
            self._update_logistic(target, n, k, forget)
        else:
            self._update_features(target, n, k, forget, step)
        streak = torch.where(zero > 0, s["zero_var_streak"][target] + 1, 0)
        s["zero_var_streak"].index_copy_(0, target, streak)
        s["last_all_correct"].index_copy_(0, target, correct > 0)
        s["visits"].index_copy_(0, target, s["visits"][target] + 1)
        s["last_step"].index_copy_(0, target, torch.full_like(target, step))
        self._update_greso_rates(zero_var, all_correct)
        self._blank_spare()

    def _blank_spare(self) -> None:
        """Resets the spare slot that absorbed duplicate rows' writes to its initial value."""
        spare = self.num_prompts
        initial = {"last_step": -1, "alpha": self.prior_alpha, "beta": self.prior_beta,
                   "precision": self.difficulty_prior_precision}  # fmt: skip
        for name, value in self.state.items():
            if value.dim() == 1 and value.shape[0] == spare + 1 and name != "weights":
                value[spare] = initial.get(name, 0)

    def _update_logistic(self, target, n, k, forget) -> None:
        s = self.state
        prec0 = self.difficulty_prior_precision
        d = s["difficulty"][target]
        p = torch.sigmoid(s["ability"] - d)
        info = n * p * (1 - p)
        precision = prec0 + forget * (s["precision"][target] - prec0) + info
        residual = k - n * p  # > 0: solved more often than predicted
        live = target < self.num_prompts
        # Ability: one damped Newton step on the batch's binomial log-likelihood (d held fixed).
        ability_info = (info * live).sum() + 1.0
        s["ability"] += self.ability_step * (residual * live).sum() / ability_info
        # Difficulty: a Newton step against the prompt's own residual, weighted by its precision.
        s["difficulty"].index_copy_(0, target, d - residual / precision)
        s["precision"].index_copy_(0, target, precision)

    def _feature_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """x_i in float64. Rows for the spare slot read the last prompt's features; their weight in
        every sum is 0 (`live`) and what they write lands in the spare slot, which is blanked."""
        return self.features[ids.clamp(max=self.num_prompts - 1)].to(f64)

    def _weight_precision(self, step: int) -> torch.Tensor:
        """w's precision now: prec0 * I + lam**(steps since w last moved) * (P - prec0 * I)."""
        s = self.state
        dt = (step - s["weights_last_step"]).clamp(min=0).to(f64)
        forget = torch.where(s["weights_last_step"] >= 0, self.decay**dt, torch.zeros_like(dt))
        eye = torch.eye(self.num_features, dtype=f64, device=self.device) * self.feature_prior_precision
        return eye + forget * (s["weight_precision"] - eye)

    def _logit(self, ids: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.state["ability"] - x @ weights - self.state["difficulty"][ids]

    def _update_features(self, target, n, k, forget, step: int) -> None:
        s = self.state
        prec0 = self.difficulty_prior_precision
        live = (target < self.num_prompts).to(f64)
        x = self._feature_rows(target)
        offset = x @ s["weights"] + s["difficulty"][target]
        # Ability first, as in "logistic" (a damped Newton step, x.w + b held fixed) ...
        p = torch.sigmoid(s["ability"] - offset)
        ability_info = (n * p * (1 - p) * live).sum() + 1.0
        s["ability"] += self.ability_step * ((k - n * p) * live).sum() / ability_info
        # ... then one joint Newton step on (w, b) from the residuals left at the new ability. b_i's
        # prior N(b_i, 1/pi_i) integrated out: group i informs w with weight rho_i = pi_i / (pi_i + h_i),
        # P <- P + X^T diag(rho h) X, w <- w - P^-1 X^T (rho r); b_i takes what w leaves:
        # b_i <- b_i - (r_i - h_i dlogit_i) / (pi_i + h_i), dlogit_i = -x_i.dw.
        p = torch.sigmoid(s["ability"] - offset)
        info, residual = n * p * (1 - p), k - n * p
        prior_precision = prec0 + forget * (s["precision"][target] - prec0)
        rho = prior_precision / (prior_precision + info) * live
        weight_precision = self._weight_precision(step) + x.T @ ((rho * info)[:, None] * x)
        chol, _ = torch.linalg.cholesky_ex(weight_precision)  # the _ex form does not sync to check
        weight_step = -torch.cholesky_solve((x.T @ (rho * residual))[:, None], chol)[:, 0]
        s["weights"] += weight_step
        s["weight_precision"].copy_(weight_precision)
        s["weights_last_step"].fill_(step)
        precision = prior_precision + info
        moved = -(x @ weight_step)
        s["difficulty"].index_copy_(0, target, s["difficulty"][target] - (residual - info * moved) / precision)
        s["precision"].index_copy_(0, target, precision)

    def _update_greso_rates(self, zero_var: torch.Tensor, all_correct: torch.Tensor) -> None:
        # GRESO: move each exploration rate so that the share of zero-variance groups, easy
        # (all correct) and hard (all wrong) separately, tends to its target.
        groups = max(zero_var.numel(), 1)
        easy = (zero_var * all_correct).sum() / groups
        hard = (zero_var * (1 - all_correct)).sum() / groups
        target = self.greso_target / 2
        rates = self.state["greso_rates"]
        shift = torch.stack([torch.sign(target - easy), torch.sign(target - hard)]) * self.greso_step
        rates.copy_((rates + shift).clamp(0.01, 1.0))

    # -- predictions ----------------------------------------------------------------------
    def _forgetting(self, ids: torch.Tensor) -> torch.Tensor:
        """lam**(steps since last seen): the weight left on each prompt's data now (0 if unseen)."""
        last = self.state["last_step"][ids]
        dt = (self.step - last).clamp(min=0).to(f64)
        return torch.where(last >= 0, self.decay**dt, torch.zeros_like(dt))

    def predict(self, prompt_ids: torch.Tensor, *, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(pass_rate, uncertainty) per prompt at the latest step: the posterior mean and std of
        the pass rate (beta), or sigmoid(theta - d) and its delta-method std (logistic), or
        sigmoid(theta - x.w - b) and the delta-method std p(1 - p) sqrt(1/prec_b + x^T P^-1 x)
        (features: b's and w's posterior variances; for a never-seen prompt 1/prec_b is the prior's,
        and x^T P^-1 x shrinks as related prompts are seen)."""
        ids = self._ids(prompt_ids, validate=validate)
        forget = self._forgetting(ids)
        s = self.state
        if self.model == "features":
            prec0 = self.difficulty_prior_precision
            precision = prec0 + forget * (s["precision"][ids] - prec0)
            x = self._feature_rows(ids)
            chol, _ = torch.linalg.cholesky_ex(self._weight_precision(self.step))
            spread = torch.linalg.solve_triangular(chol, x.T, upper=False)  # L^-1 x: |.|^2 = x^T P^-1 x
            p = torch.sigmoid(self._logit(ids, x, s["weights"]))
            return p, p * (1 - p) * torch.sqrt(1 / precision + (spread**2).sum(0))
        if self.model == "beta":
            a = forget * s["alpha"][ids] + (1 - forget) * self.prior_alpha
            b = forget * s["beta"][ids] + (1 - forget) * self.prior_beta
            mean = a / (a + b)
            std = torch.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
            return mean, std
        prec0 = self.difficulty_prior_precision
        precision = prec0 + forget * (s["precision"][ids] - prec0)
        p = torch.sigmoid(s["ability"] - s["difficulty"][ids])
        return p, p * (1 - p) / precision.sqrt()

    def prior(self, prompt_ids: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
        """Pass-rate estimates for group_advantages(prior=...), NaN where there is none: for a
        prompt never seen (beta, logistic), or before the first update (features, which predicts
        never-seen prompts from their features once any prompt has been seen)."""
        ids = self._ids(prompt_ids, validate=validate)
        mean = self._pass_rate(ids)
        known = self.state["last_step"][ids] >= 0
        if self.model == "features":
            known = known | (self.state["weights_last_step"] >= 0)
        return torch.where(known, mean, torch.full_like(mean, math.nan))

    def _sample_pass_rate(self, ids: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One posterior draw of each prompt's pass rate."""
        forget = self._forgetting(ids)
        s = self.state
        if self.model == "beta":
            a = forget * s["alpha"][ids] + (1 - forget) * self.prior_alpha
            b = forget * s["beta"][ids] + (1 - forget) * self.prior_beta
            x, y = _gamma(a, generator), _gamma(b, generator)
            return x / (x + y)
        prec0 = self.difficulty_prior_precision
        precision = prec0 + forget * (s["precision"][ids] - prec0)
        if self.model == "features":
            # One draw of the shared weights for all candidates (w ~ N(w, P^-1): w + L^-T z), then
            # each prompt's own residual: related prompts move together, as the posterior says.
            chol, _ = torch.linalg.cholesky_ex(self._weight_precision(self.step))
            z_w = torch.randn((self.num_features, 1), generator=generator, dtype=f64, device=ids.device)
            weights = s["weights"] + torch.linalg.solve_triangular(chol.T, z_w, upper=True)[:, 0]
            z = torch.randn(ids.shape, generator=generator, dtype=f64, device=ids.device)
            return torch.sigmoid(self._logit(ids, self._feature_rows(ids), weights) + z / precision.sqrt())
        z = torch.randn(ids.shape, generator=generator, dtype=f64, device=ids.device)
        return torch.sigmoid(s["ability"] - s["difficulty"][ids] + z / precision.sqrt())

    def _pass_rate(self, ids: torch.Tensor) -> torch.Tensor:
        """predict's pass rate, without the features model's O(n d^2) uncertainty."""
        if self.model == "features":
            return torch.sigmoid(self._logit(ids, self._feature_rows(ids), self.state["weights"]))
        return self.predict(ids, validate=False)[0]

    # -- selection ------------------------------------------------------------------------
    def select(
        self,
        candidate_ids: torch.Tensor,
        k: int,
        strategy: str = "thompson",
        generator: torch.Generator | None = None,
        *,
        target: float = 0.5,
        band: tuple[float, float] = (0.1, 0.9),
        explore: float = 0.1,
        validate: bool = True,
    ) -> torch.Tensor:
        """k distinct prompt ids from the candidates, chosen before paying for their rollouts.

        Strategies: "thompson" draws each pass rate from the posterior and takes the k closest
        to `target` (MoPPS); "band" takes prompts predicted inside `band` at random, filling
        from the nearest outside, with an `explore` share drawn uniformly from the rest;
        "learnability" takes the top predicted p(1 - p) (LILO); "greso" skips a prompt whose
        last z groups all had zero variance with probability 1 - max(p_e**z, 0.01), p_e the
        adaptive rate for easy or hard prompts (GRESO), then samples uniformly.
        Deterministic for a given generator.
        """
        ids = self._ids(candidate_ids, "candidate_ids", validate=validate)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= ids.numel():
            raise ValueError(f"k must be an int in [0, {ids.numel()}] (the number of candidates), got {k!r}")
        if validate and ids.numel() and torch.unique(ids).numel() != ids.numel():
            raise ValueError("candidate_ids must be distinct")
        if generator is not None and generator.device != ids.device:
            raise ValueError(f"generator is on {generator.device} but the tracker lives on {ids.device}")
        u = torch.rand(ids.shape, generator=generator, dtype=f64, device=ids.device)
        if strategy == "thompson":
            score = -(self._sample_pass_rate(ids, generator) - target).abs()
        elif strategy == "learnability":
            p = self._pass_rate(ids)
            score = p * (1 - p) + 1e-9 * u  # jitter breaks ties reproducibly
        elif strategy == "greso":
            s = self.state
            rate = torch.where(s["last_all_correct"][ids], s["greso_rates"][0], s["greso_rates"][1])
            streak = s["zero_var_streak"][ids].to(f64)
            keep_prob = torch.where(streak > 0, (rate**streak).clamp(min=0.01), torch.ones_like(rate))
            kept = torch.rand(ids.shape, generator=generator, dtype=f64, device=ids.device) < keep_prob
            score = kept.to(f64) + u  # skipped prompts only fill what the rest cannot
        else:
            return self._select_band(ids, k, band, explore, u)
        return ids[torch.topk(score, k).indices]

    def _select_band(self, ids, k, band, explore, u) -> torch.Tensor:
        lo, hi = band
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"band must satisfy 0 <= lo <= hi <= 1, got {band}")
        if not 0 <= explore <= 1:
            raise ValueError(f"explore must be in [0, 1], got {explore}")
        p = self._pass_rate(ids)
        distance = torch.clamp(lo - p, min=0) + torch.clamp(p - hi, min=0)
        score = torch.where(distance == 0, 1 + u, -distance)
        exploit = k - round(explore * k)
        chosen = torch.topk(score, exploit).indices
        rest = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        rest[chosen] = False
        explored = torch.topk(torch.where(rest, u, -1.0), k - exploit).indices
        return ids[torch.cat([chosen, explored])]

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        config = {
            name: getattr(self, name)
            for name in ("num_prompts", "model", "decay", "prior_alpha", "prior_beta", "difficulty_prior_precision",
                         "ability_step", "greso_target", "greso_step", "step", "num_features",
                         "feature_prior_precision", "features_fingerprint")
        }  # fmt: skip
        return {"config": config, "state": {k: v.clone() for k, v in self.state.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        config, state = state_dict["config"], state_dict["state"]
        if (
            config["num_prompts"] != self.num_prompts
            or config["model"] != self.model
            or config.get("num_features", 0) != self.num_features
        ):
            raise ValueError(
                f"checkpoint is for {config['num_prompts']} prompts, model {config['model']!r}, "
                f"{config.get('num_features', 0)} features; this tracker has {self.num_prompts}, {self.model!r}, "
                f"{self.num_features}"
            )
        saved = config.get("features_fingerprint", 0.0)
        if not math.isclose(saved, self.features_fingerprint, rel_tol=1e-9, abs_tol=1e-9 * self.num_prompts):
            raise ValueError(
                "checkpoint was made with other features (or rows in another order): fingerprint "
                f"{saved!r}, this tracker's {self.features_fingerprint!r}"
            )
        if set(state) != set(self.state):
            raise ValueError(f"checkpoint state has {sorted(state)}, expected {sorted(self.state)}")
        for name, value in config.items():
            setattr(self, name, value)
        for name, value in state.items():
            self.state[name].copy_(value)


def features_from_texts(
    texts: Sequence[str],
    encode: Callable[[list[str]], torch.Tensor],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    standardize: bool = True,
) -> torch.Tensor:
    """X for PromptTracker(model="features"): one fixed vector per prompt from a user's encoder.

    Args:
        texts: the prompts, in dataset order (row i is prompt id i).
        encode: maps a list of up to `batch_size` strings to a ``[len, d]`` tensor, e.g. a
            sentence-embedding model, the policy's mean hidden state over the prompt, or a one-hot
            of metadata (source, level). bandadv downloads no model; this is called as given.
        batch_size: strings per `encode` call.
        device, dtype: where and how X is returned.
        standardize: centre each column and scale it to unit variance (constant columns are
            left at 0), so that the default weight prior suits any encoder's scale.
    Returns:
        ``[len(texts), d]`` tensor.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a sequence of strings")
    if len(texts) == 0:
        raise ValueError("texts must not be empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    texts = list(texts)
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        rows = torch.as_tensor(encode(batch))
        if rows.dim() != 2 or rows.shape[0] != len(batch) or (chunks and rows.shape[1] != chunks[0].shape[1]):
            raise ValueError(
                f"encode must return a [len(batch), d] tensor with the same d for every batch; for {len(batch)} "
                f"strings it returned shape {list(rows.shape)}"
            )
        chunks.append(rows.detach().to(device=device, dtype=f64))
    x = torch.cat(chunks)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("encode returned NaN or Inf values")
    if standardize:
        std = x.std(0, correction=0) if x.shape[0] > 1 else torch.zeros(x.shape[1], dtype=f64, device=x.device)
        x = torch.where(std > 0, (x - x.mean(0)) / torch.where(std > 0, std, 1.0), 0.0)
    return x.to(dtype)


def _gamma(
    shape: torch.Tensor, generator: torch.Generator | None, rounds: int = 12, compact: bool | None = None
) -> torch.Tensor:
    """Gamma(shape, 1) draws from a generator (torch's own sampler takes none): Marsaglia and
    Tsang (2000) proposal rounds, shape < 1 boosted by U**(1/shape). The chance that a draw is
    still unaccepted after 12 rounds is below 1e-15; it then takes the mean. On the GPU every
    round runs over all draws (no host sync); on the CPU, where reading a mask costs nothing, a
    round runs over the draws still unaccepted only (one in twenty after the first). `compact`
    overrides that choice (tests run both ways on the CPU)."""
    boost = shape < 1
    a = torch.where(boost, shape + 1, shape)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = d.clone()  # the mode-ish fallback
    if compact is None:
        compact = shape.device.type == "cpu"
    if compact:
        flat_d, flat_c, flat_out = d.reshape(-1), c.reshape(-1), out.view(-1)  # flat_out writes into out
        todo = torch.arange(flat_d.numel(), device=shape.device)
        for _ in range(rounds):
            if todo.numel() == 0:
                break
            accepted, value = _gamma_proposal(flat_d[todo], flat_c[todo], generator)
            flat_out[todo[accepted]] = value[accepted]
            todo = todo[~accepted]
    else:
        done = torch.zeros_like(shape, dtype=torch.bool)
        for _ in range(rounds):
            accepted, value = _gamma_proposal(d, c, generator)
            out = torch.where(accepted & ~done, value, out)
            done |= accepted
    u = torch.rand(shape.shape, generator=generator, dtype=f64, device=shape.device)
    return torch.where(boost, out * u.clamp(min=1e-300) ** (1.0 / shape), out)


def _gamma_proposal(d: torch.Tensor, c: torch.Tensor, generator: torch.Generator | None):
    """One Marsaglia-Tsang round for each (d, c): whether it is accepted, and its value d * v."""
    x = torch.randn(d.shape, generator=generator, dtype=f64, device=d.device)
    u = torch.rand(d.shape, generator=generator, dtype=f64, device=d.device)
    v = (1 + c * x) ** 3
    log_v = torch.log(v.clamp(min=1e-300))
    accepted = (v > 0) & (torch.log(u.clamp(min=1e-300)) < 0.5 * x * x + d - d * v + d * log_v)
    return accepted, d * v
