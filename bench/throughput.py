"""Generation throughput of our rollout against plain `transformers` generate, and training FLOP/s against peak.

    .venv/bin/python bench/throughput.py [--repeats 5]

1. Generation: the PPO rollout's sampler (``rlhf_core.models.generation.sample``: temperature 0.8, top-p 0.9,
   repetition penalty 1.1, stop at EOS) and ``model.generate`` with the same settings, on the same batch of
   ``ppo.rollout_size`` PPO prompts from the default SFT policy, alternating, from the same seed. Reports
   generated tokens per second (tokens up to and including each row's EOS) and checks both return the same tokens.
   A third contender, a sampling loop written by hand around the KV cache (``kv_cache_loop``), shows what leaving
   ``generate`` would gain; a fourth, ``continuous`` (``generation.engine=continuous``: transformers' continuous
   batching with our repetition penalty), what the scheduler costs or saves on this machine (its random stream
   differs, so its tokens do; ``bench/rollout_engines.py`` compares the engines in depth).
2. Training: one PPO-sized policy update (forward + backward + AdamW step on the rollout's prompt + response
   tokens, micro-batch ``ppo.micro_batch_size``) timed; achieved FLOP/s = 6 x parameters x tokens (plus the
   attention matmuls) / time, against this machine's measured fp32 matmul peak (a 2048 x 2048 matmul).
3. Response-only logits: PPO needs the policy's and reference's logits at the response positions only. The
   trainer's forward (``models.causal_lm.response_logits``, ``logits_to_keep``) runs the LM head there; timed
   against the whole-sequence forward sliced afterwards, alternating, for the rollout's no-grad scoring forward
   and for a PPO policy-loss forward + backward, with the size of the logits each produces; checks the two give
   the same logits.
4. Rollout log-probs from ``generate``'s logits (TRL's shortcut, which saves the policy forward of scoring): their
   largest and mean distance from the forward's log-probs over the response tokens.
5. One sampling step's token draw: ``torch.multinomial`` against an inverse-CDF draw, milliseconds per call.

Needs the default pipeline's outputs (``make run``). Writes ``bench/results/throughput.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * size**3 / min(times)


def generated_tokens(responses, eos_id: int) -> int:
    from rlhf_core.data.tokenize import eos_response_mask

    return int(eos_response_mask(responses, eos_id).sum())


def kv_cache_loop(model, tokenizer, query_ids, query_mask, sampling, max_new_tokens: int):
    """A sampling loop written by hand around the model's KV cache, with generate's processors in generate's order
    (repetition penalty over prompt + generated tokens, temperature, top-p; multinomial draw): how much a sampler
    without `generate`'s machinery could gain. Returns the same tokens as `generate` from the same seed."""
    import torch
    from transformers import DynamicCache

    from rlhf_core.data.tokenize import position_ids

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    cache = DynamicCache(config=model.config)
    seen, mask = query_ids.clone(), query_mask
    step_ids, positions = query_ids, position_ids(query_mask)
    last_position = positions[:, -1:]
    unfinished = torch.ones(query_ids.shape[0], dtype=torch.bool)
    tokens = []
    for t in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()  # fmt: skip
        if sampling.repetition_penalty != 1.0:
            picked = torch.gather(logits, 1, seen)
            picked = torch.where(picked < 0, picked * sampling.repetition_penalty, picked / sampling.repetition_penalty)
            logits = logits.scatter(1, seen, picked)
        logits = logits / sampling.temperature
        if sampling.top_p < 1.0:
            ascending, order = torch.sort(logits)
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
            drop[:, -1] = False  # keep at least the most likely token
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        token = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        tokens.append(token)
        unfinished &= token != eos
        if not unfinished.any():
            break
        seen = torch.cat([seen, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        step_ids, positions = token[:, None], last_position + t + 1
    return torch.stack(tokens, 1)


def plain_generate(model, tokenizer, query_ids, query_mask, sampling, max_new_tokens: int, **extra):
    """``model.generate`` called directly with the rollout's sampling settings (the baseline); ``extra`` goes to
    ``generate`` as it is (e.g. ``output_logits``)."""
    return model.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=0,
        repetition_penalty=sampling.repetition_penalty,
        **extra,
    )


def bench_generation(model, tokenizer, query_ids, query_mask, sampling, max_new_tokens: int, repeats: int) -> dict:
    import torch

    from rlhf_core.config import GenerationEngineConfig
    from rlhf_core.models.generation import sample

    def plain():
        return plain_generate(model, tokenizer, query_ids, query_mask, sampling, max_new_tokens)[
            :, query_ids.shape[1] :
        ]

    def ours():
        return sample(model, tokenizer, query_ids, query_mask, sampling, max_new_tokens)

    def hand_written():
        return kv_cache_loop(model, tokenizer, query_ids, query_mask, sampling, max_new_tokens)

    def continuous():
        engine = GenerationEngineConfig(engine="continuous")
        return sample(model, tokenizer, query_ids, query_mask, sampling, max_new_tokens, engine=engine)

    contenders = {"transformers_generate": plain, "ours": ours, "kv_cache_loop": hand_written,
                  "continuous": continuous}  # fmt: skip
    runs = {name: [] for name in contenders}
    outputs = {}
    with torch.no_grad():
        for fn in contenders.values():  # warm-up, once each
            torch.manual_seed(0)
            fn()
        for _ in range(repeats):
            for name, fn in contenders.items():
                torch.manual_seed(0)
                started = time.perf_counter()
                outputs[name] = fn()
                seconds = time.perf_counter() - started
                runs[name].append(
                    {"seconds": seconds, "tokens": generated_tokens(outputs[name], tokenizer.eos_token_id)}
                )
    reference = outputs["transformers_generate"]
    result = {"batch": int(query_ids.shape[0])}
    for name, items in runs.items():
        seconds = statistics.median(r["seconds"] for r in items)
        tokens = items[0]["tokens"]
        width = min(reference.shape[1], outputs[name].shape[1])
        same = bool(torch.equal(reference[:, :width], outputs[name][:, :width]))
        result[name] = {
            "median_seconds": seconds,
            "tokens": tokens,
            "tokens_per_second": tokens / seconds,
            "same_tokens_as_generate": same,
        }
    result["identical_tokens"] = result["ours"]["same_tokens_as_generate"]
    base = result["transformers_generate"]["tokens_per_second"]
    result["speedup"] = result["ours"]["tokens_per_second"] / base
    result["kv_cache_loop_speedup"] = result["kv_cache_loop"]["tokens_per_second"] / base
    result["continuous_speedup"] = result["continuous"]["tokens_per_second"] / base
    return result


def bench_token_draw(batch: int, vocab: int, repeats: int = 200) -> dict:
    """One sampling step's draw: ``torch.multinomial`` (for one sample it is the exponential race, argmax of p / q
    with q ~ Exp(1) drawn for every vocabulary entry) against the inverse CDF (one uniform per row, searched in the
    cumulative distribution). The same distribution, different tokens from the same seed."""
    import torch

    probs = torch.rand(batch, vocab).softmax(-1)
    draws = {
        "multinomial": lambda: torch.multinomial(probs, 1),
        "inverse_cdf": lambda: torch.searchsorted(probs.cumsum(-1), torch.rand(batch, 1)).clamp_(max=vocab - 1),
    }
    result = {"batch": batch, "vocab": vocab}
    for name, draw in draws.items():
        draw()  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            draw()
        result[f"{name}_ms"] = 1e3 * (time.perf_counter() - started) / repeats
    return result


def bench_generate_logits(model, tokenizer, query_ids, query_mask, sampling, max_new_tokens: int) -> dict:
    """TRL's shortcut: the rollout log-probs from the logits `generate` returns instead of a policy forward.
    How far they are from the forward's (float rounding: cached vs whole-sequence attention)."""
    import torch

    from rlhf_core.algos.ppo import logprobs_from_logits
    from rlhf_core.data.tokenize import eos_response_mask
    from rlhf_core.models.causal_lm import response_logits

    with torch.no_grad():
        torch.manual_seed(0)
        out = plain_generate(
            model, tokenizer, query_ids, query_mask, sampling, max_new_tokens,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        responses = out.sequences[:, query_ids.shape[1] :]
        response_mask = eos_response_mask(responses, tokenizer.eos_token_id)
        responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, tokenizer.pad_token_id))
        from_generate = logprobs_from_logits(torch.stack(out.logits, 1).float(), responses, sampling.temperature)
        ids = torch.cat([query_ids, responses], 1)
        mask = torch.cat([query_mask, response_mask], 1)
        logits = response_logits(model, ids, mask, query_ids.shape[1], responses.shape[1])
        from_forward = logprobs_from_logits(logits, responses, sampling.temperature)
    gap = (from_generate - from_forward).abs()[response_mask.bool()]
    return {"response_tokens": int(gap.numel()), "max_abs_diff": float(gap.max()), "mean_abs_diff": float(gap.mean())}


