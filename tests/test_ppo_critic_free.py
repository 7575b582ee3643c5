"""The critic-free presets (GRPO, RLOO, REINFORCE++) on the tiny stack: real iterations of ``ppo_iteration``, the
advantages they put in the experience recomputed by hand from its rewards, no critic anywhere, and the stage run
end to end with a resume that ends as the straight run does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhf_core import distributed
from rlhf_core.algos.masked import masked_mean, whiten
from rlhf_core.config import PRESETS, load_config
from rlhf_core.pipeline import run_stage
from rlhf_core.trainers.ppo import iteration
from rlhf_core.trainers.ppo.iteration import ppo_iteration, start_run
from tests.conftest import tiny_overrides

SHORT = ["data.max_response_tokens=16"]  # short answers keep an iteration well under a second


def _config(stack, prepared_root, tmp_path, *extra):
    out, _ = stack
    paths = [f"paths.sft={out / 'sft'}", f"paths.rm={out / 'rm'}", f"paths.ppo={tmp_path / 'ppo'}"]
    return load_config(None, [*tiny_overrides(prepared_root), *paths, *SHORT, *extra])


def _iterate(config, tmp_path, iterations: int):
    run = start_run(config, distributed.setup(config.distributed), tmp_path / "ppo" / "checkpoints")
    run.start_ptx(0)
    policy_start = {k: v.detach().clone() for k, v in run.models.policy.unwrapped().state_dict().items()}
    records, exp = [], None
    for step in range(iterations):
        record, exp = ppo_iteration(run, step)
        records.append(record)
    return run, records, exp, policy_start


def _totals(exp) -> torch.Tensor:
    """Each answer's total reward: its processed score minus kl_coef times its KL (the rewards' row sums)."""
    return (exp.rewards * exp.response_mask).sum(dim=1).double()


@pytest.mark.parametrize("preset", ["grpo", "rloo"])
def test_group_presets_sample_each_prompt_k_times_and_take_the_baseline_from_the_group(
    preset, trained_tiny_rm, prepared_tiny, tmp_path
):
    k = 4
    config = _config(trained_tiny_rm, prepared_tiny[0], tmp_path, f"ppo.preset={preset}", f"ppo.samples_per_prompt={k}",
                     "ppo.kl_coef=0.5")  # fmt: skip
    run, records, exp, policy_start = _iterate(config, tmp_path, 2)
    assert run.models.critic is None and set(run.models.engines) == {"policy"}
    # 8 rows = 2 prompts x 4 answers, a prompt's answers side by side; the two prompts differ.
    assert exp.prompts == [exp.prompts[0]] * k + [exp.prompts[k]] * k and exp.prompts[0] != exp.prompts[k]
    assert exp.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert exp.values is None and exp.returns is None
    # By hand, per prompt: GRPO standardises the totals, RLOO subtracts the mean of the other three.
    totals = _totals(exp).view(2, k)
    if preset == "grpo":
        expected = (totals - totals.mean(1, keepdim=True)) / (totals.std(1, keepdim=True) + 1e-6)
    else:
        expected = totals - (totals.sum(1, keepdim=True) - totals) / (k - 1)
    on_tokens = expected.reshape(-1, 1).float() * exp.response_mask
    torch.testing.assert_close(exp.advantages, on_tokens, rtol=1e-5, atol=1e-6)
    assert records[1]["objective/kl"] != 0.0, "the policy moved, so the totals hold a KL term"
    for record in records:
        assert "loss/value" not in record and "critic/lr" not in record and "val/clipfrac" not in record
        assert "loss/policy" in record and all(math.isfinite(v) for v in record.values())
    policy_now = run.models.policy.unwrapped().state_dict()
    assert any(not torch.equal(policy_now[name], weights) for name, weights in policy_start.items())


def test_reinforce_pp_whitens_the_returns_of_the_kl_shaped_rewards_over_the_rollout(
    trained_tiny_rm, prepared_tiny, tmp_path
):
    config = _config(trained_tiny_rm, prepared_tiny[0], tmp_path, "ppo.preset=reinforce_pp", "ppo.kl_coef=0.5")
    run, records, exp, _ = _iterate(config, tmp_path, 2)
    assert run.models.critic is None and len(set(exp.prompts)) == len(exp.prompts)  # one answer per prompt
    mask = exp.response_mask
    returns = (exp.rewards * mask).flip(1).cumsum(1).flip(1)  # the reward still to come, gamma 1
    mean = float(masked_mean(returns, mask))
    var = float(masked_mean((returns - mean) ** 2, mask))
    torch.testing.assert_close(exp.advantages, whiten(returns, mask, mean, var), rtol=1e-5, atol=1e-5)
    assert abs(float(masked_mean(exp.advantages, mask))) < 1e-5
    assert float(masked_mean(exp.advantages**2, mask)) == pytest.approx(1.0, abs=1e-4)


def test_one_answer_per_prompt_keeps_the_prompt_order_of_every_run_before(trained_tiny_rm, prepared_tiny, tmp_path):
    """samples_per_prompt 1 (every existing recipe) draws the same prompts in the same order as before it existed."""
    from rlhf_core.data.order import global_order

    config = _config(trained_tiny_rm, prepared_tiny[0], tmp_path)
    run = start_run(config, distributed.setup(config.distributed), tmp_path / "ppo" / "checkpoints")
    ppo = config.ppo
    order = global_order(len(run.prompts), ppo.steps * ppo.rollout_size, ppo.seed)
    for step in range(ppo.steps):
        expected = [run.prompts[i] for i in order[step * ppo.rollout_size : (step + 1) * ppo.rollout_size]]
        assert run.prompts_for(step) == expected
    assert run.models.critic is not None and set(run.models.engines) == {"policy", "critic"}


def test_a_critic_free_run_resumes_to_the_same_end(trained_tiny_rm, prepared_tiny, tmp_path):
    """GRPO through the stage: checkpoints hold the policy alone, and a run interrupted after iteration 2 resumes
    to the straight run's history and weights, byte for byte."""
    extra = ["ppo.preset=grpo", "ppo.samples_per_prompt=2", "ppo.steps=4"]
    straight = run_stage("ppo", _config(trained_tiny_rm, prepared_tiny[0], tmp_path / "straight", *extra))
    config = _config(trained_tiny_rm, prepared_tiny[0], tmp_path / "cut", *extra)
    real_update, calls = iteration.update, []

    def interrupt_the_third_update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # iteration 3 has sampled and scored, no engine has stepped
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(iteration, "update", interrupt_the_third_update)
        with pytest.raises(KeyboardInterrupt):
            run_stage("ppo", config)
    saved = tmp_path / "cut" / "ppo" / "checkpoints" / "step-000002"
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["step"] == 2 and "critic" not in json.dumps(sorted(p.name for p in saved.rglob("*")))
    resumed = run_stage("ppo", config)

    def untimed(history):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in history]

    assert untimed(resumed.history) == untimed(straight.history)
    weights = "ppo/model/model.safetensors"
    assert (tmp_path / "cut" / weights).read_bytes() == (tmp_path / "straight" / weights).read_bytes()
    tricks = json.loads((tmp_path / "cut" / "ppo" / "tricks.json").read_text())
    assert {k: tricks[k] for k in PRESETS["grpo"].model_dump()} == PRESETS["grpo"].model_dump()
    assert Path(tmp_path / "cut" / "ppo" / "plots" / "ppo_curves.png").stat().st_size > 0
