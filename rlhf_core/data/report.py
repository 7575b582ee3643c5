"""What `rlhf prepare` tells the user on the console (and keeps in ``stats.json``): rows dropped per file and why,
pairs that were not pairs, prompts shared between splits, token limits derived from the data."""

from __future__ import annotations

import sys

from tqdm import tqdm

from rlhf_core.data.rows import BadRowLog

SHOWN_PLACES = 10  # rows named on one line; stats.json keeps more


class PrepareReport:
    """Collects the lines, prints each as it comes (stderr, so they survive a progress bar) and keeps them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)
        tqdm.write(f"prepare: {line}", file=sys.stderr)

    def token_limits(self, limits: dict, positions: int | None) -> None:
        if not limits["derived"]:
            return
        values = ", ".join(f"data.{name}={limits[name]}" for name in limits["derived"])
        room = f"; the model has {positions} positions" if positions else ""
        self.say(f"{values} derived from the data (the longest as the model's tokenizer encodes it{room})")

    def dropped_rows(self, bad: BadRowLog, source_stats: dict) -> None:
        """One line per file: how many of its rows were dropped and the reasons, most frequent first."""
        for file, counts in bad.by_file.items():
            dropped = sum(counts.values())
            total = bad.rows_read[file]
            reasons = ", ".join(f"{n:,} {reason}" for reason, n in counts.most_common())
            self.say(f"{file}: dropped {dropped:,} of {total:,} rows (data.on_bad_rows=skip): {reasons}")
        mismatched = source_stats.get("history_mismatch_dropped", 0)
        if mismatched:
            self.say(
                f"{source_stats['path']}: dropped {mismatched:,} pairs whose chosen and rejected transcripts "
                f"continue different dialogues ({_places(source_stats)})"
            )

    def shared_prompts(self, overlap: dict[str, int]) -> None:
        if overlap:
            pairs = ", ".join(f"{n:,} in both {key.replace('-', ' and ')}" for key, n in overlap.items())
            self.say(f"prompts shared between splits (the files share prompts; kept as they are): {pairs}")


def _places(source_stats: dict) -> str:
    """``lines 6, 10`` (or ``rows 3, 7``) of the first mismatched pairs."""
    places = source_stats["history_mismatch_rows"]
    numbers = [p.rsplit(" row ", 1)[-1] if " row " in p else p.rsplit(":", 1)[-1] for p in places[:SHOWN_PLACES]]
    more = len(places) > SHOWN_PLACES or source_stats["history_mismatch_dropped"] > len(places)
    unit = "rows" if " row " in places[0] else "lines"
    return f"{unit} {', '.join(numbers)}{', ...' if more else ''}"


def dropped_summary(bad: BadRowLog, source_stats: dict) -> str:
    """For the error when a split comes out empty: what was dropped on the way."""
    parts = [f"{bad.as_stats()['total']:,} bad rows skipped"]
    mismatched = source_stats.get("history_mismatch_dropped", 0)
    if mismatched:
        parts.append(f"{mismatched:,} pairs dropped because their transcripts continue different dialogues "
                     f"({source_stats['path']}, {_places(source_stats)})")  # fmt: skip
    return "; ".join(parts)
