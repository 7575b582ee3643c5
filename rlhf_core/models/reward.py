"""Reward models in the Hugging Face sequence-classification format (``num_labels=1``).

The reward model starts from the SFT policy's weights (paper sec. 4.1) with a scalar head; it scores the last
real token of ``query + response`` (the EOS). Saved with ``save_pretrained``, it loads with
``AutoModelForSequenceClassification.from_pretrained(dir)`` and scores identically, so reward models trained
elsewhere in that format plug into PPO and ours can be used elsewhere.

Scoring, by what the caller holds:

- :func:`score_padded`: token ids right-padded by ``collate_sft`` (training and evaluation batches);
- :func:`score_rollout`: left-padded queries followed by generated responses, with generation's position ids;
- :func:`score_samples`: the output of ``models.generation.sample_responses``, in batches (``score_rollout``);
- :func:`score_texts`: prompt and response strings, encoded as the stages encode them.

(The PPO stage's ``rollout.score`` is a phase of its iteration: log-probs, values and these scores together.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_core.data.tokenize import collate_sft, encode_query, encode_response
from rlhf_core.errors import ConfigError, RLHFError
from rlhf_core.models.loading import from_pretrained


def load_reward_model(
    name_or_path: str | Path, pad_token_id: int | None = None, role: str | None = None
) -> torch.nn.Module:
    """A causal LM directory gets a fresh scalar head; a reward-model directory keeps its trained head."""
    from transformers import AutoModelForSequenceClassification

    model = from_pretrained(
        AutoModelForSequenceClassification, name_or_path, "reward model", role, num_labels=1, dtype=torch.float32
    )
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if model.config.pad_token_id is None:
        raise RLHFError(f"{name_or_path}: the reward model needs config.pad_token_id to find the last real token")
    return model


def score_padded(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` scores at the last real token (transformers pools at the last non-pad token itself)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)


class RewardModelWithLMHead(torch.nn.Module):
    """Training view of a reward model: pair scores plus, for paper eq. 2's imitation term, LM logits from the
    same trunk.

    ``reward_model`` is the Hugging Face sequence-classification model (what gets saved); ``lm_head`` maps the
    trunk's final hidden states to vocabulary logits (the policy's tied or own output layer), or is None when
    ``rm.beta_rm`` is 0. One module, so DeepSpeed ZeRO shards and gathers every parameter the usual way.
    """

    def __init__(self, reward_model: torch.nn.Module, lm_head: torch.nn.Module | None):
        super().__init__()
        if not hasattr(reward_model, "score"):
            raise RLHFError(f"{type(reward_model).__name__} has no `score` head; use a decoder-only model")
        self.reward_model = reward_model
        self.lm_head = lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lm_rows: int = 0, lm_from: int = 0):
        """``(scores (B,), logits of the first lm_rows rows from position lm_from on, or None)``; the score reads the
        last real token."""
        from rlhf_core.algos.rm import gather_last

        hidden = self.reward_model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        scores = gather_last(self.reward_model.score(hidden), attention_mask)
        logits = self.lm_head(hidden[:lm_rows, lm_from:]) if lm_rows and self.lm_head is not None else None
        return scores, logits


def reward_model_for_training(
    name_or_path: str | Path, pad_token_id: int, with_lm_head: bool, role: str | None = None
) -> RewardModelWithLMHead:
    """Load ``name_or_path`` as a reward model; attach its LM output layer when the LM term is on.

    Tied embeddings (the tiny Llama) share the input embedding as output layer, exactly as the causal LM does;
    otherwise the causal LM's own output layer is loaded. A directory without one (a reward model trained
    elsewhere with untied embeddings) cannot provide the LM term: that is a configuration error.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialised" is the expected, not a problem
    try:
        reward_model = load_reward_model(name_or_path, pad_token_id, role)
        lm_head = None
        if with_lm_head:
            embeddings = reward_model.get_input_embeddings()
            vocab, hidden = embeddings.weight.shape
            if getattr(reward_model.config, "tie_word_embeddings", False):
                lm_head = torch.nn.Linear(hidden, vocab, bias=False)
                lm_head.weight = embeddings.weight
            else:
                causal, info = from_pretrained(
                    AutoModelForCausalLM, name_or_path, "causal LM", role, dtype=torch.float32, output_loading_info=True
                )
                lm_head = causal.get_output_embeddings()
                if any("lm_head" in key for key in info["missing_keys"]):
                    raise ConfigError(
                        f"rm.init_from={name_or_path} has no language-model head for eq. 2's LM term; "
                        "set rm.beta_rm=0 or start from a causal LM"
                    )
    finally:
        hf_logging.set_verbosity(verbosity)
    return RewardModelWithLMHead(reward_model, lm_head)


def save_reward_model(state_dict: dict[str, torch.Tensor], template: RewardModelWithLMHead, tokenizer, path) -> None:
    """Write the sequence-classification part of a trained :class:`RewardModelWithLMHead` (full state dict from
    ``distributed.gather_full_state_dict``) as a Hugging Face directory, atomically."""
    from rlhf_core.io import atomic_directory

    prefix = "reward_model."
    weights = {name[len(prefix) :]: tensor for name, tensor in state_dict.items() if name.startswith(prefix)}
    with atomic_directory(path) as tmp:
        template.reward_model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def score_rollout(model: torch.nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float scores of left-padded queries followed by generated responses, with position ids that skip
    the left padding (so the reward model sees the positions generation used)."""
    from rlhf_core.data.tokenize import position_ids

    output = model(input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return output.logits.squeeze(-1).float()


@torch.no_grad()
def score_samples(reward_model: torch.nn.Module, samples: dict, batch_size: int | None = None) -> torch.Tensor:
    """``(N,)`` scores of ``models.generation.sample_responses`` output (left-padded queries + generated
    responses), in batches of ``batch_size`` (default: all at once)."""
    ids = torch.cat([samples["query_ids"], samples["responses"]], 1)
    mask = torch.cat([samples["query_mask"], samples["response_mask"]], 1)
    step = batch_size or len(ids)
    return torch.cat(
        [score_rollout(reward_model, ids[i : i + step], mask[i : i + step]) for i in range(0, len(ids), step)]
    )


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int) -> torch.Tensor:
    """``(N,)`` reward-model scores of ``prompt + response`` pairs, in input order."""
    model.eval()
    scores = []
    for start in range(0, len(prompts), batch_size):
        examples = [
            (encode_query(tokenizer, p), encode_response(tokenizer, r))
            for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size], strict=True)
        ]
        batch = {k: v.to(model.device) for k, v in collate_sft(examples, tokenizer.pad_token_id).items()}
        scores.append(score_padded(model, batch["input_ids"], batch["attention_mask"]).float().cpu())
    return torch.cat(scores)
