"""The continuous-batching rollout engine: transformers' paged-attention scheduler (``generate_batch``'s manager)
with the paper's sampling exactly, including the repetition penalty that transformers' scheduler drops.

Why not ``model.generate_batch`` as it is: it builds its logits processors from the generation config and drops
the ones it does not support, the repetition penalty among them (it needs each request's history, which the
scheduler's packed batch does not carry), so the paper's sampling (sec. 6.1: temperature 0.8, top-p 0.9,
repetition penalty 1.1) would silently become another distribution. :class:`RepetitionPenalty` gives that
penalty a per-request history and takes its place in the processor list, in the order ``generate`` applies it.

Determinism: every request is queued while the scheduler's loop is paused, so the first batch and every later
one are the same on every run, and the sampling stream is seeded from the caller's RNG at each call (one draw), so
a run resumed from a checkpoint samples what the straight run sampled (the scheduler otherwise seeds itself once,
when it is created). The manager is kept for the model between calls (its CUDA graphs are captured once per run)
and stopped after each call, so no thread outlives a call.

Precision: the scheduler's thread decodes in the weights' dtype, and its paged KV cache has that dtype too (autocast
is per thread, and transformers sizes the cache from ``model.dtype``). Weights kept in bf16 (DeepSpeed's bf16
engines) decode in bf16; float32 weights under the torch engine's bf16 autocast would decode in float32, which is
why ``generation.engine=auto`` keeps ``generate`` there.
"""

from __future__ import annotations

import math

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.continuous_batching.utils import WorkloadHints
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from rlhf_core.errors import ConfigError

# Tokens of KV cache per page; one page per short request keeps the bookkeeping small.
PAGE_SIZE = 64
# A request's id carries its prompt's position in the call: its row in the penalty's table and in the output.
_REQUEST_PREFIX = "rlhf_"


class RepetitionPenalty(ContinuousBatchingLogitsProcessor):
    """``generate``'s repetition penalty (Keskar et al. 2019, as transformers applies it: every token already in
    the prompt or the response has its logit divided by ``penalty`` when positive, multiplied when negative) for
    the continuous-batching scheduler.

    Each request owns a row of a presence table (``capacity`` x vocabulary, on the model's device); the batch's
    argument for a logits row is its request's slot. The table is filled outside the decoding step (the prompt
    when a request is first scheduled, each new token after), so a captured CUDA graph only reads it.
    """

    supported_kwargs: dict[str, type] = {}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, penalty: float, vocab_size: int, capacity: int, device) -> None:
        self.penalty = penalty
        self.seen = torch.zeros(capacity, vocab_size, dtype=torch.bool, device=device)
        self.recorded: dict[int, int] = {}  # slot -> generated tokens already in the table

    def reset(self) -> None:
        self.seen.zero_()
        self.recorded.clear()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)  # rows without a request: their logits are never sampled

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        slots, rows, tokens = [], [], []
        for request in requests_with_new_token:
            state = request.state
            slot = slot_of(state.request_id)
            slots.append(slot)
            if slot not in self.recorded:
                self.recorded[slot] = 0
                rows += [slot] * len(state.initial_tokens)
                tokens += state.initial_tokens
            new = state.generated_tokens[self.recorded[slot] :]
            self.recorded[slot] += len(new)
            rows += [slot] * len(new)
            tokens += new
        if tokens:
            self.seen[torch.tensor(rows, device=self.seen.device), torch.tensor(tokens, device=self.seen.device)] = True
        return torch.tensor(slots, dtype=torch.int32, device="cpu")  # host: transformers copies it to the device

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        seen = self.seen[tensor_arg[: scores.size(0)].long()]
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)


def request_id(slot: int) -> str:
    return f"{_REQUEST_PREFIX}{slot}"


def slot_of(request_id: str) -> int:
    return int(request_id.removeprefix(_REQUEST_PREFIX))


def generation_config(tokenizer, sampling, max_new_tokens: int) -> GenerationConfig:
    """The same decoding settings ``generation.sample`` gives ``generate`` (greedy when ``sampling`` is None)."""
    common = {"max_new_tokens": max_new_tokens, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    if sampling is None:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                            repetition_penalty=sampling.repetition_penalty, **common)  # fmt: skip


def _processors(model, config: GenerationConfig, capacity: int) -> tuple[LogitsProcessorList, RepetitionPenalty | None]:
    """``generate``'s processors for ``config``, in its order, the repetition penalty replaced by ours."""
    processors, penalty = LogitsProcessorList(), None
    # input_ids_seq_length: the prompt is part of what is penalised (transformers warns when it is unknown)
    for processor in model._get_logits_processor(config, input_ids_seq_length=1):
        if isinstance(processor, RepetitionPenaltyLogitsProcessor):
            penalty = RepetitionPenalty(processor.penalty, model.config.get_text_config().vocab_size, capacity,
                                        model.device)  # fmt: skip
            processor = penalty
        processors.append(processor)
    return processors, penalty


