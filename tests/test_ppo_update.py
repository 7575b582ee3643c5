"""The PPO update's loss aggregation: one minibatch gives the same gradient whether it runs as 1 process x 1
micro-batch, 1 process x 2 micro-batches or 2 processes x 1 micro-batch (the token mean over the whole minibatch,
as SFT's loss does), with every loss term on: clipped surrogate, entropy bonus, PPO-ptx, clipped value loss, and
advantage whitening with moments over both processes."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch

from rlhf_core import distributed
from rlhf_core.config import load_config, ppo_sizes
from rlhf_core.trainers.ppo import update as ppo_update
from rlhf_core.trainers.ppo.experience import Experience

ROWS, QUERY, WIDTH, VOCAB = 4, 3, 5, 48
RESPONSE_LENGTHS = [5, 1, 3, 2]  # unequal on purpose: a mean of micro-batch means would weight tokens unequally
TRICKS = ["ppo.preset=ppo_max", "ppo.tricks.entropy_bonus=true", "ppo.entropy_coef=0.1"]


def _config(micro_batch_size: int, max_tokens: int | None = None):
    sizes = ["ppo.rollout_size=4", "ppo.minibatch_size=4", f"ppo.micro_batch_size={micro_batch_size}",
             f"ppo.max_tokens_per_micro_batch={'null' if max_tokens is None else max_tokens}",
             f"data.max_prompt_tokens={QUERY + 1}", f"data.max_response_tokens={WIDTH}"]  # fmt: skip
    return load_config(None, [*sizes, *TRICKS, "tracking.enabled=false"])


def _models(accumulation: int):
    """A tiny policy and critic, identical in every process (seeded), as the engines the update drives."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf_core.models.critic import Critic

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=None, eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config).eval()
    critic = Critic(LlamaForSequenceClassification(config.__class__(**{**config.to_dict(), "num_labels": 1}))).eval()

    def engine(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the test reads gradients, not steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        return distributed.TorchEngine(model, optimizer, scheduler, accumulation, None, False, torch.device("cpu"))

    return SimpleNamespace(policy=engine(policy), critic=engine(critic))


def _experience() -> Experience:
    generator = torch.Generator().manual_seed(1)
    queries = torch.randint(1, VOCAB, (ROWS, QUERY), generator=generator)
    queries[1, 0] = 0  # one left-padded query
    responses = torch.randint(1, VOCAB, (ROWS, WIDTH), generator=generator)
    response_mask = (torch.arange(WIDTH) < torch.tensor(RESPONSE_LENGTHS).unsqueeze(1)).float()
    responses = torch.where(response_mask.bool(), responses, torch.zeros_like(responses))
    attention_mask = torch.cat([(queries != 0).long(), response_mask.long()], dim=1)

    def noise(scale: float, offset: float = 0.0) -> torch.Tensor:
        return (torch.randn(ROWS, WIDTH, generator=generator) * scale + offset) * response_mask

    return Experience(
        prompts=[""] * ROWS, texts=[""] * ROWS, queries=queries, responses=responses,
        query_responses=torch.cat([queries, responses], dim=1), attention_mask=attention_mask,
        response_mask=response_mask, eos=torch.ones(ROWS, dtype=torch.bool), pad_id=0,
        logprobs=noise(0.3, -3.9), values=noise(0.5), advantages=noise(1.0), returns=noise(1.0),
    )  # fmt: skip


def _ptx_examples() -> list[tuple[list[int], list[int]]]:
    return [([1, 2, 3], [4, 5, 6, 7, 8, 9]), ([2, 3], [10]), ([5], [11, 12, 13]), ([6, 7, 8, 9], [14, 15])]


def _gradients(
    micro_batch_size: int, rows: list[int], world_size: int = 1, max_tokens: int | None = None
) -> tuple[dict, dict]:
    """Run ``train_minibatch`` on ``rows`` of the minibatch (``max_tokens``: micro-batches by that token budget);
    return the gradient it produced per parameter (the engine's accumulation included) and its logged statistics."""
    from rlhf_core.data.tokenize import collate_sft

    config = _config(micro_batch_size, max_tokens)
    sizes = ppo_sizes(config.ppo, world_size)
    models = _models(sizes.accumulation)
    grads: dict[str, torch.Tensor] = {}
    for prefix, engine in (("policy", models.policy), ("critic", models.critic)):
        for name, param in engine.module.named_parameters():
            key = f"{prefix}.{name}"

            def keep(grad, key=key):
                grads[key] = grads.get(key, 0) + grad.detach().clone()

            param.register_hook(keep)
    examples = _ptx_examples()
    ptx = [collate_sft([examples[i] for i in rows[j : j + micro_batch_size]], 0)
           for j in range(0, len(rows), micro_batch_size)]  # fmt: skip
    tricks = config.ppo.resolved_tricks()
    stats, bad = ppo_update.train_minibatch(models, _experience(), torch.tensor(rows), config, tricks, sizes, True, ptx)
    assert not bad
    # exactly one optimizer step of each model, at the last of its micro-batches, however many there were
    assert models.policy.scheduler.last_epoch == models.critic.scheduler.last_epoch == 1
    return grads, stats


def _rank_worker(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        grads, stats = _gradients(2, [2 * rank, 2 * rank + 1], world_size=2)
        torch.save({"grads": grads, "stats": stats}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _close(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


def test_two_micro_batches_give_the_one_micro_batch_gradient():
    whole, whole_stats = _gradients(4, [0, 1, 2, 3])
    split, split_stats = _gradients(2, [0, 1, 2, 3])
    _close(split, whole)
    for key in ("loss/policy", "loss/value", "loss/ptx", "policy/clipfrac", "policy/approxkl", "val/clipfrac"):
        assert split_stats[key] == pytest.approx(whole_stats[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize(("max_tokens", "micro_batches", "ptx_batch"), [(9, 4, 4), (14, 3, 4), (16, 2, 1)])
def test_token_budget_micro_batches_give_the_one_micro_batch_gradient(max_tokens, micro_batches, ptx_batch):
    """Rows grouped by length and each micro-batch cut to its own widths: 2 to 4 micro-batches of 1 to 3 rows give
    the gradient and statistics of one micro-batch of the whole minibatch. With PPO-ptx batches of 1 example (4
    batches beside 2 micro-batches) the policy takes micro-steps of ptx alone that the critic does not."""
    from rlhf_core.trainers.ppo import batches

    config = _config(ptx_batch, max_tokens)
    assert len(batches.update_cuts(_experience(), torch.tensor([0, 1, 2, 3]), config.ppo)) == micro_batches
    whole, whole_stats = _gradients(4, [0, 1, 2, 3])
    grouped, grouped_stats = _gradients(ptx_batch, [0, 1, 2, 3], max_tokens=max_tokens)
    _close(grouped, whole)
    for key in ("loss/policy", "loss/value", "loss/ptx", "policy/clipfrac", "policy/approxkl", "val/clipfrac"):
        assert grouped_stats[key] == pytest.approx(whole_stats[key], rel=1e-5, abs=1e-7), key


def test_a_mean_of_micro_batch_means_would_not(monkeypatch):
    """The check above has teeth: averaging each micro-batch's own token mean (the aggregation before the
    normaliser) weights the 1-token response like the 5-token one and moves the gradient."""
    whole, _ = _gradients(4, [0, 1, 2, 3])
    monkeypatch.setattr(ppo_update, "token_normaliser", lambda *args: None)
    mean_of_means, _ = _gradients(2, [0, 1, 2, 3])
    worst = max(float((mean_of_means[k] - whole[k]).abs().max() / whole[k].abs().max()) for k in whole)
    assert worst > 1e-2


@pytest.mark.slow
def test_two_processes_give_the_one_process_gradient(tmp_path):
    """2 processes (gloo) x 1 micro-batch each: the token count and the advantage moments are all-reduced; the
    data-parallel gradient (the mean of the ranks', what DeepSpeed applies) equals the 1 x 1 gradient."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    whole, whole_stats = _gradients(4, [0, 1, 2, 3])
    _close({k: (ranks[0]["grads"][k] + ranks[1]["grads"][k]) / 2 for k in whole}, whole)
    for key in ("loss/policy", "loss/value", "loss/ptx", "policy/clipfrac"):  # ranks' shares average to the whole
        got = (ranks[0]["stats"][key] + ranks[1]["stats"][key]) / 2
        assert got == pytest.approx(whole_stats[key], rel=1e-5, abs=1e-7), key