def bench_training(model, tokenizer, query_ids, query_mask, responses, config, repeats: int) -> dict:
    import torch

    from rlhf_core.data.tokenize import position_ids

    ids = torch.cat([query_ids, responses], dim=1)
    mask = torch.cat([query_mask, (responses != tokenizer.pad_token_id).long()], dim=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    micro = config.ppo.micro_batch_size
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    tokens = int(mask.sum())
    seq = ids.shape[1]
    # Dense FLOPs: 6 per parameter per token (forward 2, backward 4); attention scores and values add
    # 12 x layers x hidden x sequence per token (forward + backward), counted on the padded length actually run.
    flops = 6 * n_params * ids.numel() + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq * ids.numel()

    def step():
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, ids.shape[0], micro):
            sl = slice(i, i + micro)
            out = model(input_ids=ids[sl], attention_mask=mask[sl], position_ids=position_ids(mask[sl]))
            logprobs = out.logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[sl, 1:, None]).squeeze(-1)
            (-(logprobs * mask[sl, 1:]).sum() / mask[sl, 1:].sum()).backward()
        optimizer.step()

    model.train()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {
        "parameters": n_params,
        "sequences": int(ids.shape[0]),
        "padded_length": seq,
        "real_tokens": tokens,
        "median_seconds": seconds,
        "flops_per_step": flops,
        "achieved_flops_per_second": flops / seconds,
    }