class _Engine:
    """A scheduler for one model and one decoding setting, kept on the model between calls."""

    def __init__(self, model, config: GenerationConfig, settings, capacity: int, max_tokens: int,
                 logprobs: bool) -> None:  # fmt: skip
        blocks = capacity * math.ceil(max_tokens / PAGE_SIZE)
        cb_config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=blocks,
            max_batch_tokens=settings.max_batch_tokens,
            use_cuda_graph=settings.cuda_graphs and model.device.type == "cuda",
            # The penalty's history is written when a batch is prepared; with asynchronous batching the batch
            # before it is still running, so its tokens would be missing from the history.
            use_async_batching=False,
            allow_block_sharing=False,
            return_logprobs=logprobs,
        )
        hints = WorkloadHints(max_prompt_length=max_tokens, max_generated_length=config.max_new_tokens,
                              num_requests=capacity)  # fmt: skip
        # The manager is made without the penalty (it would drop it, with a warning); ours is installed below.
        without_penalty = GenerationConfig.from_dict({**config.to_dict(), "repetition_penalty": None})
        self.manager = model.init_continuous_batching(without_penalty, cb_config, hints)
        processors, self.penalty = _processors(model, config, capacity)
        processor_list = ContinuousBatchingLogitsProcessorList(processors)
        # transformers counts the argument rows only of the processors it converts itself
        processor_list.tensors_required = sum(isinstance(p, ContinuousBatchingLogitsProcessor) for p in processors)
        self.manager.logit_processor = processor_list
        self.decoding = (config.to_json_string(), settings, logprobs)
        self.capacity, self.max_tokens = capacity, max_tokens
        if self.manager.continuous_batching_config.use_cuda_graph:
            with torch.autocast(model.device.type, enabled=False):  # the thread decodes without autocast, too
                self.manager.warmup()

    def serves(self, decoding: tuple, requests: int, max_tokens: int) -> bool:
        """Whether this scheduler can take a call: the same decoding, and its cache sized for the call."""
        return self.decoding == decoding and self.capacity >= requests and self.max_tokens >= max_tokens

    def run(self, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[tuple[list[int], list[float]]]:
        if self.penalty is not None:
            self.penalty.reset()
        torch.manual_seed(seed)
        # stop() gave the model back its own attention; the scheduler needs the paged one while it runs
        self.manager.switch_to_cb_friendly_attn(
            self.manager.model, self.manager.continuous_batching_config.auto_switch_to_flash
        )
        self.manager.start()
        done: dict[int, tuple[list[int], list[float]]] = {}
        try:
            # Queued while the loop is paused, the scheduler sees every request at once: the same batches every run.
            with self.manager.pause():
                for slot, prompt in enumerate(prompts):
                    self.manager.add_request(prompt, request_id=request_id(slot), max_new_tokens=max_new_tokens,
                                             eos_token_id=self.manager.generation_config.eos_token_id)  # fmt: skip
            while len(done) < len(prompts):
                result = self.manager.get_result(timeout=1)
                if result is None:
                    if not self.manager.is_running():
                        raise RuntimeError("the continuous-batching scheduler stopped before every response ended")
                    continue
                if result.error is not None:
                    raise RuntimeError(f"continuous batching failed on a request: {result.error}")
                if result.is_finished():
                    done[slot_of(result.request_id)] = (list(result.generated_tokens), list(result.logprobs))
        finally:
            self.manager.stop(block=True, keep_for_next_session=True)
            # Kept here, not on the model, where transformers puts it: a copy of the model (the LoRA merge at save
            # time deep-copies it) would try to copy the scheduler's locks.
            self.manager.model.__dict__.pop("_cached_continuous_batching_manager", None)
        return [done[i] for i in range(len(prompts))]

    def destroy(self) -> None:
        self.manager.destroy()


class _Slot:
    """A model's kept engine. Copies of the model start without one: a scheduler's thread state cannot be copied
    (deep copy, pickling), and a copy is another model anyway."""

    def __init__(self) -> None:
        self.engine: _Engine | None = None

    def __deepcopy__(self, memo) -> _Slot:
        return _Slot()

    def __getstate__(self) -> dict:
        return {"engine": None}


def _slot(model) -> _Slot:
    if not isinstance(getattr(model, "_rlhf_continuous", None), _Slot):
        model._rlhf_continuous = _Slot()
    return model._rlhf_continuous


def forget(model) -> None:
    """Destroy the engine kept for ``model`` (the next call builds one anew, as a resumed run does)."""
    slot = _slot(model)
    if slot.engine is not None:
        slot.engine.destroy()
        slot.engine = None


def generate(
    model, tokenizer, prompts: list[list[int]], sampling, max_new_tokens: int, settings, logprobs: bool = False
) -> list[list[int]] | list[tuple[list[int], list[float]]]:
    """Each prompt's generated tokens (ending with EOS where one was sampled), in order; with ``logprobs`` also
    the log-probability the engine sampled each token with (after the penalty, temperature and top-p).

    ``prompts`` are unpadded token ids; ``settings`` is the ``generation`` config group. One draw of the caller's
    RNG seeds the sampling stream, which then continues in the caller's generator as ``generate``'s does."""
    if not prompts:
        return []
    seed = int(torch.randint(0, 2**62, (1,)).item())  # host: a draw of the caller's CPU stream (checkpointed)
    config = generation_config(tokenizer, sampling, max_new_tokens)
    max_tokens = max(len(p) for p in prompts) + max_new_tokens
    slot = _slot(model)
    engine = slot.engine
    if engine is None or not engine.serves((config.to_json_string(), settings, logprobs), len(prompts), max_tokens):
        capacity = max(len(prompts), engine.capacity if engine is not None else 0)
        forget(model)
        engine = slot.engine = _Engine(model, config, settings, capacity, max_tokens, logprobs)
    results = engine.run(prompts, max_new_tokens, seed)
    return results if logprobs else [tokens for tokens, _ in results]


def check_supported(model, synced_gpus: bool) -> None:
    """A clear error where the continuous engine cannot run."""
    if synced_gpus:
        raise ConfigError(
            "generation.engine=continuous cannot sample from a model sharded over several processes (ZeRO-3 with "
            "more than one process gathers its layers inside generate(synced_gpus=True)); set generation.engine to "
            "generate or auto"
        )
    if not hasattr(model, "init_continuous_batching"):
        raise ConfigError(
            f"generation.engine=continuous needs a transformers model with continuous batching; "
            f"{type(model).__name__} has none: set generation.engine to generate or auto"
        )
