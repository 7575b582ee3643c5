"""PPO speed against the peer: our trainer and TRL's PPOTrainer on the same workload, alternating in one run.

    .venv/bin/python bench/ppo_speed.py                           # 3 repeats x (ours, TRL), 20 iterations each
    .venv/bin/python bench/ppo_speed.py --iterations 2 --repeats 1  # smoke run
    # SmolLM2-135M at the sim recipe's PPO sizes, bf16, full fine-tuning (add --set model.lora.enabled=true for LoRA)
    .venv/bin/python bench/ppo_speed.py --base outputs/smollm2-sim --iterations 4 --repeats 2 \
        --set distributed.bf16=true --set data.max_response_tokens=64 --set ppo.rollout_size=32 \
        --set ppo.minibatch_size=16 --set ppo.micro_batch_size=16 --set ppo.forward_batch_size=32 \
        --results bench/results/ppo_speed_smollm2_full.json

The workload is the default pipeline's PPO stage: the tiny Llama SFT policy (outputs/sft), the reward model
(outputs/rm, also the critic's / value model's initialisation), the byte-level BPE tokenizer and the PPO prompts
(outputs/data), 64 samples per rollout, minibatches of 32, one epoch, at most 80 new tokens, temperature 0.8, stop
at EOS, k1 KL penalty with a fixed coefficient 0.05, GAE (gamma 1, lambda 0.9), clipped policy and value losses,
advantage whitening. Both trainers get the same prompts in the same order, token for token: our trainer's
prompt order and ``encode_query`` ids are written to a spec file for the TRL side. Where one trainer cannot do
what the other does, the other is set to match (nucleus sampling and repetition penalty off, PPO-ptx, critic
warm-up, reward normalisation and gradient clipping off on our side); what still differs is listed in
``DIFFERENCES`` and printed under the table.

TRL (trl 1.12.0, the last release with a PPO trainer, ``trl.experimental.ppo``) is never a project dependency:
bench/setup_trl_venv.sh installs it into ``.venv-trl`` (run here when needed) and bench/_trl_ppo_worker.py runs it
there. Every run is a fresh subprocess, so its peak memory is its own maximum resident set size (``wait4``).
Runs alternate ours / TRL, the first of each pair swapping every repeat, so a drift in machine load hits both.
Each run does ``--warmup`` + ``--iterations`` PPO iterations; the warm-up ones are left out.

Reported per trainer: samples/s and generated tokens/s (over whole iterations), seconds per iteration split into
generation / scoring (reward, reference, value forwards, advantages) / training (the PPO update and the
iteration's bookkeeping up to the next rollout), peak RSS; and the ratio ours/TRL of each. Our phases are the
trainer's own ``time/generation|scoring|training`` history entries (plus the bookkeeping after ``time/training``,
timed up to the next rollout); TRL's are timed around the functions its ``train()`` calls (see
bench/_trl_ppo_worker.py). After a few updates the two policies may sample different answers (a policy that
learns to answer at length makes every later phase slower), so two more views compare like with like: the
iterations whose rollouts are the same in both (the first always is; warm-up included), and each phase's time per
padded rollout token (samples x generated width). Writes ``bench/results/ppo_speed.json`` (settings, versions, the
CPU, every run's per-iteration numbers) and prints a table; ``--summarise RESULTS`` reprints a results file.
Needs the default pipeline's outputs (``make run``). Timings are only meaningful on an otherwise idle machine: the
load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.real_model_options import cpu_description  # noqa: E402

SETUP_SCRIPT = REPO / "bench" / "setup_trl_venv.sh"
TRL_WORKER = REPO / "bench" / "_trl_ppo_worker.py"

# Our side: PPO-max with the switches TRL has no counterpart for turned off, and sampling TRL can do.
OURS_OVERRIDES = [
    "tracking.enabled=false",
    "ppo.preset=ppo_max",
    "ppo.tricks.ptx=false",  # TRL has no PPO-ptx (it would add an SFT forward/backward per micro-batch)
    "ppo.tricks.critic_warmup=false",  # TRL updates the policy from the first iteration
    "ppo.tricks.reward_norm=false",  # TRL uses the raw reward-model score
    "ppo.tricks.reward_clip=false",
    "ppo.tricks.global_grad_clip=false",  # TRL's PPO loop never clips gradients
    "ppo.sampling.top_p=1.0",  # TRL samples with temperature only: no nucleus ...
    "ppo.sampling.repetition_penalty=1.0",  # ... and no repetition penalty
    "ppo.checkpoint.resume=never",  # and the worker drives the iterations itself: no checkpoints
]

# What still differs after the settings above (printed with the results and stored in the JSON).
DIFFERENCES = [
    "Rollout log-probs: TRL takes the policy's log-probs from the logits generate() returns (output_scores=True), "
    "so its scoring phase runs 3 forwards (reference, value, reward); ours runs 4 (a separate policy forward, which "
    "also gives the entropy and perplexity it monitors). TRL keeps the (batch, steps, vocab) logits of the whole "
    "generation for that.",
    "Update: TRL wraps policy and value model in one module with one AdamW (one learning rate, "
    "ours' policy_lr, for both) and one backward of policy + vf_coef x value loss per micro-batch; ours has two "
    "engines (policy and critic, own optimizers and learning rates 3e-5 / 1e-4) and two backward passes. Same "
    "forward/backward work; TRL's default AdamW is torch's fused kernel (adamw_torch_fused), ours the default "
    "torch.optim.AdamW.",
    "Per-iteration extras: TRL computes the full-vocabulary entropy of every update micro-batch (no_grad), reads its "
    "metrics with .item(), and runs gc.collect() twice per iteration (after the rollout and at its end), which walks "
    "the whole Python heap of the process; ours computes entropy, policy and reference perplexity, repetition rate "
    "and decodes the responses to text, plus its collapse monitor.",
    "Advantage whitening: TRL whitens over the whole rollout once, ours per minibatch; value loss: TRL 0.5 x the "
    "clipped squared error, averaged over response positions + 1; the score goes on the token after EOS in TRL, on "
    "EOS in ours. None of these changes the amount of computation.",
    "Responses: same prompts, sampler and seed, and both use torch's global generator for sampling only, so the two "
    "usually draw the very same responses; small differences in the updates can make later ones differ (and with "
    "them the generation time). The table counts the iterations whose response token totals match.",
    "Left out of ours: the gold-judge scores of the simulated domain (monitoring only; the bench switches them off) "
    "and the evaluation on held-out prompts after the last iteration (not timed either way). Left out of TRL: its "
    "periodic sample generations (num_sample_generations=0). Neither saves checkpoints.",
    "Both run without gradient checkpointing (TRL's PPOConfig default; set off here), with dropout off, and in fp32 "
    "unless --set distributed.bf16=true, which turns on bf16 autocast in both (ours over every forward of the "
    "stage, TRL's through accelerate's mixed precision).",
    "With --set model.lora.enabled=true both train LoRA adapters of the same rank, alpha and target modules on the "
    "policy and use it with its adapters off as the reference; ours also puts adapters on the critic, TRL's value "
    "model trains in full.",
]

PHASES = ("generation", "scoring", "training")


# ---------------------------------------------------------------------------------------------- workload
def required_inputs(base: Path) -> list[Path]:
    return [
        base / "data" / "tokenizer",
        base / "data" / "splits" / "ppo.jsonl",
        base / "sft" / "model" / "config.json",
        base / "rm" / "model" / "config.json",
    ]


def ours_overrides(base: Path, ppo_dir: Path, steps: int, extra: list[str]) -> list[str]:
    return [
        *OURS_OVERRIDES,
        *(f"paths.{name}={base / name}" for name in ("data", "sft", "rm")),
        f"paths.ppo={ppo_dir}",
        f"ppo.steps={steps}",
        *extra,
    ]


def workload(config, steps: int) -> tuple[list[list[list[int]]], dict]:
    """Our trainer's prompt batches (token ids, in its order) and the settings the TRL side copies."""
    from rlhf_core.data.limits import response_token_limit
    from rlhf_core.data.order import global_order
    from rlhf_core.data.rows import load_split
    from rlhf_core.data.tokenize import encode_query
    from rlhf_core.models.tokenizer import load_tokenizer

    ppo = config.ppo
    tricks = ppo.resolved_tricks()
    tokenizer = load_tokenizer(Path(config.paths.data) / "tokenizer")
    prompts = [r["prompt"] for r in load_split(config.paths.data, "ppo", config.data)]
    order = global_order(len(prompts), steps * ppo.rollout_size, ppo.seed)  # what train_ppo draws
    batches = [
        [encode_query(tokenizer, prompts[i]) for i in order[k * ppo.rollout_size : (k + 1) * ppo.rollout_size]]
        for k in range(steps)
    ]
    settings = {
        "seed": ppo.seed,
        "rollout_size": ppo.rollout_size,
        "minibatch_size": ppo.minibatch_size,
        "micro_batch_size": ppo.micro_batch_size,
        "forward_batch_size": ppo.forward_batch_size,
        "epochs": ppo.epochs,
        "max_new_tokens": response_token_limit(config),
        **ppo.sampling.model_dump(),
        "kl_coef": tricks.kl_coef,
        "kl_estimator": tricks.kl_estimator,
        "kl_controller": tricks.kl_controller,
        "cliprange": ppo.cliprange,
        "cliprange_value": ppo.cliprange_value,
        "vf_coef": ppo.vf_coef,
        "gamma": ppo.gamma,
        "lam": ppo.lam,
        "policy_lr": ppo.policy_optim.lr,
        "critic_lr": ppo.critic_optim.lr,
        "weight_decay": ppo.policy_optim.weight_decay,
        "adam_beta1": ppo.policy_optim.adam_beta1,
        "adam_beta2": ppo.policy_optim.adam_beta2,
        "adam_eps": ppo.policy_optim.adam_eps,
        "critic_from_rm": tricks.critic_from_rm,
    }
    # The TRL side can reproduce only this corner of our configuration; stop rather than compare different work.
    unsupported = {
        "top_p": settings["top_p"] != 1.0,
        "repetition_penalty": settings["repetition_penalty"] != 1.0,
        "kl_estimator": settings["kl_estimator"] not in ("k1", "k3"),
        "kl_controller": settings["kl_controller"] != "fixed",
        "kl_penalty": not tricks.kl_penalty,
        "ptx": tricks.ptx,
        "critic_warmup": tricks.critic_warmup,
        "critic_from_rm": not tricks.critic_from_rm,
        "entropy_bonus": tricks.entropy_bonus,
        "micro_batch_size": ppo.micro_batch_size != ppo.minibatch_size,
        "missing_eos_penalty": ppo.missing_eos_penalty is not None,
        "lr_schedule": any(o.lr_schedule != "constant" or o.warmup_ratio for o in (ppo.policy_optim, ppo.critic_optim)),
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        sys.exit(f"ppo_speed: the TRL side cannot run this configuration ({', '.join(bad)}); drop those --set")
    return batches, settings


# ---------------------------------------------------------------------------------------------- our worker
def run_ours_worker(spec_path: Path, out_path: Path) -> None:
    """One run of our trainer in this (fresh) process; writes its per-iteration numbers to ``out_path``."""
    import resource

    started = time.perf_counter()
    spec = json.loads(spec_path.read_text())
    from rlhf_core.env import apply_defaults

    apply_defaults()  # before transformers is imported
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    import transformers

    from rlhf_core import distributed
    from rlhf_core.config import load_config
    from rlhf_core.io import atomic_write_json
    from rlhf_core.trainers.ppo.iteration import ppo_iteration, start_run

    config = load_config(REPO / "params.yaml", spec["overrides"])
    # Not part of the compared workload (see DIFFERENCES): the sim-only gold judge, and the stage around the
    # iterations (checkpoints, final evaluation on held-out prompts). The worker drives the phases itself.
    left_out = ["gold judge", "final eval comparison", "checkpoints"]
    ctx = distributed.setup(config.distributed)
    run = start_run(config, ctx, Path(config.paths.ppo) / "checkpoints", gold_judge=False)
    run.start_ptx(0)
    setup_seconds, rss_kib = time.perf_counter() - started, _rss_kib()
    records = []
    for step in range(config.ppo.steps):
        iteration_started = time.perf_counter()
        record, exp = ppo_iteration(run, step)
        run.monitor.observe(step + 1, record)  # the stage's per-iteration bookkeeping; TRL's is in its training
        wall = time.perf_counter() - iteration_started
        # What the iteration did outside its three timed phases (the collapse monitor, metric reductions) counts
        # as training, where TRL's counterpart sits.
        tail = max(wall - sum(record[f"time/{p}"] for p in PHASES), 0.0)
        records.append(
            {
                "iteration": record["step"],
                "generation": record["time/generation"],
                "scoring": record["time/scoring"],
                "training": record["time/training"] + tail,
                "training_tail": tail,
                "response_tokens": round(record["rollout/response_length"] * config.ppo.rollout_size),
                "samples": config.ppo.rollout_size,
                "eos_rate": record["rollout/eos_rate"],
                "generated_width": exp.response_width,
                "objective/scores": record["objective/scores"],
                "objective/kl": record["objective/kl"],
                # positions computed per real token, at the buffer's width and as our forwards are cut (issue 24)
                **{k.removeprefix("batch/"): v for k, v in record.items() if k.startswith("batch/")},
            }
        )
    atomic_write_json(
        out_path,
        {
            "trainer": "ours",
            "records": records,
            "setup_seconds": setup_seconds,
            "rss_kib_at_first_iteration": rss_kib,
            "self_max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "torch_threads": torch.get_num_threads(),
            "left_out": left_out,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        },
    )


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------------------------- the parent
def setup_trl_venv(venv: Path) -> str:
    """Run bench/setup_trl_venv.sh (idempotent); returns its versions line."""
    done = subprocess.run(
        ["bash", str(SETUP_SCRIPT)], env={**os.environ, "VENV": str(venv)}, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"ppo_speed: {SETUP_SCRIPT.name} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def run_child(command: list[str], log: Path) -> tuple[int, float, int, float]:
    """Run ``command`` with output to ``log``: (exit code, wall seconds, its peak RSS in KiB and its CPU seconds,
    both from wait4)."""
    started = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    return process.returncode, time.perf_counter() - started, usage.ru_maxrss, usage.ru_utime + usage.ru_stime


def summarise(runs: list[dict], warmup: int) -> dict:
    """Pooled over the measured iterations of every run of one trainer."""
    measured = [rec for run in runs for rec in run["records"][warmup:]]
    n = len(measured)
    total = {key: sum(rec[key] for rec in measured) for key in (*PHASES, "response_tokens", "samples")}
    seconds = sum(total[p] for p in PHASES)
    per_run = [sum(rec[p] for rec in run["records"][warmup:] for p in PHASES) / len(run["records"][warmup:])
               for run in runs]  # fmt: skip
    summary = {
        "runs": len(runs),
        "iterations": n,
        "samples_per_second": total["samples"] / seconds,
        "tokens_per_second": total["response_tokens"] / seconds,
        "generation_tokens_per_second": total["response_tokens"] / total["generation"],
        "seconds_per_iteration": seconds / n,
        **{f"{p}_seconds_per_iteration": total[p] / n for p in PHASES},
        "seconds_per_iteration_per_run": per_run,
        "response_length": total["response_tokens"] / total["samples"],
        "eos_rate": sum(rec["eos_rate"] for rec in measured) / n,
        "peak_rss_mib": max(run["max_rss_kib"] for run in runs) / 1024,
        "rss_at_first_iteration_mib": max(run["rss_kib_at_first_iteration"] for run in runs) / 1024,
        "setup_seconds": sum(run["setup_seconds"] for run in runs) / len(runs),
    }
    widths = [rec["generated_width"] for rec in measured if rec.get("generated_width") is not None]
    summary["generated_width"] = sum(widths) / len(widths) if widths else None
    tails = [rec["training_tail"] for rec in measured if "training_tail" in rec]
    if tails:
        summary["training_tail_seconds_per_iteration"] = sum(tails) / len(tails)
    return summary


def record_pairs(runs: dict[str, list[dict]]) -> list[tuple[dict, dict]]:
    """(ours, TRL) records of the same iteration in the same repeat, warm-up included."""
    return [
        (a, b)
        for ours_run, trl_run in zip(runs["ours"], runs["trl"], strict=True)
        for a, b in zip(ours_run["records"], trl_run["records"], strict=True)
    ]


def same_work(runs: dict[str, list[dict]]) -> dict:
    """Both trainers on token-for-token the same work: the iterations (warm-up included) whose rollouts have the
    same response-token total and padded width in the same repeat. The first iteration always qualifies (same
    prompts, weights, sampler and seed); after an update the two policies may sample different answers, and then
    per-iteration times compare different amounts of work."""
    pairs = [
        (a, b)
        for a, b in record_pairs(runs)
        if (a["response_tokens"], a.get("generated_width")) == (b["response_tokens"], b.get("generated_width"))
    ]
    if not pairs:
        return {"iterations": 0}
    result: dict = {"iterations": len(pairs), "iteration_numbers": [a["iteration"] for a, _ in pairs]}
    for side, index in (("ours", 0), ("trl", 1)):
        records = [pair[index] for pair in pairs]
        result[side] = {f"{p}_seconds": sum(r[p] for r in records) / len(records) for p in PHASES}
        result[side]["seconds"] = sum(result[side][f"{p}_seconds"] for p in PHASES)
    return result


def padded_token_rates(runs: list[dict], warmup: int) -> dict:
    """Milliseconds per padded rollout token (samples x generated width) of each phase over the measured
    iterations: per-iteration times normalised for how long the sampled answers ran."""
    measured = [rec for run in runs for rec in run["records"][warmup:] if rec.get("generated_width")]
    padded = sum(rec["samples"] * rec["generated_width"] for rec in measured)
    return {f"{p}_ms_per_padded_token": 1000 * sum(rec[p] for rec in measured) / padded for p in PHASES}


def real_token_rates(runs: list[dict], warmup: int) -> dict:
    """Seconds per 1,000 real (unpadded) response tokens of each phase over the measured iterations; for ours
    also the mean positions computed per real token in scoring and the update (and at the buffer's full width)."""
    measured = [rec for run in runs for rec in run["records"][warmup:]]
    tokens = sum(rec["response_tokens"] for rec in measured)
    out = {f"{p}_s_per_1k_response_tokens": 1000 * sum(rec[p] for rec in measured) / tokens for p in PHASES}
    for key in ("full_positions_per_token", "scoring_positions_per_token", "update_positions_per_token"):
        if measured and key in measured[0]:
            out[key] = sum(rec[key] for rec in measured) / len(measured)
    return out


# (label, summary key, format)
ROWS = [
    ("samples / s", "samples_per_second", "{:.2f}"),
    ("generated tokens / s", "tokens_per_second", "{:.1f}"),
    ("  tokens / s during generation", "generation_tokens_per_second", "{:.1f}"),
    ("s / iteration", "seconds_per_iteration", "{:.3f}"),
    ("  generation", "generation_seconds_per_iteration", "{:.3f}"),
    ("  scoring", "scoring_seconds_per_iteration", "{:.3f}"),
    ("  training", "training_seconds_per_iteration", "{:.3f}"),
    ("    of which after the update", "training_tail_seconds_per_iteration", "{:.3f}"),
    ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
    ("  RSS at first iteration (MiB)", "rss_at_first_iteration_mib", "{:.0f}"),
    ("mean response length (tokens)", "response_length", "{:.1f}"),
    ("mean generated width (tokens)", "generated_width", "{:.1f}"),
]


def print_table(summary: dict, ratios: dict, settings: dict, contended: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"PPO speed: ours vs TRL {summary['trl_version']}, {settings['repeats']} run(s) x {settings['iterations']} "
        f"iteration(s) each (+{settings['warmup']} warm-up left out)"
    )
    if contended:
        title += "\n[bold red]CPU was busy: contended timings, not a measurement[/]"
    table = Table(title=title)
    for column in ("", "ours", "TRL", "ours / TRL"):
        table.add_column(column, justify="left" if not column else "right")
    ours, trl = summary["ours"], summary["trl"]
    for label, key, fmt in ROWS:
        a, b = ours.get(key), trl.get(key)
        table.add_row(
            label,
            fmt.format(a) if a is not None else "-",
            fmt.format(b) if b is not None else "-",
            f"{ratios[key]:.2f}" if key in ratios else "-",
        )
    table.add_row(
        "s / iteration per run",
        " ".join(f"{v:.2f}" for v in ours["seconds_per_iteration_per_run"]),
        " ".join(f"{v:.2f}" for v in trl["seconds_per_iteration_per_run"]),
        "",
    )
    same, total = summary["iterations_with_equal_response_tokens"]
    table.add_row("iterations with equal response tokens", f"{same} / {total}", "", "")
    work = summary.get("same_work", {"iterations": 0})
    if work["iterations"]:
        table.add_section()
        table.add_row(f"same work ({work['iterations']} iteration(s), warm-up incl.)", "", "", "")
        for phase in ("seconds", *(f"{p}_seconds" for p in PHASES)):
            a, b = work["ours"][phase], work["trl"][phase]
            label = "  s / iteration" if phase == "seconds" else f"    {phase.removesuffix('_seconds')}"
            table.add_row(label, f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}")
    table.add_section()
    table.add_row("s per 1,000 real response tokens", "", "", "")
    for p in PHASES:
        key = f"{p}_s_per_1k_response_tokens"
        a, b = ours[key], trl[key]
        table.add_row(f"  {p}", f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}")
    for key, label in (("full_positions_per_token", "positions per real token at full width"),
                       ("scoring_positions_per_token", "  ours, scoring forwards (cut)"),
                       ("update_positions_per_token", "  ours, update forwards (cut)")):  # fmt: skip
        if key in ours:
            table.add_row(label, f"{ours[key]:.3f}", "", "")
    table.add_section()
    table.add_row("ms per padded rollout token (samples x width)", "", "", "")
    for p in PHASES:
        key = f"{p}_ms_per_padded_token"
        a, b = ours[key], trl[key]
        table.add_row(f"  {p}", f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}")
    console = Console()
    console.print(table)
    speedup = trl["seconds_per_iteration"] / ours["seconds_per_iteration"]
    console.print(
        f"ours is {speedup:.2f}x TRL's speed per iteration ({'faster' if speedup >= 1 else 'slower'}); "
        "ours / TRL < 1 on seconds and memory, > 1 on throughput means ours is better."
    )
    if work["iterations"] and same < total:
        same_speedup = work["trl"]["seconds"] / work["ours"]["seconds"]
        console.print(
            f"On the iterations with the same rollouts ours is {same_speedup:.2f}x TRL's speed; the others compare "
            "different amounts of work (see the generated widths and the per-token rows)."
        )
    print("Remaining differences between the two runs:")
    for item in DIFFERENCES:
        print(f"  - {item}")


def compare(runs: dict[str, list[dict]], warmup: int) -> tuple[dict, dict]:
    """The per-trainer summaries, the same-work comparison and the ratios ours / TRL."""
    summary = {name: summarise(trainer_runs, warmup) | padded_token_rates(trainer_runs, warmup)
               | real_token_rates(trainer_runs, warmup) for name, trainer_runs in runs.items()}  # fmt: skip
    # Same seed and sampler: the two trainers usually draw the very same responses (checked by their lengths).
    pairs = record_pairs(runs)
    equal = sum(a["response_tokens"] == b["response_tokens"] for a, b in pairs)
    summary["iterations_with_equal_response_tokens"] = [equal, len(pairs)]
    summary["same_work"] = same_work(runs)
    summary["trl_version"] = runs["trl"][0]["versions"]["trl"]
    ratios = {
        key: summary["ours"][key] / summary["trl"][key]
        for _, key, _ in ROWS
        if summary["ours"].get(key) and summary["trl"].get(key)
    }
    return summary, ratios


def resummarise(path: Path) -> None:
    """Recompute and print the comparison of a results file written earlier (e.g. after the summary changed)."""
    from rlhf_core.io import atomic_write_json

    results = json.loads(path.read_text())
    settings = results["settings"]
    summary, ratios = compare(results["runs"], settings["warmup"])
    results.update(summary=summary, ratios_ours_over_trl=ratios)
    atomic_write_json(path, results)
    print_table(summary, ratios, settings, results["contended"])
    print(f"results: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20, help="measured PPO iterations per run")
    parser.add_argument("--warmup", type=int, default=1, help="leading iterations left out of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer, alternating")
    parser.add_argument("--base", type=Path, default=REPO / "outputs", help="pipeline outputs (data, sft, rm)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in both (default: torch's)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override for our side")
    parser.add_argument("--trl-venv", type=Path, default=REPO / ".venv-trl")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep run outputs and logs here")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "ppo_speed.json")
    parser.add_argument("--summarise", type=Path, metavar="RESULTS", help="reprint the comparison of a results file")
    parser.add_argument("--worker-ours", nargs=2, type=Path, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_ours:
        run_ours_worker(*args.worker_ours)
        return
    if args.summarise:
        resummarise(args.summarise)
        return
    if args.iterations < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--iterations and --repeats must be >= 1, --warmup >= 0")

    base = args.base.resolve()
    missing = [str(p) for p in required_inputs(base) if not p.exists()]
    if missing:
        sys.exit(
            "ppo_speed: the default pipeline's outputs are missing:\n  "
            + "\n  ".join(missing)
            + "\nrun `make run` first (or pass --base DIR holding data/, sft/ and rm/)"
        )

    import torch
    import transformers

    from rlhf_core.config import load_config
    from rlhf_core.env import apply_defaults
    from rlhf_core.io import atomic_write_json

    apply_defaults()
    print("setting up .venv-trl (bench/setup_trl_venv.sh) ...", flush=True)
    trl_versions_line = setup_trl_venv(args.trl_venv.resolve())
    print(f"  {trl_versions_line}", flush=True)

    steps = args.warmup + args.iterations
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="ppo_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = ours_overrides(base, work / "ours_ppo", steps, args.extra)
    config = load_config(REPO / "params.yaml", overrides)
    batches, settings = workload(config, steps)
    spec_ours = work / "spec_ours.json"
    spec_trl = work / "spec_trl.json"
    spec_ours.write_text(json.dumps({"overrides": overrides, "threads": args.threads}))
    spec_trl.write_text(
        json.dumps(
            {
                "tokenizer": str(base / "data" / "tokenizer"),
                "sft_model": str(base / "sft" / "model"),
                "rm_model": str(base / "rm" / "model"),
                "threads": args.threads,
                "lora": config.model.lora.model_dump() if config.model.lora.enabled else None,
                "bf16": config.distributed.bf16,
                "settings": settings,
                "batches": batches,
            }
        )
    )

    load_before = os.getloadavg()
    cpus = os.cpu_count() or 1
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for repeat in range(args.repeats):
        order = ("ours", "trl") if repeat % 2 == 0 else ("trl", "ours")
        for trainer in order:
            out = work / f"{trainer}_{repeat}.json"
            log = work / f"{trainer}_{repeat}.log"
            if trainer == "ours":
                shutil.rmtree(work / "ours_ppo", ignore_errors=True)
                command = [sys.executable, str(Path(__file__).resolve()), "--worker-ours", str(spec_ours), str(out)]
            else:
                command = [str(args.trl_venv / "bin" / "python"), str(TRL_WORKER), str(spec_trl), str(out)]
            print(f"[repeat {repeat + 1}/{args.repeats}] {trainer}: {steps} iterations ...", flush=True)
            code, wall, max_rss, cpu = run_child(command, log)
            if code != 0 or not out.is_file():
                tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
                sys.exit(f"ppo_speed: the {trainer} run failed (exit {code}); log {log}:\n{tail}")
            run = json.loads(out.read_text())
            run.update({"repeat": repeat + 1, "position": order.index(trainer) + 1, "wall_seconds": wall,
                        "cpu_seconds": cpu, "max_rss_kib": max_rss})  # fmt: skip
            runs[trainer].append(run)
            measured = run["records"][args.warmup :]
            per_iter = sum(r[p] for r in measured for p in PHASES) / len(measured)
            print(f"    {per_iter:.2f} s / iteration, peak RSS {max_rss / 1024:.0f} MiB, {wall:.0f} s wall", flush=True)
    load_after = os.getloadavg()

    summary, ratios = compare(runs, args.warmup)
    # Something else was running when the benchmark started (the load after it includes the benchmark itself).
    contended = load_before[0] > cpus * 0.5
    results = {
        "command": "python bench/ppo_speed.py " + " ".join(sys.argv[1:]),
        "contended": contended,
        "settings": {
            "iterations": args.iterations,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "threads": args.threads,
            "base": str(args.base),
            "workload": settings,
            "ours_overrides": [o for o in overrides if not o.startswith("paths.")],
            "prompts_per_iteration": [len(b) for b in batches],
        },
        "summary": summary,
        "ratios_ours_over_trl": ratios,
        "differences": DIFFERENCES,
        "runs": runs,
        "machine": {
            "cpu": cpu_description(),
            "cpu_count": cpus,
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "versions": {
            "ours": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "trl_venv": runs["trl"][0]["versions"],
        },
    }
    atomic_write_json(args.results, results)
    print_table(summary, ratios, results["settings"], contended)
    print(f"results: {args.results}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
