"""The `prepare` stage: source -> validated, disjoint splits + tokenizer + stats.json.

Outputs under ``paths.data``: ``splits/<split>.jsonl``, ``tokenizer/`` (a Hugging Face tokenizer directory),
``stats.json`` and the resolved ``config.yaml``; each written atomically.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhf_core.config import Config, flatten, save_config
from rlhf_core.data.rows import RESPONSE_FIELDS, BadRowLog
from rlhf_core.data.sources import generate_sim, load_hh_rlhf, load_jsonl
from rlhf_core.data.tokenize import format_query
from rlhf_core.errors import DataError
from rlhf_core.io import atomic_directory, atomic_write_json, atomic_write_jsonl
from rlhf_core.models.tokenizer import load_pretrained_tokenizer, train_bpe_tokenizer
from rlhf_core.tracking import Logger, NullLogger

TOKENIZER_TRAINING_SPLITS = ("sft_train", "rm_train", "ppo")  # never the held-out splits


@dataclass(frozen=True)
class PrepareResult:
    data_dir: Path
    splits_dir: Path
    tokenizer_dir: Path
    stats_path: Path
    stats: dict

    def artifacts(self) -> dict[str, str]:
        return {
            "splits": str(self.splits_dir),
            "tokenizer": str(self.tokenizer_dir),
            "stats": str(self.stats_path),
        }


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


def prepare_data(config: Config, logger: Logger | None = None) -> PrepareResult:
    """Build the six splits, the tokenizer and ``stats.json`` for ``config.data.source``."""
    logger = logger or NullLogger()
    cfg = config.data
    bad = BadRowLog(cfg.on_bad_rows)
    if cfg.source == "sim":
        splits, source_stats = generate_sim(cfg)
    elif cfg.source == "hh_rlhf":
        splits, source_stats = load_hh_rlhf(cfg, bad)
    else:
        splits, source_stats = load_jsonl(cfg, bad)

    if config.model.name_or_path:
        tokenizer = load_pretrained_tokenizer(config.model.name_or_path)
    else:
        tokenizer = train_bpe_tokenizer(_tokenizer_corpus(splits), config.model.vocab_size)
    token_lengths = _enforce_token_limits(splits, tokenizer, config, bad)

    for split, rows in splits.items():
        if not rows:
            raise DataError(
                f"split '{split}' is empty after reading and validation ({bad.as_stats()['total']} bad rows "
                f"skipped); provide more rows or raise data.splits.{split}"
            )

    out = Path(config.paths.data)
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
    with atomic_directory(out / "splits") as tmp:
        for split, rows in splits.items():
            atomic_write_jsonl(tmp / f"{split}.jsonl", ({k: v for k, v in r.items() if k != "_src"} for r in rows))
    with atomic_directory(out / "tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)
    atomic_write_json(out / "stats.json", stats)
    save_config(config, out / "config.yaml")

    numeric = {
        f"data/{k}": v
        for k, v in flatten({"counts": stats["counts"], **source_stats}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    logger.log_metrics(numeric)
    logger.log_artifact(out / "stats.json")
    logger.log_artifact(out / "config.yaml")
    return PrepareResult(out, out / "splits", out / "tokenizer", out / "stats.json", stats)