def bench_response_logits(model, tokenizer, query_ids, query_mask, responses, sampling, config, repeats: int) -> dict:
    import torch

    from rlhf_core.algos.ppo import logprobs_from_logits
    from rlhf_core.data.tokenize import eos_response_mask, position_ids
    from rlhf_core.models.causal_lm import response_logits

    response_mask = eos_response_mask(responses, tokenizer.eos_token_id)
    ids = torch.cat([query_ids, responses], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    qw, width = query_ids.shape[1], responses.shape[1]

    def whole_sequence(sl):  # the plain way: every position's logits, sliced afterwards
        logits = model(input_ids=ids[sl], attention_mask=mask[sl], position_ids=position_ids(mask[sl])).logits
        return logits[:, qw - 1 : qw - 1 + width].float()

    def response_only(sl):
        return response_logits(model, ids[sl], mask[sl], qw, width)

    def scoring(forward):
        with torch.no_grad():
            return forward(slice(0, ids.shape[0]))

    def update(forward):  # the policy-gradient part of a PPO update, one micro-batch at a time
        model.zero_grad(set_to_none=True)
        for i in range(0, ids.shape[0], config.ppo.micro_batch_size):
            sl = slice(i, i + config.ppo.micro_batch_size)
            logprobs = logprobs_from_logits(forward(sl), responses[sl], sampling.temperature)
            (-(logprobs * response_mask[sl]).sum() / response_mask[sl].sum()).backward()

    model.eval()
    same = bool(torch.equal(scoring(whole_sequence), scoring(response_only)))
    result = {"identical_logits": same, "sequences": int(ids.shape[0]), "query_width": qw, "response_width": width}
    for phase, fn in (("scoring_forward", scoring), ("policy_update", update)):
        times = {"whole_sequence": [], "response_only": []}
        for forward in (whole_sequence, response_only):  # warm-up
            fn(forward)
        for _ in range(repeats):
            for name, forward in (("whole_sequence", whole_sequence), ("response_only", response_only)):
                started = time.perf_counter()
                fn(forward)
                times[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(t) for name, t in times.items()}
        result[phase] = {**medians, "speedup": medians["whole_sequence"] / medians["response_only"]}
    vocab = model.config.vocab_size
    result["logits_mib"] = {  # fp32 logits of the whole rollout, as the LM head returns them
        "whole_sequence": ids.shape[0] * ids.shape[1] * vocab * 4 / 2**20,
        "response_only": ids.shape[0] * (width + 1) * vocab * 4 / 2**20,
    }
    model.zero_grad(set_to_none=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--outputs", type=Path, default=REPO / "outputs", help="a finished default pipeline run")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "throughput.json")
    args = parser.parse_args()
    for need in ("data/tokenizer", "sft/model/config.json"):
        if not (args.outputs / need).exists():
            sys.exit(f"missing {args.outputs / need}: run `make run` (or `rlhf run --no-prefect`) first")

    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table

    from rlhf_core.config import load_config
    from rlhf_core.data.limits import response_token_limit
    from rlhf_core.data.rows import load_split
    from rlhf_core.data.tokenize import encode_query, left_pad
    from rlhf_core.io import atomic_write_json
    from rlhf_core.models.causal_lm import load_causal_lm
    from rlhf_core.models.generation import sample
    from rlhf_core.models.tokenizer import load_tokenizer

    config = load_config(REPO / "params.yaml", [f"paths.data={args.outputs / 'data'}"])
    max_new_tokens = response_token_limit(config)
    tokenizer = load_tokenizer(args.outputs / "data" / "tokenizer")
    prompts = [r["prompt"] for r in load_split(args.outputs / "data", "ppo", config.data)][: config.ppo.rollout_size]
    query_ids, query_mask = left_pad([encode_query(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    model = load_causal_lm(args.outputs / "sft" / "model", tokenizer).eval()

    peak = matmul_peak()
    generation = bench_generation(
        model, tokenizer, query_ids, query_mask, config.ppo.sampling, max_new_tokens, args.repeats
    )
    # One rollout (seed 0, before any weight changes) for the training and logits benchmarks.
    with torch.no_grad():
        torch.manual_seed(0)
        responses = sample(model, tokenizer, query_ids, query_mask, config.ppo.sampling, max_new_tokens)
    training = bench_training(model, tokenizer, query_ids, query_mask, responses, config, args.repeats)
    training["share_of_peak"] = training["achieved_flops_per_second"] / peak
    generate_logits = bench_generate_logits(
        model, tokenizer, query_ids, query_mask, config.ppo.sampling, max_new_tokens
    )
    token_draw = bench_token_draw(query_ids.shape[0], model.config.vocab_size)
    response_logits = bench_response_logits(
        model, tokenizer, query_ids, query_mask, responses, config.ppo.sampling, config, max(args.repeats, 10)
    )
    results = {
        "command": "python bench/throughput.py " + " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "matmul_peak_flops_per_second": peak,
        "generation": generation,
        "training": training,
        "response_logits": response_logits,
        "generate_logits": generate_logits,
        "token_draw": token_draw,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },  # fmt: skip
    }
    atomic_write_json(args.results, results)

    table = Table(title=f"Throughput on {torch.get_num_threads()} threads (default SFT policy)")
    table.add_column("what")
    table.add_column("value")
    for name in ("transformers_generate", "ours", "kv_cache_loop"):
        g = generation[name]
        table.add_row(
            f"generate: {name}",
            f"{g['tokens_per_second']:.0f} tokens/s ({g['median_seconds']:.2f} s), "
            f"same tokens as generate: {g['same_tokens_as_generate']}",
        )
    table.add_row("generate: ours / transformers", f"{generation['speedup']:.2f}x")
    table.add_row("generate: hand-written KV-cache loop / transformers", f"{generation['kv_cache_loop_speedup']:.2f}x")
    table.add_row("continuous batching / transformers generate", f"{generation['continuous_speedup']:.2f}x")
    table.add_row("matmul peak (fp32, 2048^2)", f"{peak / 1e9:.0f} GFLOP/s")
    table.add_row(
        "training step (policy fwd+bwd+AdamW)",
        f"{training['median_seconds']:.2f} s, {training['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s "
        f"= {training['share_of_peak']:.1%} of peak",
    )
    r = response_logits
    for phase in ("scoring_forward", "policy_update"):
        table.add_row(
            f"{phase.replace('_', ' ')}: whole sequence / response-only logits",
            f"{r[phase]['whole_sequence']:.3f} s / {r[phase]['response_only']:.3f} s = {r[phase]['speedup']:.2f}x",
        )
    table.add_row(
        "logits of the rollout: whole sequence / response only",
        f"{r['logits_mib']['whole_sequence']:.1f} / {r['logits_mib']['response_only']:.1f} MiB "
        f"(query {r['query_width']}, response {r['response_width']} tokens); identical: {r['identical_logits']}",
    )
    table.add_row(
        "rollout log-probs from generate's logits vs a forward",
        f"max |diff| {generate_logits['max_abs_diff']:.1e}, mean {generate_logits['mean_abs_diff']:.1e} "
        f"over {generate_logits['response_tokens']} response tokens",
    )
    table.add_row(
        f"one token draw, {token_draw['batch']} x {token_draw['vocab']}: multinomial / inverse CDF",
        f"{token_draw['multinomial_ms']:.3f} / {token_draw['inverse_cdf_ms']:.3f} ms",
    )
    table.add_row("results", str(args.results))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
