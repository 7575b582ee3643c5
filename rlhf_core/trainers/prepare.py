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
from rlhf_core.data.tokenize import encode_query, encode_response, format_query
from rlhf_core.errors import ConfigError, DataError
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


def _enforce_token_limits(splits, tokenizer, config: Config, bad: BadRowLog) -> dict[str, dict]:
    """Drop (or stop at) rows longer than the token limits, measured as the stages encode them (the model's chat
    template included); return length percentiles per field kind."""
    cfg = config.data
    prompt_lens = {s: [len(encode_query(tokenizer, r["prompt"])) for r in rows] for s, rows in splits.items()}
    response_lens = {
        split: {name: [len(encode_response(tokenizer, r[name])) for r in rows] for name in RESPONSE_FIELDS
                if rows and name in rows[0]}
        for split, rows in splits.items()
    }  # fmt: skip
    longest_prompt = max((n for lens in prompt_lens.values() for n in lens), default=0)
    longest_response = max(
        (n for fields in response_lens.values() for lens in fields.values() for n in lens), default=0
    )
    fits = f"(the longest with this tokenizer: prompt {longest_prompt}, response {longest_response} tokens)"
    lengths: dict[str, list[int]] = {"prompt": [], "response": []}
    for split, rows in splits.items():
        kept = []
        for i, row in enumerate(rows):
            where = row.get("_src", f"{split} row {i + 1}")
            n_prompt = prompt_lens[split][i]
            if n_prompt > cfg.max_prompt_tokens:
                bad.report(
                    where,
                    f"over-long prompt: {n_prompt} tokens > data.max_prompt_tokens={cfg.max_prompt_tokens} {fits}",
                )
                continue
            too_long = [name for name, lens in response_lens[split].items() if lens[i] > cfg.max_response_tokens]
            if too_long:
                n = response_lens[split][too_long[0]][i]
                bad.report(where, f"over-long {too_long[0]}: {n} tokens (with EOS) > data.max_response_tokens="
                                  f"{cfg.max_response_tokens} {fits}")  # fmt: skip
                continue
            lengths["prompt"].append(n_prompt)
            lengths["response"].extend(lens[i] for lens in response_lens[split].values())
            kept.append(row)
        splits[split] = kept
    return {
        kind: {f"p{q}": float(np.percentile(vals, q)) for q in (50, 90, 99)} | {"max": max(vals)}
        for kind, vals in lengths.items()
        if vals
    }


def _max_positions(model_path: str) -> int | None:
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    except (OSError, ValueError):
        return None  # the tokenizer load that follows names the problem


def _check_positions(config: Config, positions: int | None) -> None:
    """A prompt and a response at their limits must fit the model's positions."""
    total = config.data.max_prompt_tokens + config.data.max_response_tokens
    if positions is not None and total > positions:
        raise ConfigError(
            f"data.max_prompt_tokens + data.max_response_tokens = {total} exceeds the {positions} positions of "
            f"model.name_or_path={config.model.name_or_path}; lower them"
        )


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
        model_path = resolve(config.model.name_or_path, config.model.store)
        _check_positions(config, _max_positions(model_path))
        tokenizer = load_pretrained_tokenizer(model_path)
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
