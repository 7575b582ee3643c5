"""The `prepare` stage: source -> validated, disjoint splits + tokenizer + stats.json.

Outputs (committed to ``paths.data`` by the stage scaffold, which adds ``config.yaml``): ``splits/<split>.jsonl``,
``tokenizer/`` (a Hugging Face tokenizer directory) and ``stats.json`` (the stage's DVC metrics).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from rlhf_core.config import Config, flatten
from rlhf_core.data.limits import derive_limits
from rlhf_core.data.report import PrepareReport, dropped_summary
from rlhf_core.data.rows import RESPONSE_FIELDS, BadRowLog
from rlhf_core.data.sources import generate_sim, load_files, load_hh_rlhf
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


def _token_lengths(splits, tokenizer) -> tuple[dict, dict]:
    """Tokens of every prompt and response, measured as the stages encode them (the model's chat template
    included): ``{split: [n]}`` and ``{split: {field: [n]}}``."""
    prompts = {s: [len(encode_query(tokenizer, r["prompt"])) for r in rows] for s, rows in splits.items()}
    responses = {
        split: {name: [len(encode_response(tokenizer, r[name])) for r in rows] for name in RESPONSE_FIELDS
                if rows and name in rows[0]}
        for split, rows in splits.items()
    }  # fmt: skip
    return prompts, responses


def _longest(prompt_lens: dict, response_lens: dict) -> tuple[int, int]:
    return (
        max((n for lens in prompt_lens.values() for n in lens), default=0),
        max((n for fields in response_lens.values() for lens in fields.values() for n in lens), default=0),
    )


def _limit_notes(limits: dict, longest: tuple[int, int]) -> dict[str, str]:
    """What an over-long row's error adds after each limit: the longest lengths, and for a derived limit (which
    cuts rows only where the model's positions cannot hold the longest prompt and response) what to set."""
    fits = f"(the longest with this tokenizer: prompt {longest[0]}, response {longest[1]} tokens)"
    derived = (f"{fits[:-1]}; derived to share the model's {limits['positions']} positions: set "
               "data.max_prompt_tokens and data.max_response_tokens, or data.on_bad_rows=skip)")  # fmt: skip
    names = ("max_prompt_tokens", "max_response_tokens")
    return {name: derived if name in limits["derived"] else fits for name in names}


def _enforce_token_limits(splits, lengths: tuple[dict, dict], limits: dict, bad: BadRowLog) -> dict[str, dict]:
    """Drop (or stop at) rows longer than the token limits; return length percentiles per field kind."""
    prompt_lens, response_lens = lengths
    note = _limit_notes(limits, _longest(prompt_lens, response_lens))
    max_prompt, max_response = limits["max_prompt_tokens"], limits["max_response_tokens"]
    kept_lengths: dict[str, list[int]] = {"prompt": [], "response": []}
    for split, rows in splits.items():
        kept = []
        for i, row in enumerate(rows):
            where, file = row.get("_src", f"{split} row {i + 1}"), row.get("_file", split)
            n_prompt = prompt_lens[split][i]
            if n_prompt > max_prompt:
                bad.report(where, f"over-long prompt: {n_prompt} tokens > data.max_prompt_tokens={max_prompt} "
                                  f"{note['max_prompt_tokens']}", file=file)  # fmt: skip
                continue
            too_long = [name for name, lens in response_lens[split].items() if lens[i] > max_response]
            if too_long:
                n = response_lens[split][too_long[0]][i]
                bad.report(where, f"over-long {too_long[0]}: {n} tokens (with EOS) > data.max_response_tokens="
                                  f"{max_response} {note['max_response_tokens']}", file=file)  # fmt: skip
                continue
            kept_lengths["prompt"].append(n_prompt)
            kept_lengths["response"].extend(lens[i] for lens in response_lens[split].values())
            kept.append(row)
        splits[split] = kept
    return {
        kind: {f"p{q}": float(np.percentile(vals, q)) for q in (50, 90, 99)} | {"max": max(vals)}
        for kind, vals in kept_lengths.items()
        if vals
    }


def _max_positions(model_path: str) -> int | None:
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    except (OSError, ValueError):
        return None  # the tokenizer load that follows names the problem


