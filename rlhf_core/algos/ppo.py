"""PPO math of the `ppo` stage (paper sec. 3.2 and 5.3): log-probabilities, the KL penalty and its controllers,
reward shaping and normalisation, GAE, the clipped policy and value losses, and rollout health metrics.

Per-token tensors are response-aligned ``(B, T)``: position t holds the t-th generated token (the caller does the
causal shift). ``response_mask`` / ``mask`` is 1 on real response tokens up to and including EOS and 0 on padding.
Values at padding positions never reach a result: they are replaced (``torch.where``) rather than multiplied by
the mask, so even a NaN or inf stored in padding cannot leak.
"""

from __future__ import annotations

import math

import torch

from rlhf_core.algos.masked import _check, masked_mean, masked_sum
from rlhf_core.algos.rm import last_token_index

Stats = dict[str, torch.Tensor]
KL_ESTIMATORS = ("k1", "k2", "k3")


def _same_shape(name: str, reference: torch.Tensor, *others: torch.Tensor) -> None:
    for other in others:
        if other.shape != reference.shape:
            raise ValueError(f"{name}: shapes {tuple(reference.shape)} and {tuple(other.shape)} differ")


def _keep(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask after the shape and non-empty checks of ``masked._check``."""
    return _check(values, mask).bool()


def _zero_outside(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, values, torch.zeros_like(values))


Normaliser = float | torch.Tensor | None


def token_mean(values: torch.Tensor, mask: torch.Tensor, normaliser: Normaliser = None) -> torch.Tensor:
    """sum_t m_t x_t / N with N = ``normaliser`` (default: this batch's token count sum_t m_t).

    The losses below aggregate with it. Passing N = (tokens of the whole minibatch, every micro-batch and process)
    / (micro-batches x processes) makes gradient accumulation (the engine divides by the micro-batch count) and
    data parallelism (ranks average) reproduce the minibatch's token mean exactly, as ``sft_loss`` does.
    """
    if normaliser is None:
        return masked_mean(values, mask)
    return masked_sum(values, mask) / torch.as_tensor(normaliser, dtype=values.dtype, device=values.device)


def _scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # A half-precision log-softmax over a large vocabulary loses the small probabilities the ratios depend on.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


# --------------------------------------------------------------------------------------------- log-probabilities


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(a_t | s_t) = z_t[a_t] - logsumexp(z_t), z_t = logits_t / temperature (paper sec. 3.2).

    ``logits``: ``(B, T, V)`` already aligned with ``tokens`` ``(B, T)`` (position t scores token t); returns
    ``(B, T)``. ``tokens`` must be valid ids everywhere (the pad id on padding, not -100). The temperature must be
    the sampling one (paper sec. 6.1: 0.8): the ratio and KL terms are about the distribution that was sampled.
    Half-precision logits are promoted to float32.
    """
    if logits.dim() != 3 or logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logprobs_from_logits: logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}"
        )
    z = _scaled_logits(logits, temperature)
    # gather - logsumexp avoids materialising the full (B, T, V) log-softmax.
    picked = z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H_t = -sum_a p(a) log p(a) = logsumexp(z_t) - sum_a p(a) z_t[a], p = softmax(z_t), z_t = logits_t / temperature.

    Paper sec. 5.3.2 (entropy bonus). ``logits``: ``(B, T, V)`` with finite entries; returns ``(B, T)``. The
    logsumexp form never takes the log of a probability that underflowed to 0.
    """
    z = _scaled_logits(logits, temperature)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    probs = torch.exp(z - lse)
    return lse.squeeze(-1) - (probs * z).sum(dim=-1)


def _row_slices(logits: torch.Tensor, chunk_positions: int) -> list[slice]:
    """Slices of rows holding at most ``chunk_positions`` (row, position) pairs each (at least one row)."""
    if chunk_positions < 1:
        raise ValueError(f"chunk_positions must be >= 1, got {chunk_positions}")
    rows = max(1, chunk_positions // max(logits.shape[1], 1))
    return [slice(s, s + rows) for s in range(0, logits.shape[0], rows)]


def chunked_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk_positions: int
) -> torch.Tensor:
    """:func:`logprobs_from_logits`, a chunk of rows at a time: the float32 promotion and the log-sum-exp's
    intermediates exist for ``chunk_positions`` positions, not the whole ``(B, T, V)`` batch. Each row's
    arithmetic is that of the direct computation (the reductions run along the vocabulary, row by row)."""
    chunks = _row_slices(logits, chunk_positions)
    return torch.cat([logprobs_from_logits(logits[c], tokens[c], temperature) for c in chunks])


def chunked_entropy(logits: torch.Tensor, temperature: float, chunk_positions: int) -> torch.Tensor:
    """:func:`entropy_from_logits` a chunk of rows at a time (see :func:`chunked_logprobs`)."""
    return torch.cat([entropy_from_logits(logits[c], temperature) for c in _row_slices(logits, chunk_positions)])


def logprob_terms(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk_positions: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log pi at the temperature, log pi at temperature 1, entropy at the temperature)``, each ``(B, T)``, from
    ``(B, T, V)`` logits in chunks of rows (see :func:`chunked_logprobs`): what scoring needs of one forward (the
    ratio and KL terms, the perplexity monitor, the entropy) with one float32 chunk alive at a time."""
    parts = [
        (logprobs_from_logits(logits[c], tokens[c], temperature), logprobs_from_logits(logits[c], tokens[c]),
         entropy_from_logits(logits[c], temperature))
        for c in _row_slices(logits, chunk_positions)
    ]  # fmt: skip
    logprobs, logprobs_t1, entropy = (torch.cat(column) for column in zip(*parts, strict=True))
    return logprobs, logprobs_t1, entropy


