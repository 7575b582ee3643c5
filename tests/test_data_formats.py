"""Data as users bring it: the row shapes of TRL, OpenRLHF and verl in JSON lines, gzipped JSON lines, a JSON array,
parquet and a `save_to_disk` directory. The same content in any of them gives the same split rows and token ids;
conversations go through the model's chat template; a bad row names its file and row in every format."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from rlhf_core.config import DataConfig, load_config
from rlhf_core.data.rows import BadRowLog, read_rows
from rlhf_core.data.sources import load_files
from rlhf_core.data.tokenize import HH_CHAT_TEMPLATE, encode_query, encode_response
from rlhf_core.errors import DataError
from rlhf_core.models.tokenizer import train_bpe_tokenizer
from rlhf_core.pipeline import run_stage
from tests.test_chat_template import chatml_tokenizer

FORMATS = ("jsonl", "jsonl.gz", "json", "parquet", "hf_dataset")
N = 12


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You are a terse calculator."}

# ------------------------------------------------------------------------------------- one content, many shapes
SFT = [{"prompt": f"What is {i} + 2?", "response": f"{i} + 2 = {i + 2}."} for i in range(N)]
RM = [{"prompt": f"What is {i} + 3?", "chosen": f"{i + 3}.", "rejected": f"{i + 4}."} for i in range(N)]
PPO = [{"prompt": f"What is {i} + 4?"} for i in range(N)]

SFT_SHAPES = {
    "text": (lambda r: r, []),
    "trl_completion": (lambda r: {"prompt": r["prompt"], "completion": r["response"]}, []),
    "trl_messages": (lambda r: {"messages": [user(r["prompt"]), assistant(r["response"])]}, []),
    "trl_conversational_completion": (
        lambda r: {"prompt": [user(r["prompt"])], "completion": [assistant(r["response"])]}, []),
    "openrlhf_keys": (lambda r: {"question": r["prompt"], "answer": r["response"]},
                      ["data.columns.prompt=question", "data.columns.response=answer"]),
}  # fmt: skip
RM_SHAPES = {
    "text": (lambda r: r, []),
    "trl_conversational": (
        lambda r: {"prompt": [user(r["prompt"])], "chosen": [assistant(r["chosen"])],
                   "rejected": [assistant(r["rejected"])]}, []),
    "trl_implicit_messages": (
        lambda r: {"chosen": [user(r["prompt"]), assistant(r["chosen"])],
                   "rejected": [user(r["prompt"]), assistant(r["rejected"])]}, []),
    "hh_transcripts": (
        lambda r: {"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
                   "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}"}, []),
    "openrlhf_keys": (lambda r: {"input": r["prompt"], "pos": r["chosen"], "neg": r["rejected"]},
                      ["data.columns.prompt=input", "data.columns.chosen=pos", "data.columns.rejected=neg"]),
}  # fmt: skip
PPO_SHAPES = {
    "text": (lambda r: r, []),
    "trl_conversational": (lambda r: {"prompt": [user(r["prompt"])]}, []),
    "messages": (lambda r: {"messages": [user(r["prompt"])]}, []),
}

# A conversation with a system message and two turns: kept as messages, rendered by the model's template.
CHAT = [[SYSTEM, user(f"Hi, I am {i}."), assistant("Hello!"), user(f"What is {i} + 5?")] for i in range(N)]
CHAT_ANSWERS = [f"{i + 5}." for i in range(N)]
CHAT_SFT_SHAPES = {
    "trl_messages": lambda i: {"messages": [*CHAT[i], assistant(CHAT_ANSWERS[i])]},
    "trl_conversational_completion": lambda i: {"prompt": CHAT[i], "completion": [assistant(CHAT_ANSWERS[i])]},
    "conversational_prompt_text_response": lambda i: {"prompt": CHAT[i], "response": CHAT_ANSWERS[i]},
}


def write(path: Path, file_format: str, rows: list[dict]) -> Path:
    """``rows`` written as a user would keep them; returns the file (or directory) to point a setting at."""
    if file_format == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif file_format == "jsonl.gz":
        path = path.with_suffix(".jsonl.gz")
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
    elif file_format == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif file_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def kept(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def read(path: Path, kind: str, overrides=()) -> list[dict]:
    cfg = load_config(None, ["data.source=sim", *overrides]).data
    return read_rows(path, kind, cfg, BadRowLog("error"))


# ---------------------------------------------------------------------------------------- identical rows
@pytest.mark.parametrize("file_format", FORMATS)
@pytest.mark.parametrize(
    ("kind", "content", "shapes"),
    [("sft", SFT, SFT_SHAPES), ("rm", RM, RM_SHAPES), ("prompt", PPO, PPO_SHAPES)],
    ids=["sft", "rm", "prompt"],
)
def test_every_shape_in_every_format_reads_as_the_text_rows(tmp_path, file_format, kind, content, shapes):
    for name, (shape, overrides) in shapes.items():
        path = write(tmp_path / f"{kind}-{name}", file_format, [shape(r) for r in content])
        rows = read(path, kind, overrides)
        assert kept(rows) == content, f"{name} in {file_format}"
        where = f"{path}:{N}" if file_format.startswith("jsonl") else f"{path} row {N - 1}"
        assert rows[-1]["_src"] == where


@pytest.mark.parametrize("file_format", FORMATS)
def test_conversations_with_a_system_turn_and_history_are_kept_as_messages(tmp_path, file_format):
    expected = [{"prompt": CHAT[i], "response": CHAT_ANSWERS[i]} for i in range(N)]
    for name, shape in CHAT_SFT_SHAPES.items():
        path = write(tmp_path / name, file_format, [shape(i) for i in range(N)])
        assert kept(read(path, "sft")) == expected, name


def test_verl_prompt_rows_keep_their_extra_columns(tmp_path):
    rows = [{"data_source": "arith", "prompt": [user(r["prompt"])], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": str(i + 4)}, "extra_info": {"index": i}}
            for i, r in enumerate(PPO)]  # fmt: skip
    got = kept(read(write(tmp_path / "verl", "parquet", rows), "prompt"))
    assert [r["prompt"] for r in got] == [r["prompt"] for r in PPO]
    assert got[3]["reward_model"] == {"style": "rule", "ground_truth": "7"} and got[3]["extra_info"] == {"index": 3}


def test_a_single_user_turn_and_a_transcript_history_encode_as_their_text(tmp_path):
    """The kept form is what makes formats agree: a lone user turn is its text; an HH history its messages."""
    history = [user("Hi."), assistant("Hello!"), user("What is 2 + 2?")]
    rows = [{"chosen": "\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?\n\nAssistant: 4.",
             "rejected": "\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?\n\nAssistant: 5."}]  # fmt: skip
    got = kept(read(write(tmp_path / "hh", "jsonl", rows), "rm"))
    assert got == [{"prompt": history, "chosen": "4.", "rejected": "5."}]


# ------------------------------------------------------------------------------------- the chat template
@pytest.fixture(scope="module")
def tokenizers():
    texts = [f"{SYSTEM['content']} Hi, I am 3. Hello! What is 3 + 5? 8. Human Assistant System"] * 10
    builtin = train_bpe_tokenizer(texts, vocab_size=300)
    return {"chatml": chatml_tokenizer(texts), "builtin": builtin}


def test_conversations_render_through_the_models_template_with_the_end_of_turn_in_the_response(tokenizers):
    tokenizer = tokenizers["chatml"]
    prompt, answer = CHAT[3], CHAT_ANSWERS[3]
    query, response = encode_query(tokenizer, prompt), encode_response(tokenizer, answer)
    whole = tokenizer.apply_chat_template([*prompt, assistant(answer)], tokenize=False)
    ids = tokenizer.encode(whole, add_special_tokens=False)
    assert query + response == ids[: len(query) + len(response)]  # the template adds only "\n" after the turn
    assert tokenizer.decode(ids[len(query) + len(response) :]) == "\n"
    assert response[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(query).startswith("<|im_start|>system\nYou are a terse calculator.<|im_end|>\n")


def test_a_model_without_a_template_gets_the_documented_text_format(tokenizers):
    tokenizer = tokenizers["builtin"]
    query = tokenizer.decode(encode_query(tokenizer, CHAT[3]))
    assert query == ("<s>\n\nSystem: You are a terse calculator.\n\nHuman: Hi, I am 3.\n\nAssistant: Hello!"
                     "\n\nHuman: What is 3 + 5?\n\nAssistant:")  # fmt: skip
    # the tokenizer's own template (saved with it) renders the same text
    assert tokenizer.chat_template == HH_CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(CHAT[3], add_generation_prompt=True, tokenize=False) == query
    assert tokenizer.decode(encode_response(tokenizer, "8.")) == " 8.</s>"


@pytest.mark.parametrize("name", ["chatml", "builtin"])
def test_the_same_content_in_every_shape_gives_the_same_token_ids(tmp_path, tokenizers, name):
    tokenizer = tokenizers[name]
    encoded = {}
    for shape_name, shape in CHAT_SFT_SHAPES.items():
        for file_format in ("jsonl", "parquet"):
            rows = read(
                write(tmp_path / f"{shape_name}-{file_format}", file_format, [shape(i) for i in range(N)]), "sft"
            )
            encoded[shape_name, file_format] = [(encode_query(tokenizer, r["prompt"]),
                                                 encode_response(tokenizer, r["response"])) for r in rows]  # fmt: skip
    first = next(iter(encoded.values()))
    assert all(ids == first for ids in encoded.values())
    text = [(encode_query(tokenizer, r["prompt"]), encode_response(tokenizer, r["response"])) for r in SFT]
    by_shape = {}
    for shape_name, (shape, overrides) in SFT_SHAPES.items():
        rows = read(write(tmp_path / f"text-{shape_name}", "hf_dataset", [shape(r) for r in SFT]), "sft", overrides)
        by_shape[shape_name] = [(encode_query(tokenizer, r["prompt"]), encode_response(tokenizer, r["response"]))
                                for r in rows]  # fmt: skip
    assert all(ids == text for ids in by_shape.values())


# ------------------------------------------------------------------------------------ prepare, end to end
def _prepare(tmp_path: Path, name: str, files: dict[str, Path], overrides=()) -> Path:
    out = tmp_path / name
    config = load_config(None, [
        "data.source=files", *(f"data.{k}_file={v}" for k, v in files.items()), "model.vocab_size=300",
        "data.splits.sft_train=8", "data.splits.sft_val=4", "data.splits.rm_train=8", "data.splits.rm_test=4",
        "data.splits.ppo=8", "data.splits.eval=4", "tracking.enabled=false", f"paths.data={out}", *overrides,
    ])  # fmt: skip
    run_stage("prepare", config)
    return out


def test_prepare_gives_identical_splits_and_tokenizer_from_every_format(tmp_path):
    written = {}
    for file_format, (sft_shape, rm_shape, ppo_shape) in {
        "jsonl": ("text", "text", "text"),
        "parquet": ("trl_messages", "trl_implicit_messages", "trl_conversational"),
        "hf_dataset": ("trl_conversational_completion", "trl_conversational", "messages"),
        "json": ("trl_completion", "hh_transcripts", "text"),
    }.items():
        files = {
            "sft": write(tmp_path / f"sft-{file_format}", file_format, [SFT_SHAPES[sft_shape][0](r) for r in SFT]),
            "rm": write(tmp_path / f"rm-{file_format}", file_format, [RM_SHAPES[rm_shape][0](r) for r in RM]),
            "ppo": write(tmp_path / f"ppo-{file_format}", file_format, [PPO_SHAPES[ppo_shape][0](r) for r in PPO]),
        }
        out = _prepare(tmp_path, f"data-{file_format}", files)
        written[file_format] = {
            p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted((out / "splits").glob("*.jsonl")) + [out / "tokenizer" / "tokenizer.json"]
        }
    reference = written.pop("jsonl")
    assert len(reference) == 7 and all(reference.values())
    for file_format, files in written.items():
        assert files == reference, file_format


def test_prepare_says_what_it_dropped_per_file_and_which_prompts_splits_share(tmp_path, capsys):
    sft = write(
        tmp_path / "sft", "parquet", [*SFT, {"prompt": "Hi", "response": None}, {"prompt": "", "response": "x"}]
    )
    rm = write(tmp_path / "rm", "jsonl", [*RM[:6], *({**r, "prompt": SFT[i]["prompt"]} for i, r in enumerate(RM[6:]))])
    out = _prepare(tmp_path, "data", {"sft": sft, "rm": rm, "ppo": write(tmp_path / "ppo", "json", PPO)},
                   ["data.on_bad_rows=skip", "data.max_response_tokens=40"])  # fmt: skip
    err = capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())
    dropped = [line for line in err.splitlines() if "dropped" in line]
    assert any(line.startswith(f"prepare: {sft}: dropped 2 of 14 rows (data.on_bad_rows=skip): ") for line in dropped)
    assert not any(line.startswith(f"prepare: {rm}:") for line in dropped), "nothing dropped: no line"
    assert "1 field 'response' must be text or a list of {role, content} messages, got null" in err
    assert stats["bad_rows"]["by_file"][str(sft)]["empty field 'prompt'"] == 1
    assert "prompts shared between splits" in err and stats["cross_split_prompt_overlap"]
    assert stats["report"] == [
        line.removeprefix("prepare: ") for line in err.splitlines() if line.startswith("prepare:")
    ]
    # the prompt limit was derived, the response limit set
    assert stats["token_limits"]["derived"] == ["max_prompt_tokens"]
    assert stats["token_limits"]["max_prompt_tokens"] == stats["token_lengths"]["prompt"]["max"]
    assert "data.max_prompt_tokens=" in err and "derived from the data" in err


# --------------------------------------------------------------------------------------------- bad rows
BAD_ROWS = [
    # (kind, rows with the bad one at index 2, reason)
    ("sft", [{"prompt": "a?", "response": None}], "field 'response' must be text or a list of {role, content} "
     "messages, got null"),
    ("sft", [{"messages": [user("a?"), user("b?")]}],
     "turns out of order: field 'messages' message 1 is a user turn where an assistant turn belongs"),
    ("sft", [{"messages": [user("a?"), {"role": "tool", "content": "x"}]}], "role 'tool' is not one of"),
    ("sft", [{"messages": [user("a?"), assistant("b")], "extra": 1}], None),  # extra columns are fine
    ("sft", [{"prompt": [user("a?"), SYSTEM], "response": "b"}], "message 1 is a system message; it must come first"),
    ("sft", [{"prompt": [user("a?")], "completion": [assistant("b"), assistant("c")]}],
     "must be one assistant message answering the prompt"),
    ("rm", [{"chosen": [user("a?"), assistant("b")], "rejected": [user("z?"), assistant("c")]}],
     "differ at message 0, before their final answer"),
    ("rm", [{"chosen": "\n\nHuman: a?\n\nAssistant: b", "rejected": "\n\nHuman: z?\n\nAssistant: c"}],
     "continue different dialogues"),
    ("rm", [{"chosen": [user("a?"), assistant("b")], "rejected": "\n\nHuman: a?\n\nAssistant: c"}],
     "must both be text (HH-RLHF transcripts) or both be message lists"),
    ("prompt", [{"messages": [user("a?"), assistant("b")]}],
     "turns out of order: field 'messages' must end with a user turn"),
]  # fmt: skip


@pytest.mark.parametrize("file_format", ["jsonl", "json", "parquet", "hf_dataset"])
@pytest.mark.parametrize(("kind", "bad", "reason"), BAD_ROWS, ids=range(len(BAD_ROWS)))
def test_a_bad_row_names_its_file_and_row_in_every_format(tmp_path, file_format, kind, bad, reason):
    good = {"sft": SFT, "rm": RM, "prompt": PPO}[kind]
    rows = [*good[:2], *bad, *good[2:4]]
    if file_format in ("parquet", "hf_dataset") and bad[0].keys() != good[0].keys():
        pytest.skip("a table's rows share their columns")
    try:
        path = write(tmp_path / "rows", file_format, rows)
    except (TypeError, ValueError) as exc:  # pyarrow's ArrowTypeError / ArrowInvalid
        pytest.skip(f"a table's column holds one type: {exc}")
    if reason is None:
        assert len(read(path, kind)) == 5
        return
    with pytest.raises(DataError) as info:
        read(path, kind)
    where = f"{path}:3" if file_format == "jsonl" else f"{path} row 2"
    assert str(info.value).startswith(f"{where}: ") and reason in str(info.value)
    skipped = BadRowLog("skip")
    cfg = load_config(None, ["data.source=sim"]).data
    assert len(read_rows(path, kind, cfg, skipped)) == 4 and skipped.as_stats()["total"] == 1


def test_multimodal_content_and_tool_calls_are_named(tmp_path):
    image = {"messages": [{"role": "user", "content": [{"type": "image"}]}, assistant("b")]}
    tool = {"messages": [user("a?"), {"role": "assistant", "content": "b", "tool_calls": [{"name": "f"}]}]}
    for row, reason in ((image, "content must be text, got a list of content parts"),
                        (tool, "unrenderable message: field 'messages' message 1 has tool_calls")):  # fmt: skip
        with pytest.raises(DataError, match=reason):
            read(write(tmp_path / "rows", "jsonl", [row]), "sft")
    # a table gives every message every key: an empty tool_calls is no tool call
    path = write(tmp_path / "table", "parquet", [tool, {"messages": [user("c?"), assistant("d")]}])
    with pytest.raises(
        DataError, match=f"{path} row 0: unrenderable message: field 'messages' message 1 has tool_calls"
    ):
        read(path, "sft")


# ---------------------------------------------------------------------------------------- bad files
def test_files_that_hold_nothing_or_cannot_be_told_are_named(tmp_path):
    cases = {
        "empty.jsonl": (b"", "is empty (0 bytes)"),
        "empty.jsonl.gz": (b"", "is empty (0 bytes)"),
        "blank.jsonl.gz": (gzip.compress(b"\n\n"), "holds no rows"),
        "array.json": (b"[]", "holds no rows"),
        "rows.txt": (b'{"prompt": "a"}\n', "cannot tell the format from the name"),
        "broken.json": (b'[{"prompt": "a"},\n{"prompt": }]', "broken.json:2: bad JSON"),
        "fake.parquet": (b"not parquet at all", "cannot read it as parquet"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=re.escape(reason)) as info:
            read(path, "prompt")
        assert str(path) in str(info.value), name
    # a name that does not tell is read with data.file_format
    assert kept(read(tmp_path / "rows.txt", "prompt", ["data.file_format=jsonl"])) == [{"prompt": "a"}]


def test_a_saved_dataset_dict_with_several_splits_asks_for_one(tmp_path):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PPO), "test": datasets.Dataset.from_list(PPO)}
    ).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="holds the splits train, test: point the setting at one of them"):
        read(tmp_path / "dd", "prompt")
    assert kept(read(tmp_path / "dd" / "train", "prompt")) == PPO
    single = tmp_path / "single"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PPO)}).save_to_disk(str(single))
    rows = read(single, "prompt")
    assert kept(rows) == PPO and rows[0]["_src"] == f"{single / 'train'} row 0"


def test_the_old_source_name_still_reads_files(tmp_path):
    files = {k: write(tmp_path / k, "jsonl", rows) for k, rows in (("sft", SFT), ("rm", RM), ("ppo", PPO))}
    cfg = DataConfig(source="jsonl", **{f"{k}_file": str(v) for k, v in files.items()})
    assert cfg.source == "files"
    splits, _ = load_files(cfg, BadRowLog("error"))
    assert splits["rm_train"] and all(r in RM for r in kept(splits["rm_train"] + splits["rm_test"]))
    assert splits["ppo"] and all(r in PPO for r in kept(splits["ppo"] + splits["eval"]))


# ------------------------------------------------------------------------------------------- token limits
@pytest.mark.parametrize(
    ("set_limits", "longest", "positions", "expected"),
    [
        ((None, None), (44, 73), 256, (44, 73, ["max_prompt_tokens", "max_response_tokens"])),  # fits: the longest
        ((None, None), (880, 373), 1024, (719, 305, ["max_prompt_tokens", "max_response_tokens"])),  # 1024*880//1253
        ((None, 80), (300, 50), 256, (176, 80, ["max_prompt_tokens"])),  # the set one kept, the rest to the other
        ((96, None), (40, 300), 256, (96, 160, ["max_response_tokens"])),
        ((96, 80), (400, 400), 256, (96, 80, [])),  # set values are kept as they are
        ((None, None), (500, 600), None, (500, 600, ["max_prompt_tokens", "max_response_tokens"])),  # no bound known
        ((None, None), (1, 1), 256, (4, 2, ["max_prompt_tokens", "max_response_tokens"])),  # the schema's minimums
    ],
)
def test_derived_token_limits_by_hand(set_limits, longest, positions, expected):
    from rlhf_core.data.limits import derive_limits

    got = derive_limits(*set_limits, longest, positions)
    assert (got["max_prompt_tokens"], got["max_response_tokens"], got["derived"]) == expected


def test_a_set_limit_that_leaves_no_room_for_the_derived_one_is_refused():
    from rlhf_core.data.limits import derive_limits
    from rlhf_core.errors import ConfigError

    assert derive_limits(254, None, (300, 40), 256)["max_response_tokens"] == 2
    with pytest.raises(ConfigError, match="cannot fit the model's 256 positions"):
        derive_limits(255, None, (300, 40), 256)


def test_later_stages_take_the_limits_the_data_was_prepared_with(tmp_path, capsys):
    from rlhf_core.data.limits import response_token_limit

    files = {k: write(tmp_path / k, "jsonl", rows) for k, rows in (("sft", SFT), ("rm", RM), ("ppo", PPO))}
    out = _prepare(tmp_path, "data", files, ["model.max_position_embeddings=32"])
    stats = json.loads((out / "stats.json").read_text())
    limits, lengths = stats["token_limits"], stats["token_lengths"]
    assert limits["positions"] == 32 and limits["max_prompt_tokens"] + limits["max_response_tokens"] <= 32
    assert (limits["max_prompt_tokens"], limits["max_response_tokens"]) == (lengths["prompt"]["max"],
                                                                           lengths["response"]["max"])  # fmt: skip
    config = load_config(None, [f"paths.data={out}"])
    assert response_token_limit(config) == limits["max_response_tokens"]
    assert response_token_limit(load_config(None, [f"paths.data={out}", "data.max_response_tokens=9"])) == 9
    with pytest.raises(DataError, match="run `rlhf prepare` first"):
        response_token_limit(load_config(None, [f"paths.data={tmp_path / 'nowhere'}"]))
    # error mode: a row the shared positions cannot hold names the derived limit and what to set
    with pytest.raises(DataError, match="derived to share the model's 16 positions: set data.max_prompt_tokens"):
        _prepare(tmp_path, "data-16", files, ["model.max_position_embeddings=16"])