def _model_positions(config: Config, model_path: str | None) -> int | None:
    """How many positions a prompt and its response share: the tiny model's setting or the pretrained config's."""
    if model_path is None:
        return config.model.max_position_embeddings
    return _max_positions(model_path)


def _read_source(config: Config, bad: BadRowLog) -> tuple[dict[str, list[dict]], dict]:
    cfg = config.data
    if cfg.source == "sim":
        return generate_sim(cfg)
    if cfg.source == "hh_rlhf":
        return load_hh_rlhf(cfg, bad)
    return load_files(cfg, bad)


def _load_tokenizer(config: Config, splits: dict[str, list[dict]]):
    """(tokenizer, model path or None): the pretrained model's own, or a BPE trained on the training splits."""
    if config.model.name_or_path:
        model_path = resolve(config.model.name_or_path, config.model.store)
        return load_pretrained_tokenizer(model_path), model_path
    return train_bpe_tokenizer(_tokenizer_corpus(splits), config.model.vocab_size), None


def prepare_data(config: Config, out: Path, logger: Logger) -> StageResult:
    """Build the six splits, the tokenizer and ``stats.json`` for ``config.data.source`` in ``out``."""
    cfg = config.data
    bad = BadRowLog(cfg.on_bad_rows)
    splits, source_stats = _read_source(config, bad)
    _check_splits_filled(splits, bad, source_stats)
    tokenizer, model_path = _load_tokenizer(config, splits)
    lengths = _token_lengths(splits, tokenizer)
    positions = _model_positions(config, model_path)
    limits = derive_limits(cfg.max_prompt_tokens, cfg.max_response_tokens, _longest(*lengths), positions)
    limits["positions"] = positions
    if not limits["derived"]:
        _check_positions(config, positions)
    token_lengths = _enforce_token_limits(splits, lengths, limits, bad)
    report = PrepareReport()
    report.token_limits(limits, positions)
    report.dropped_rows(bad, source_stats)
    report.shared_prompts(source_stats.get("cross_split_prompt_overlap", {}))

    _check_splits_filled(splits, bad, source_stats)

    stats = {
        "source": cfg.source,
        "counts": {split: len(rows) for split, rows in splits.items()},
        "categories": {
            split: dict(sorted(Counter(r["category"] for r in rows).items()))
            for split, rows in splits.items()
            if rows and "category" in rows[0]
        },
        "token_lengths": token_lengths,
        "token_limits": limits,
        "tokenizer": {"vocab_size": len(tokenizer), "trained": config.model.name_or_path is None},
        "bad_rows": bad.as_stats(),
        **source_stats,
        "report": report.lines,
    }
    for split, rows in splits.items():
        atomic_write_jsonl(
            out / "splits" / f"{split}.jsonl", ({k: v for k, v in r.items() if not k.startswith("_")} for r in rows)
        )
    tokenizer.save_pretrained(out / "tokenizer")
    atomic_write_json(out / "stats.json", stats)
    numeric = {
        f"data/{k}": v
        for k, v in flatten(
            {"counts": stats["counts"], "bad_rows": stats["bad_rows"]["total"], "token_limits": limits, **source_stats}
        ).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return StageResult(
        metrics=numeric,
        artifacts={"splits": "splits", "tokenizer": "tokenizer", "stats": "stats.json"},
        logged=("stats.json",),
        metrics_file=None,
    )


def _check_splits_filled(splits: dict[str, list[dict]], bad: BadRowLog, source_stats: dict) -> None:
    for split, rows in splits.items():
        if not rows:
            raise DataError(
                f"split '{split}' is empty after reading and validation ({dropped_summary(bad, source_stats)})"
                f"; provide more rows or raise data.splits.{split}"
            )


def _model_named(config: Config) -> str:
    if config.model.name_or_path:
        return f"model.name_or_path={config.model.name_or_path}"
    return "the tiny model (model.max_position_embeddings)"


def _check_positions(config: Config, positions: int | None) -> None:
    """A prompt and a response at their set limits must fit the model's positions."""
    total = config.data.max_prompt_tokens + config.data.max_response_tokens
    if positions is not None and total > positions:
        raise ConfigError(
            f"data.max_prompt_tokens + data.max_response_tokens = {total} exceeds the {positions} positions of "
            f"{_model_named(config)}; lower them, or set them to null to derive them from the data"
        )
