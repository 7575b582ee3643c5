"""Small statistics used to report evaluation numbers with their uncertainty."""

from __future__ import annotations

import math


def wilson_interval(successes: float, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (nan, nan) without trials.

    Unlike the normal approximation it stays inside [0, 1] and behaves at proportions near 0 or 1.
    """
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def markdown_table(rows: list[dict], columns: list[str], max_chars: int = 80) -> str:
    """A GitHub-flavoured Markdown table; long cells are shortened with an ellipsis, pipes escaped."""

    def cell(value) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        text = " ".join(text.split()).replace("|", "\\|")
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


VERDICTS = ("win", "tie", "lose")


def compare(score: float, baseline: float, tie_margin: float = 0.0) -> str:
    """Verdict of a response scored ``score`` against the baseline's ``baseline``: 'win' when it is higher by more
    than ``tie_margin``, 'lose' when lower by more, else 'tie'. Swapping the two swaps win and lose."""
    if score - baseline > tie_margin:
        return "win"
    if baseline - score > tie_margin:
        return "lose"
    return "tie"


def win_tie_lose(verdicts: list[str]) -> dict[str, float]:
    """Shares of win, tie and lose and the win rate with ties counted half (the paper's convention)."""
    n = len(verdicts)
    if n == 0:
        raise ValueError("win_tie_lose: no verdicts")
    unknown = set(verdicts) - set(VERDICTS)
    if unknown:
        raise ValueError(f"win_tie_lose: unknown verdicts {sorted(unknown)}")
    shares = {v: verdicts.count(v) / n for v in VERDICTS}
    return {**shares, "win_rate": shares["win"] + 0.5 * shares["tie"]}


def bootstrap_intervals(verdicts: list[str], samples: int, seed: int) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap 95% intervals of :func:`win_tie_lose`'s four numbers (prompts resampled)."""
    import random

    rng = random.Random(seed)
    n = len(verdicts)
    draws: dict[str, list[float]] = {k: [] for k in (*VERDICTS, "win_rate")}
    for _ in range(samples):
        stats = win_tie_lose([verdicts[rng.randrange(n)] for _ in range(n)])
        for key, value in stats.items():
            draws[key].append(value)
    out = {}
    for key, values in draws.items():
        values.sort()
        out[key] = (values[int(0.025 * (samples - 1))], values[int(round(0.975 * (samples - 1)))])
    return out


def mean_interval(values: list[float], z: float = 1.959964) -> tuple[float, float, float]:
    """Mean and its normal-approximation 95% interval (sample standard deviation; a single value has width 0)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1))
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half