# -------------------------------------------------------------------------------------------------- KL penalty


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi, with l_t = log pi(a_t) - log ref(a_t):

    k1 = l_t (unbiased, can be negative); k2 = l_t^2 / 2 (biased, >= 0); k3 = exp(-l_t) - 1 + l_t (unbiased, >= 0)
    (Schulman 2020, "Approximating KL divergence"). Paper sec. 5.3.2 (token-level KL penalty). Inputs and output
    ``(B, T)``; padding positions are not masked here (the reward shaping does that).
    """
    _same_shape("kl_penalty", logprobs, ref_logprobs)
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # expm1 keeps precision when the policies are close (log_ratio ~ 0), the usual case.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


class FixedKLController:
    """Constant KL coefficient eta in r_t = -eta * KL_t (paper sec. 5.3.2: PPO-max keeps eta fixed)."""

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """eta <- eta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon) (Ziegler et al. 2019, sec. 2.2).

    Paper sec. 5.3.2 (KL penalty). A proportional controller steering the measured KL towards ``target``;
    ``n_steps`` is the number of samples (or steps) the measurement covers. Only ``value`` is checkpointed:
    ``target`` and ``horizon`` come from the constructor, i.e. the configuration of the resumed run.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if init_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"AdaptiveKLController needs init_coef >= 0, target > 0, horizon > 0; got {init_coef}, {target}, "
                f"{horizon}"
            )
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        # The clip bounds one update's multiplicative change, so a single noisy KL reading cannot blow eta up.
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def kl_shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float | torch.Tensor
) -> torch.Tensor:
    """r_t = -eta * KL_t on response tokens, plus the sequence score r(x, y) on the last one (paper sec. 5.3.2).

    ``scores``: ``(B,)`` reward-model scores (already normalised / clipped); ``kl``: ``(B, T)`` per-token KL
    estimates; returns ``(B, T)`` rewards, 0 at padding. The last real token is the last position whose mask is 1,
    found generically; a row without any response token is an error (its score would have nowhere to go).
    """
    keep = _keep(kl, response_mask)
    if scores.shape != (kl.shape[0],):
        raise ValueError(f"kl_shaped_rewards: scores {tuple(scores.shape)} should be ({kl.shape[0]},)")
    rewards = _zero_outside(-kl_coef * kl, keep)
    last = last_token_index(response_mask)
    bonus = torch.zeros_like(rewards).scatter(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))
    return rewards + bonus


