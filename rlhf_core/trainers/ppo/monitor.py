"""Training-health watchers whose state goes into every checkpoint: the paper's collapse signals and the count of
non-finite updates."""

from __future__ import annotations

from pathlib import Path

from rlhf_core.checkpoint import list_checkpoints
from rlhf_core.config import MonitorConfig
from rlhf_core.errors import RLHFError


class CollapseMonitor:
    """The paper's early signals of a collapsing policy (sec. 5.2, fig. 4): KL to the SFT model, response length
    drifting from its first value, policy perplexity falling far below the reference's."""

    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg
        self.warnings = 0  # iterations with at least one signal
        self.first: str | None = None  # the first warning, for the MLflow tag and tricks.json
        self.initial_length: float | None = None  # mean response length of the first iteration
        self.last_healthy: int | None = None  # the last iteration without a warning

    def check(self, record: dict) -> list[str]:
        """The signals an iteration's ``record`` raises (empty: healthy)."""
        cfg, length = self.cfg, record["rollout/response_length"]
        if self.initial_length is None:
            self.initial_length = length
        reasons = []
        if record["objective/kl"] > cfg.collapse_kl:
            reasons.append(f"KL {record['objective/kl']:.2f} > ppo.monitor.collapse_kl={cfg.collapse_kl}")
        first = self.initial_length
        if length > first * cfg.collapse_length_ratio or length < first / cfg.collapse_length_ratio:
            reasons.append(f"response length {length:.1f} vs {first:.1f} at the start")
        if record["monitor/ppl_policy"] < cfg.collapse_ppl_ratio * record["monitor/ppl_ref"]:
            reasons.append(
                f"policy perplexity {record['monitor/ppl_policy']:.2f} < {cfg.collapse_ppl_ratio} x reference "
                f"{record['monitor/ppl_ref']:.2f}"
            )
        return reasons

    def observe(self, iteration: int, record: dict) -> list[str]:
        """Check ``record`` of ``iteration`` (1-based), count a warning, add ``monitor/collapse_warnings`` to it."""
        reasons = self.check(record)
        if reasons:
            self.warnings += 1
            if self.first is None:
                self.first = f"iteration {iteration}: {'; '.join(reasons)}"
        else:
            self.last_healthy = iteration
        record["monitor/collapse_warnings"] = self.warnings
        return reasons

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("warnings", "first", "initial_length", "last_healthy")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class NonFiniteGuard:
    """Counts minibatches in a row whose loss or gradient was non-finite (their updates are skipped) and stops
    the run after ``max_bad_steps`` of them, naming the last checkpoint to go back to."""

    def __init__(self, max_bad_steps: int, checkpoint_root: Path):
        self.max_bad_steps = max_bad_steps
        self.checkpoint_root = checkpoint_root
        self.in_a_row = 0

    def observe(self, bad: bool, iteration: int) -> None:
        self.in_a_row = self.in_a_row + 1 if bad else 0
        if self.in_a_row >= self.max_bad_steps:
            last = list_checkpoints(self.checkpoint_root)
            raise RLHFError(
                f"ppo: {self.in_a_row} non-finite updates in a row at iteration {iteration}; stopping. "
                f"Last good checkpoint: {last[-1] if last else 'none'} "
                "(lower ppo.policy_optim.lr / ppo.critic_optim.lr?)"
            )

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row = state["in_a_row"]
