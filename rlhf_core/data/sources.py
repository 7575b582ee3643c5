"""Data sources: the simulated domain, Anthropic HH-RLHF files and the user's own files -> the six splits.

Every source returns ``(splits, stats)`` where ``splits`` maps each split name of ``SPLIT_KINDS`` to rows and
prompts never occur in two splits (disjointness is by exact prompt text).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from statistics import mean

from rlhf_core.config import DataConfig
from rlhf_core.data.files import iter_records
from rlhf_core.data.judge import GoldJudge, annotator_prefers_first
from rlhf_core.data.rows import SPLIT_KINDS, BadRowLog, prompt_key, read_rows, validate_row
from rlhf_core.data.sim import CATEGORIES, Demonstrator, World
from rlhf_core.data.transcripts import split_transcript
from rlhf_core.errors import BadRow, DataError

SPLITS = tuple(SPLIT_KINDS)


def build_world(cfg: DataConfig) -> World:
    return World.generate(cfg.seed, cfg.sim.num_entities, cfg.sim.max_operand)


# ------------------------------------------------------------------------------------------------ sim
def generate_sim(cfg: DataConfig) -> tuple[dict[str, list[dict]], dict]:
    """Generate all splits of the simulated domain deterministically from ``cfg.seed``."""
    sim = cfg.sim
    world = build_world(cfg)
    judge = GoldJudge(world)
    demonstrator = Demonstrator(world, sim)
    rng = random.Random(f"{cfg.seed}-splits")
    weights = sim.categories.model_dump()
    categories = [c for c in CATEGORIES if weights[c] > 0]
    seen: set[str] = set()

    def fresh_task(category: str):
        for _ in range(200):
            task = world.sample_task(category, rng)
            if task.prompt not in seen:
                seen.add(task.prompt)
                return task
        raise DataError(
            f"the simulated domain ran out of distinct '{category}' prompts after {len(seen)} prompts in all "
            f"({skipped_ties} drawn for preference pairs were skipped as gold ties); lower data.splits sizes "
            f"or data.sim.categories.{category}, or make flaws likelier (data.sim.flaw_prob, data.sim.flaws)"
        )

    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    flaws: dict[str, Counter] = {"sft": Counter(), "rm": Counter()}
    demo_scores: list[float] = []
    agreement: dict[str, list[bool]] = {"rm_train": [], "rm_test": []}
    skipped_ties = 0
    sizes = cfg.splits.model_dump()
    for split in SPLITS:
        kind = SPLIT_KINDS[split]
        while len(splits[split]) < sizes[split]:
            category = rng.choices(categories, weights=[weights[c] for c in categories])[0]
            task = fresh_task(category)
            row = {"prompt": task.prompt, "category": category}
            if kind == "sft":
                response, flaw = demonstrator.respond(task, rng)
                flaws["sft"][flaw] += 1
                demo_scores.append(judge.score(task.prompt, response))
                row["response"] = response
            elif kind == "rm":
                first, flaw_a = demonstrator.respond(task, rng)
                score_a = judge.score(task.prompt, first)
                for _ in range(sim.max_pair_attempts):
                    second, flaw_b = demonstrator.respond(task, rng)
                    score_b = judge.score(task.prompt, second)
                    if score_b != score_a:
                        break
                else:
                    skipped_ties += 1  # the gold judge cannot order this pair; draw another prompt
                    continue
                flaws["rm"].update([flaw_a, flaw_b])
                prefers_first = annotator_prefers_first(score_a, score_b, sim.annotator_temperature, rng)
                agreement[split].append(prefers_first == (score_a > score_b))
                row["chosen"], row["rejected"] = (first, second) if prefers_first else (second, first)
            splits[split].append(row)

    all_agree = agreement["rm_train"] + agreement["rm_test"]
    stats = {
        "annotator_gold_agreement": {
            "overall": mean(all_agree),
            **{split: mean(values) for split, values in agreement.items()},
            "annotator_temperature": sim.annotator_temperature,
        },
        "demonstrator": {
            "flaw_prob": sim.flaw_prob,
            "sft_mean_gold_score": mean(demo_scores),
            "sft_flawless_rate": flaws["sft"]["none"] / sum(flaws["sft"].values()),
            "sft_flaws": dict(flaws["sft"]),
            "rm_response_flaws": dict(flaws["rm"]),
            "rm_pairs_skipped_as_gold_ties": skipped_ties,
        },
        "knowledge_base": {"entities": len(world.facts)},
    }
    return splits, stats


# ------------------------------------------------------------------------------------- file sources
def read_hh_rlhf(cfg: DataConfig, bad: BadRowLog) -> tuple[list[dict], dict]:
    """Pairs of HH-RLHF transcripts (columns ``data.columns.chosen`` / ``rejected``) split into the shared dialogue
    history and the two final answers. A pair whose histories differ is not a pair: dropped and counted, with
    where it was, in the stats (the real harmless test file has 5 of 2,312)."""
    pairs, mismatched = [], []
    names = (cfg.columns.chosen, cfg.columns.rejected)
    report, count = bad.reader(cfg.path)
    records = 0
    for where, obj in iter_records(cfg.path, cfg.file_format, report):
        records += 1
        try:
            if not isinstance(obj, dict):
                raise BadRow(f"expected a JSON object, got {type(obj).__name__}")
            for name in names:
                if not isinstance(obj.get(name), str):
                    raise BadRow(f"missing or non-string field '{name}' (HH-RLHF rows need {', '.join(names)})")
            prompt_c, chosen = split_transcript(obj[names[0]])
            prompt_r, rejected = split_transcript(obj[names[1]])
            if prompt_c != prompt_r:
                mismatched.append(where)  # reported and dropped: not a malformed row, just not a pair
                continue
            row = validate_row({"prompt": prompt_c, "chosen": chosen, "rejected": rejected}, "rm", cfg)
        except BadRow as exc:
            bad.report(where, str(exc), file=str(cfg.path))
            continue
        pairs.append({**row, "_src": where, "_file": str(cfg.path)})
    count(records)
    stats = {
        "path": str(cfg.path),
        "pairs_read": len(pairs),
        "history_mismatch_dropped": len(mismatched),
        "history_mismatch_rows": mismatched[:50],
    }
    return pairs, stats


def partition(rows: list[dict], sizes: dict[str, int], rng: random.Random) -> tuple[dict, dict]:
    """Split rows into ``sizes`` (in order) so that no prompt lands in two splits.

    Rows are grouped by prompt and groups are shuffled; when there are fewer rows than requested every
    size is scaled down by the same factor (reported), so the splits keep their proportions.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[prompt_key(row["prompt"])].append(row)
    order = list(groups)
    rng.shuffle(order)
    requested = sum(sizes.values())
    short = 0 < len(rows) < requested
    # Integer arithmetic: a float factor can round 15 down to 14.999... and lose a row.
    target = {name: (size * len(rows) // requested if short else size) for name, size in sizes.items()}
    factor = len(rows) / requested if short else 1.0
    out: dict[str, list[dict]] = {name: [] for name in sizes}
    names = iter(sizes)
    current = next(names, None)
    for prompt in order:
        while current is not None and len(out[current]) >= target[current]:
            current = next(names, None)
        if current is None:
            break
        room = target[current] - len(out[current])
        out[current].extend(groups[prompt][:room])  # leftover rows of this prompt are dropped
    info = {"requested": sizes, "scale": round(factor, 6)} if factor < 1 else {}
    return out, info


def _as_kind(rows: list[dict], kind: str) -> list[dict]:
    """Preference pairs as rows of ``kind``: SFT demonstrates the chosen answers, PPO and eval take the prompts."""

    def where(row: dict) -> dict:
        return {k: v for k, v in row.items() if k.startswith("_")}

    if kind == "sft":
        return [{"prompt": r["prompt"], "response": r["chosen"], **where(r)} for r in rows]
    if kind == "prompt":
        return [{"prompt": r["prompt"], **where(r)} for r in rows]
    return rows


def load_hh_rlhf(cfg: DataConfig, bad: BadRowLog) -> tuple[dict[str, list[dict]], dict]:
    pairs, stats = read_hh_rlhf(cfg, bad)
    rng = random.Random(f"{cfg.seed}-splits")
    parts, scaling = partition(pairs, cfg.splits.model_dump(), rng)
    splits = {name: _as_kind(rows, SPLIT_KINDS[name]) for name, rows in parts.items()}
    if scaling:
        stats["scaled_splits"] = scaling
    return splits, stats


def load_files(cfg: DataConfig, bad: BadRowLog) -> tuple[dict[str, list[dict]], dict]:
    """``data.sft_file``, ``rm_file`` and ``ppo_file`` (each in any format of ``data.files``) -> the six splits."""
    rng = random.Random(f"{cfg.seed}-splits")
    sizes = cfg.splits.model_dump()
    pools = {
        ("sft_train", "sft_val"): (cfg.sft_file, "sft"),
        ("rm_train", "rm_test"): (cfg.rm_file, "rm"),
        ("ppo", "eval"): (cfg.ppo_file, "prompt"),
    }
    splits: dict[str, list[dict]] = {}
    stats: dict = {"scaled_splits": {}}
    for names, (path, kind) in pools.items():
        rows = read_rows(path, kind, cfg, bad)
        parts, scaling = partition(rows, {n: sizes[n] for n in names}, rng)
        splits.update(parts)
        if scaling:
            stats["scaled_splits"][kind] = scaling
    prompts = {name: {prompt_key(r["prompt"]) for r in rows} for name, rows in splits.items()}
    overlap = {
        f"{a}-{b}": len(prompts[a] & prompts[b])  # "&" is not allowed in an MLflow metric name
        for i, a in enumerate(SPLITS)
        for b in SPLITS[i + 1 :]
        if prompts[a] & prompts[b]
    }
    stats["cross_split_prompt_overlap"] = overlap  # files are the user's; we report, not silently drop
    return splits, stats