# ------------------------------------------------------------------------------------------------------------ GAE


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}; returns R_t = A_t + V_t (paper sec. 3.2).

    ``rewards``, ``values``, ``response_mask``: ``(B, T)``. V and A beyond the last real token are 0 (the episode
    ends with the response). Rewards and values at padding are replaced by 0 first, so they cannot influence any
    real position; a 0 inside a row therefore ends the episode there. Returns detached ``(advantages, returns)``,
    both 0 at padding. Reverse-time loop over T, vectorised over B.
    """
    _same_shape("gae_advantages", rewards, values, response_mask)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    keep = response_mask.bool()
    m = keep.to(dtype)
    r = _zero_outside(rewards.detach().to(dtype), keep)
    v = _zero_outside(values.detach().to(dtype), keep)
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    reversed_adv = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        next_value = v[:, t]
        reversed_adv.append(next_adv)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = (advantages + v) * m
    return advantages, returns


# ----------------------------------------------------------------------------------------- score reparameterisation


def moments_from_sums(
    count: float | torch.Tensor, total: float | torch.Tensor, total_sq: float | torch.Tensor
) -> tuple[float, float, float]:
    """(n, sum x, sum x^2) -> (n, mu = sum x / n, var = sum x^2 / n - mu^2) with the population variance.

    Paper sec. 5.3.1. Sums are what data-parallel ranks all-reduce; the result feeds ``RunningMoments.merge``.
    Computed in float64; the variance is clamped at 0 against cancellation. ``count`` must be > 0.
    """
    n, s, sq = float(count), float(total), float(total_sq)
    if not n > 0:
        raise ValueError(f"moments_from_sums: count must be > 0, got {n}")
    mean = s / n
    return n, mean, max(sq / n - mean * mean, 0.0)


class RunningMoments:
    """Historical mean and (population) std of every score seen: the statistics of paper sec. 5.3.1, eq. 18.

    State is Python floats (float64). It starts at mean 0, var 1, count 0; with count 0 the first merge simply
    adopts the batch moments (the initial mean and var carry zero weight), so the defaults only matter before any
    merge. Batches are merged with Chan et al.'s parallel algorithm, so merging each batch's moments (from the
    all-reduced ``[n, sum, sum_sq]``, ``moments_from_sums``) gives the moments of the whole stream.
    """

    def __init__(self) -> None:
        self._mean = 0.0
        self._var = 1.0
        self._count = 0.0

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def std(self) -> float:
        return math.sqrt(self._var)

    @property
    def var(self) -> float:
        return self._var

    @property
    def count(self) -> float:
        return self._count

    def merge(self, count: float, mean: float, var: float) -> None:
        """Merge a batch of ``count`` values with this ``mean`` and population ``var``; count 0 is a no-op.

        n = n_a + n_b; mu = mu_a + d n_b / n; var = (n_a var_a + n_b var_b + d^2 n_a n_b / n) / n, d = mu_b - mu_a.
        """
        count, mean, var = float(count), float(mean), float(var)
        if count < 0 or var < 0:
            raise ValueError(f"RunningMoments.merge: count and var must be >= 0, got {count}, {var}")
        if count == 0:
            return
        total = self._count + count
        delta = mean - self._mean
        m2 = self._var * self._count + var * count + delta * delta * self._count * count / total
        self._mean += delta * count / total
        self._var = m2 / total
        self._count = total

    def state_dict(self) -> dict[str, float]:
        return {"mean": self._mean, "var": self._var, "count": self._count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._mean = float(state["mean"])
        self._var = float(state["var"])
        self._count = float(state["count"])


def ensemble_scores(scores: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, penalty: float) -> torch.Tensor:
    """A reward-model ensemble's conservative score (uncertainty-weighted, Coste et al. 2023), in the first
    model's units: each model's ``(K, B)`` scores are standardised with its own mean and std on SFT samples,
    z_k = (s_k - m_k) / sd_k; the combined z = mean_k z_k - penalty * std_k z_k (population std) is mapped back,
    m_0 + sd_0 * z. Where the models agree this is their average; where they disagree, which is where a policy
    exploits one model's errors, it is lower. Returns ``(B,)``."""
    if scores.dim() != 2 or means.shape != (scores.shape[0],) or stds.shape != means.shape:
        raise ValueError(f"ensemble_scores: scores {tuple(scores.shape)}, means {tuple(means.shape)}, "
                         f"stds {tuple(stds.shape)}")  # fmt: skip
    z = (scores - means[:, None]) / stds[:, None]
    combined = z.mean(dim=0) - penalty * z.std(dim=0, unbiased=False)
    return means[0] + stds[0] * combined


