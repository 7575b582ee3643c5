"""The `prepare` stage: source -> validated, disjoint splits + tokenizer + stats.json.

Outputs (committed to ``paths.data`` by the stage scaffold, which adds ``config.yaml``): ``splits/<split>.jsonl``,
``tokenizer/`` (a Hugging Face tokenizer directory) and ``stats.json`` (the stage's DVC metrics).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from rlhf_core.config import Config, flatten
from rlhf_core.data.rows import RESPONSE_FIELDS, BadRowLog
from rlhf_core.data.sources import generate_sim, load_hh_rlhf, load_jsonl
from rlhf_core.data.tokenize import format_query
from rlhf_core.errors import DataError
from rlhf_core.io import atomic_write_json, atomic_write_jsonl
from rlhf_core.models.store import resolve
from rlhf_core.models.tokenizer import load_pretrained_tokenizer, train_bpe_tokenizer
from rlhf_core.tracking import Logger
from rlhf_core.trainers.results import StageResult

TOKENIZER_TRAINING_SPLITS = ("sft_train", "rm_train", "ppo")  # never the held-out splits


def _tokenizer_corpus(splits: dict[str, list[dict]]):
    for split in TOKENIZER_TRAINING_SPLITS:
        for row in splits[split]:
            yield format_query(row["prompt"])
            for name in RESPONSE_FIELDS:
                if name in row:
                    yield " " + row[name]


def _token_lengths(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _enforce_token_limits(splits, tokenizer, config: Config, bad: BadRowLog) -> dict[str, dict]:
    """Drop (or stop at) rows longer than the token limits; return length percentiles per field kind."""
    cfg = config.data
    lengths: dict[str, list[int]] = {"prompt": [], "response": []}
    for split, rows in splits.items():
        prompt_lens = [n + 1 for n in _token_lengths(tokenizer, [format_query(r["prompt"]) for r in rows])]
        response_lens = {
            name: [n + 1 for n in _token_lengths(tokenizer, [" " + r[name] for r in rows])]
            for name in RESPONSE_FIELDS
            if rows and name in rows[0]
        }
        kept = []
        for i, row in enumerate(rows):
            where = row.get("_src", f"{split} row {i + 1}")
            if prompt_lens[i] > cfg.max_prompt_tokens:
                bad.report(
                    where,
                    f"over-long prompt: {prompt_lens[i]} tokens > data.max_prompt_tokens={cfg.max_prompt_tokens}",
                )
                continue
            too_long = [name for name, lens in response_lens.items() if lens[i] > cfg.max_response_tokens]
            if too_long:
                n = response_lens[too_long[0]][i]
                bad.report(
                    where,
                    f"over-long {too_long[0]}: {n} tokens (with EOS) > data.max_response_tokens="
                    f"{cfg.max_response_tokens}",
                )
                continue
            lengths["prompt"].append(prompt_lens[i])
            for lens in response_lens.values():
                lengths["response"].append(lens[i])
            kept.append(row)
        splits[split] = kept
    return {
        kind: {f"p{q}": float(np.percentile(vals, q)) for q in (50, 90, 99)} | {"max": max(vals)}
        for kind, vals in lengths.items()
        if vals
    }


def prepare_data(config: Config, out: Path, logger: Logger) -> StageResult:
    """Build the six splits, the tokenizer and ``stats.json`` for ``config.data.source`` in ``out``."""
    cfg = config.data
    bad = BadRowLog(cfg.on_bad_rows)
    if cfg.source == "sim":
        splits, source_stats = generate_sim(cfg)
    elif cfg.source == "hh_rlhf":
        splits, source_stats = load_hh_rlhf(cfg, bad)
    else:
        splits, source_stats = load_jsonl(cfg, bad)

    if config.model.name_or_path:
        tokenizer = load_pretrained_tokenizer(resolve(config.model.name_or_path, config.model.store))
    else:
        tokenizer = train_bpe_tokenizer(_tokenizer_corpus(splits), config.model.vocab_size)
    token_lengths = _enforce_token_limits(splits, tokenizer, config, bad)

    for split, rows in splits.items():
        if not rows:
            raise DataError(
                f"split '{split}' is empty after reading and validation ({bad.as_stats()['total']} bad rows "
                f"skipped); provide more rows or raise data.splits.{split}"
            )

    stats = {
        "source": cfg.source,
        "counts": {split: len(rows) for split, rows in splits.items()},
        "categories": {
            split: dict(sorted(Counter(r["category"] for r in rows).items()))
            for split, rows in splits.items()
            if rows and "category" in rows[0]
        },
        "token_lengths": token_lengths,
        "tokenizer": {"vocab_size": len(tokenizer), "trained": config.model.name_or_path is None},
        "bad_rows": bad.as_stats(),
        **source_stats,
    }
    for split, rows in splits.items():
        atomic_write_jsonl(
            out / "splits" / f"{split}.jsonl", ({k: v for k, v in r.items() if k != "_src"} for r in rows)
        )
    tokenizer.save_pretrained(out / "tokenizer")
    atomic_write_json(out / "stats.json", stats)
    numeric = {
        f"data/{k}": v
        for k, v in flatten({"counts": stats["counts"], **source_stats}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return StageResult(
        metrics=numeric,
        artifacts={"splits": "splits", "tokenizer": "tokenizer", "stats": "stats.json"},
        logged=("stats.json",),
        metrics_file=None,
    )