def remove_length_term(scores: torch.Tensor, lengths: torch.Tensor, slope: float, mean_length: float) -> torch.Tensor:
    """r - slope * (L - mean_L): the score with its linear length term (fitted on SFT samples by
    ``algos.rm.score_length_fit``) taken out, so that a response earns no reward for being longer or shorter
    than the SFT policy's average. ``scores``, ``lengths``: ``(B,)``; returns a new tensor. Not in the paper: a
    guard against the length exploitation seen on HH-RLHF (Singhal et al. 2023 measure how much of PPO's reward
    gain is length)."""
    return scores - slope * (lengths.to(scores.dtype) - mean_length)


def penalise_missing_eos(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """r - penalty for responses that hit the length cap without EOS (``has_eos`` False); ``None``: unchanged.

    A common guard against rambling (TRL's ``missing_eos_penalty``); not in the paper. ``scores``, ``has_eos``:
    ``(B,)``; returns a new tensor.
    """
    if penalty is None:
        return scores.clone()
    return torch.where(has_eos, scores, scores - penalty)


def normalize_scores(
    scores: torch.Tensor, mean: float | torch.Tensor, std: float | torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """r~ = (r - mu) / (sigma + eps) with the historical moments (paper sec. 5.3.1, eq. 18 before the clip)."""
    return (scores - mean) / (std + eps)


def scale_scores(scores: torch.Tensor, std: float | torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """r~ = r / (sigma + eps): reward scaling without centring (paper sec. 5.3.1; MOSS released code)."""
    return scores / (std + eps)


def clip_scores(scores: torch.Tensor, bound: float) -> torch.Tensor:
    """r~ = clip(r, -delta, delta) (paper sec. 5.3.1, eq. 18)."""
    if not bound > 0:
        raise ValueError(f"clip bound must be > 0, got {bound}")
    return scores.clamp(-bound, bound)


def clip_advantages(advantages: torch.Tensor, bound: float) -> torch.Tensor:
    """A~ = clip(A, -delta, delta) (paper sec. 5.3.1, advantage normalisation and clipping)."""
    if not bound > 0:
        raise ValueError(f"clip bound must be > 0, got {bound}")
    return advantages.clamp(-bound, bound)


# ----------------------------------------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    clip: bool = True,
    normaliser: Normaliser = None,
) -> tuple[torch.Tensor, Stats]:
    """L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)), rho_t = exp(log pi - log pi_old).

    PPO-clip surrogate (paper sec. 3.2; Schulman et al. 2017) as a token mean over ``mask`` (``token_mean``: with
    ``normaliser``, the share of a whole minibatch's mean); ``clip=False`` gives the plain importance-sampled
    surrogate mean(-A rho). All inputs ``(B, T)``. Stats (detached, aggregated the same way): ``clipfrac``
    (fraction of tokens where the clipped term is the larger, i.e. where clipping is, or with ``clip=False`` would
    be, active), ``approxkl`` = mean((rho - 1) - log rho) (k3 estimate of KL(pi_old || pi)), ``ratio_mean``.
    """
    keep = _keep(logprobs, mask)
    _same_shape("policy_loss", logprobs, old_logprobs, advantages)
    # Padding gets log-ratio 0 (ratio 1) before exp: an inf there would otherwise turn the gradient into NaN.
    log_ratio = _zero_outside(logprobs - old_logprobs, keep)
    ratio = torch.exp(log_ratio)
    adv = _zero_outside(advantages, keep)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.maximum(unclipped, clipped) if clip else unclipped
    loss = token_mean(per_token, mask, normaliser)
    with torch.no_grad():
        stats = {
            "clipfrac": token_mean((clipped > unclipped).to(per_token.dtype), mask, normaliser),
            "approxkl": token_mean(torch.expm1(log_ratio) - log_ratio, mask, normaliser),
            "ratio_mean": token_mean(ratio, mask, normaliser),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
    clip: bool = True,
    normaliser: Normaliser = None,
) -> tuple[torch.Tensor, Stats]:
    """L_V = 0.5 mean_t max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2) (paper sec. 3.2 / 5.3).

    Clipped value loss: the value head cannot move further than ``c`` from the rollout's values in one batch
    without paying for it. ``clip=False`` gives 0.5 mean((V - R)^2). All inputs ``(B, T)``, token mean over
    ``mask`` (``token_mean`` with ``normaliser``). Stats (detached, aggregated the same way): ``clipfrac``
    (fraction where the clipped square is the larger), ``values_mean``.
    """
    keep = _keep(values, mask)
    _same_shape("value_loss", values, old_values, returns)
    v = _zero_outside(values, keep)
    v_old = _zero_outside(old_values, keep)
    ret = _zero_outside(returns, keep)
    unclipped = (v - ret).square()
    clipped = (torch.clamp(v, v_old - cliprange_value, v_old + cliprange_value) - ret).square()
    per_token = torch.maximum(unclipped, clipped) if clip else unclipped
    loss = 0.5 * token_mean(per_token, mask, normaliser)
    with torch.no_grad():
        stats = {
            "clipfrac": token_mean((clipped > unclipped).to(per_token.dtype), mask, normaliser),
            "values_mean": token_mean(v, mask, normaliser),
        }
    return loss, stats


def entropy_loss(
    entropy: torch.Tensor, mask: torch.Tensor, normaliser: Normaliser = None
) -> tuple[torch.Tensor, Stats]:
    """L_H = -mean_t H_t over ``mask`` (paper sec. 5.3.2): adding ``coef * L_H`` to the loss is an entropy bonus.

    ``entropy``: ``(B, T)`` per-token entropies; the mean is ``token_mean`` with ``normaliser``. Stats
    (detached): ``entropy`` = mean_t H_t.
    """
    keep = _keep(entropy, mask)
    mean = token_mean(_zero_outside(entropy, keep), mask, normaliser)
    return -mean, {"entropy": mean.detach()}


# --------------------------------------------------------------------------------------------------------- health


def repetition_rate(tokens: torch.Tensor, mask: torch.Tensor, n: int = 3) -> torch.Tensor:
    """rep_n = (#n-grams - #distinct n-grams) / #n-grams per row, over the masked response (paper sec. 5.2).

    The numerator counts the n-gram occurrences that already occurred earlier in the same response, so a
    collapsing policy that loops ("a b a b a b", n=2: 3 of 5 bigrams repeat) drifts towards 1. Masked tokens are
    taken in order, padding skipped; a response shorter than ``n`` tokens has no n-gram and scores 0.
    ``tokens``, ``mask``: ``(B, T)``; returns ``(B,)`` float32.
    """
    if n < 1:
        raise ValueError(f"repetition_rate: n must be >= 1, got {n}")
    _same_shape("repetition_rate", tokens, mask)
    rates = []
    for row, row_mask in zip(tokens.tolist(), mask.bool().tolist(), strict=True):
        response = [token for token, kept in zip(row, row_mask, strict=True) if kept]
        grams = [tuple(response[i : i + n]) for i in range(len(response) - n + 1)]
        rates.append((len(grams) - len(set(grams))) / len(grams) if grams else 0.0)
    return torch.tensor(rates, dtype=torch.float32, device=tokens.device)
