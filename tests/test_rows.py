"""Row validation with file:line errors, HH-RLHF parsing, partitioning, and prepare on file sources."""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
from pathlib import Path

import pytest

from rlhf_core.config import DataConfig, load_config
from rlhf_core.data.rows import SPLIT_KINDS, BadRow, BadRowLog, load_split, read_rows, validate_row
from rlhf_core.data.sources import SPLITS, partition, read_hh_rlhf, split_transcript
from rlhf_core.errors import DataError
from rlhf_core.pipeline import run_stage

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# 15 lines: 12 pairs, transcripts whose histories differ on lines 6 and 10, line 8 blank
HH_SMALL = FIXTURES / "hh_small.jsonl"
HH_SHARED = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
SFT_NEEDS = "an sft row needs prompt and response or completion, or messages"
TEXT_OR_MESSAGES = "text or a list of {role, content} messages"
HINT = " (fix the row, or set data.on_bad_rows=skip to drop such rows)"

CFG = DataConfig(max_prompt_chars=10, max_response_chars=20)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r) for r in rows])


# ------------------------------------------------------------------------------------------ validate_row
BAD_ROWS = [
    # (kind, line, reason)
    ("sft", "not json", "bad JSON: Expecting value at column 1"),
    ("sft", '["Hi", "Hello."]', "expected a JSON object, got list"),
    ("sft", '"Hi"', "expected a JSON object, got str"),
    ("sft", '{"prompt": "Hi"}', f"missing field 'response' or 'completion' ({SFT_NEEDS})"),
    ("sft", '{"prompt": "   ", "response": "Hello."}', "empty field 'prompt'"),
    ("sft", '{"prompt": "Hi", "response": " \\t\\n "}', "empty field 'response'"),
    ("sft", '{"prompt": 5, "response": "Hello."}', f"field 'prompt' must be {TEXT_OR_MESSAGES}, got number"),
    ("sft", '{"prompt": "Hi", "response": 2.5}', f"field 'response' must be {TEXT_OR_MESSAGES}, got number"),
    ("sft", '{"prompt": "Hi", "response": null}', f"field 'response' must be {TEXT_OR_MESSAGES}, got null"),
    ("sft", '{"prompt": "12345678901", "response": "Hello."}',
     "over-long field 'prompt': 11 characters > data.max_prompt_chars=10"),
    ("sft", '{"prompt": "Hi", "response": "123456789012345678901"}',
     "over-long field 'response': 21 characters > data.max_response_chars=20"),
    ("rm", '{"prompt": "Hi", "chosen": "Hello."}',
     "missing field 'rejected' (an rm row needs chosen and rejected, with prompt or the prompt inside both)"),
    ("rm", '{"prompt": "Hi", "chosen": "Hello.", "rejected": "  Hello. "}',
     "identical chosen and rejected responses"),
    ("rm", '{"prompt": "Hi", "chosen": "Hello.", "rejected": "123456789012345678901"}',
     "over-long field 'rejected': 21 characters > data.max_response_chars=20"),
    ("prompt", '{"text": "Hi"}',
     "missing field 'prompt' (a prompt row needs prompt, or messages ending with a user turn)"),
]  # fmt: skip
GOOD = {
    "sft": {"prompt": "Hi", "response": "Hello."},
    "rm": {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."},
    "prompt": {"prompt": "Hi"},
}


@pytest.mark.parametrize(("kind", "line", "reason"), BAD_ROWS)
def test_each_bad_row_stops_with_file_and_line(tmp_path, kind, line, reason):
    # line 1 good, line 2 empty, line 3 whitespace only, line 4 bad, line 5 good
    path = write_lines(tmp_path / "rows.jsonl", [json.dumps(GOOD[kind]), "", "   \t", line, json.dumps(GOOD[kind])])
    with pytest.raises(DataError) as info:
        read_rows(path, kind, CFG, BadRowLog("error"))
    message = str(info.value)
    assert message.startswith(f"{path}:4:")
    assert message == f"{path}:4: {reason}{HINT}"


@pytest.mark.parametrize(("kind", "line", "reason"), [b for b in BAD_ROWS if not b[2].startswith("bad JSON")])
def test_validate_row_raises_badrow_with_the_reason(kind, line, reason):
    with pytest.raises(BadRow) as info:
        validate_row(json.loads(line), kind, CFG)
    assert str(info.value) == reason


def test_validate_row_accepts_limits_exactly_and_keeps_extra_keys():
    row = {"prompt": "1234567890", "response": "12345678901234567890", "category": "x", "n": 3}
    assert validate_row(row, "sft", CFG) == row
    assert validate_row({"prompt": "Hi", "chosen": "Yes.", "rejected": "yes."}, "rm", CFG)  # case differs: ok


def test_good_rows_keep_their_line_numbers_across_blank_lines(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl", ["", json.dumps(GOOD["sft"]), "  ", "", json.dumps(
        {"prompt": "Bye", "response": "Goodbye.", "category": "farewell"})])  # fmt: skip
    rows = read_rows(path, "sft", CFG, BadRowLog("error"))
    assert rows == [
        {"prompt": "Hi", "response": "Hello.", "_src": f"{path}:2", "_file": str(path)},
        {"prompt": "Bye", "response": "Goodbye.", "category": "farewell", "_src": f"{path}:5", "_file": str(path)},
    ]


SKIP_FILE = [
    '{"prompt": "Hi", "response": "Hello.", "category": "greeting"}',  # 1 good
    "",  # 2
    "not json",  # 3
    '["Hi", "Hello."]',  # 4
    '{"prompt": "Hi"}',  # 5
    '{"prompt": "   ", "response": "Hello."}',  # 6
    '{"prompt": 5, "response": "Hello."}',  # 7
    '{"prompt": "12345678901", "response": "Hello."}',  # 8
    '{"prompt": "Hi", "response": "123456789012345678901"}',  # 9
    '{"prompt": "Bye", "response": "Goodbye."}',  # 10 good
    "   ",  # 11
    '{"prompt": }',  # 12
    '{"prompt": "Why?", "response": "Because."}',  # 13 good
]


def _skip_expectations(path):
    rows = [
        {"prompt": "Hi", "response": "Hello.", "category": "greeting", "_src": f"{path}:1", "_file": str(path)},
        {"prompt": "Bye", "response": "Goodbye.", "_src": f"{path}:10", "_file": str(path)},
        {"prompt": "Why?", "response": "Because.", "_src": f"{path}:13", "_file": str(path)},
    ]
    reasons = {
        "bad JSON": 2,
        "expected a JSON object, got list": 1,
        f"missing field 'response' or 'completion' ({SFT_NEEDS})": 1,
        "empty field 'prompt'": 1,
        f"field 'prompt' must be {TEXT_OR_MESSAGES}, got number": 1,
        "over-long field 'prompt'": 1,
        "over-long field 'response'": 1,
    }
    stats = {
        "total": 8,
        "by_reason": reasons,
        "by_file": {str(path): reasons},
        "examples": [
            f"{path}:3: bad JSON: Expecting value at column 1",
            f"{path}:4: expected a JSON object, got list",
            f"{path}:5: missing field 'response' or 'completion' ({SFT_NEEDS})",
            f"{path}:6: empty field 'prompt'",
            f"{path}:7: field 'prompt' must be {TEXT_OR_MESSAGES}, got number",
            f"{path}:8: over-long field 'prompt': 11 characters > data.max_prompt_chars=10",
            f"{path}:9: over-long field 'response': 21 characters > data.max_response_chars=20",
            f"{path}:12: bad JSON: Expecting value at column 12",
        ],
    }
    return rows, stats


def test_skip_mode_keeps_good_rows_and_counts_the_bad(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", SKIP_FILE)
    bad = BadRowLog("skip")
    rows = read_rows(path, "sft", CFG, bad)
    expected_rows, expected_stats = _skip_expectations(path)
    assert rows == expected_rows
    assert bad.as_stats() == expected_stats
    # error mode stops at the first bad line of the same file
    with pytest.raises(DataError, match=re.escape(f"{path}:3: bad JSON: Expecting value at column 1")):
        read_rows(path, "sft", CFG, BadRowLog("error"))


def test_bad_json_column_points_at_the_end_of_a_truncated_row(tmp_path):
    """A row cut off after 15 characters: the parser stops at column 16 of that line, not column 1."""
    path = write_lines(tmp_path / "cut.jsonl", [json.dumps(GOOD["sft"]), '{"prompt": "Hi"'])
    with pytest.raises(DataError) as info:
        read_rows(path, "sft", CFG, BadRowLog("error"))
    assert str(info.value) == f"{path}:2: bad JSON: Expecting ',' delimiter at column 16{HINT}"


def test_gzipped_rows_read_the_same(tmp_path):
    path = tmp_path / "mixed.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in SKIP_FILE))
    bad = BadRowLog("skip")
    rows = read_rows(path, "sft", CFG, bad)
    expected_rows, expected_stats = _skip_expectations(path)
    assert rows == expected_rows
    assert bad.as_stats() == expected_stats


def test_bad_row_log_keeps_twenty_examples_but_counts_all(tmp_path):
    path = write_lines(tmp_path / "many.jsonl", ['{"prompt": "Hi"}'] * 25 + [json.dumps(GOOD["sft"])])
    bad = BadRowLog("skip")
    assert len(read_rows(path, "sft", CFG, bad)) == 1
    stats = bad.as_stats()
    assert stats["total"] == 25
    assert len(stats["examples"]) == 20
    assert stats["examples"][-1].startswith(f"{path}:20: missing field 'response'")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_rows(tmp_path / "nope.jsonl", "sft", CFG, BadRowLog("skip"))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"prompt": "A?", "response": "B."}\n{"prompt": "\xff\xfe", "response": "x."}\n')
    with pytest.raises(DataError, match=re.escape(f"{binary}:2: not UTF-8: byte 0xff at column 13")):
        read_rows(binary, "sft", CFG, BadRowLog("error"))
    skipped = BadRowLog("skip")  # a bad byte is a bad row like any other: on_bad_rows=skip drops it
    assert [r["prompt"] for r in read_rows(binary, "sft", CFG, skipped)] == ["A?"]
    assert skipped.as_stats()["by_reason"] == {"not UTF-8": 1}


def test_a_truncated_gzip_file_names_the_file_and_the_last_line_read(tmp_path):
    import gzip

    rows = b"".join(b'{"prompt": "Q%d?", "response": "A."}\n' % i for i in range(2000))
    packed = gzip.compress(rows)
    truncated = tmp_path / "rows.jsonl.gz"
    truncated.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=re.escape(f"{truncated}: cannot read past line ")) as caught:
        read_rows(truncated, "sft", CFG, BadRowLog("skip"))
    assert "truncated or damaged" in str(caught.value)
    garbage = tmp_path / "garbage.jsonl.gz"
    garbage.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=re.escape(f"{garbage}: cannot read past line 0")):
        read_rows(garbage, "sft", CFG, BadRowLog("skip"))


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x85"])
def test_control_characters_in_a_text_are_a_bad_row(char):
    row = {"prompt": f"Hi{char}there?", "response": "Hello."}
    with pytest.raises(BadRow, match=f"control character: U\\+{ord(char):04X} in field 'prompt' at character 3"):
        validate_row(row, "sft", CFG)
    assert validate_row({"prompt": "A\tb,\r\nc?", "response": "Yes."}, "sft", CFG)  # tab and newlines are text


def test_load_split_reads_prepared_splits_and_fails_clearly(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    with pytest.raises(DataError, match=re.escape(f"split file not found: {splits / 'ppo.jsonl'}")):
        load_split(tmp_path, "ppo", DataConfig())
    write_lines(splits / "ppo.jsonl", ["", "  "])
    with pytest.raises(DataError, match=re.escape(f"{splits / 'ppo.jsonl'}: the split 'ppo' is empty")):
        load_split(tmp_path, "ppo", DataConfig())
    rm = write_lines(
        splits / "rm_test.jsonl", [json.dumps(GOOD["rm"]), json.dumps({**GOOD["rm"], "rejected": "Hello."})]
    )
    with pytest.raises(DataError, match=re.escape(f"{rm}:2: identical chosen and rejected responses")):
        load_split(tmp_path, "rm_test", DataConfig())
    write_rows(splits / "eval.jsonl", [{"prompt": "A?"}, {"prompt": "B?", "category": "facts"}])
    assert load_split(tmp_path, "eval", DataConfig()) == [
        {"prompt": "A?", "_src": f"{splits / 'eval.jsonl'}:1", "_file": str(splits / "eval.jsonl")},
        {
            "prompt": "B?",
            "category": "facts",
            "_src": f"{splits / 'eval.jsonl'}:2",
            "_file": str(splits / "eval.jsonl"),
        },
    ]


# -------------------------------------------------------------------------------------------------- HH-RLHF
def test_split_transcript_multi_turn():
    text = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 + 2?\n\nAssistant: 2 + 2 = 4."
    assert split_transcript(text) == (
        "Human: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 + 2?",
        "2 + 2 = 4.",
    )
    # the leading blank line is optional; surrounding whitespace of the response is dropped
    assert split_transcript("Human: Hi.\n\nAssistant:   Hello.  \n") == ("Human: Hi.", "Hello.")
    # the response may itself span lines
    assert split_transcript("\n\nHuman: List two.\n\nAssistant: One.\nTwo.") == (
        "Human: List two.",
        "One.\nTwo.",
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Just some text.", "not an HH-RLHF transcript"),
        ("\n\nHuman: Hi.", "not an HH-RLHF transcript"),
        ("\n\nAssistant: Hello.", "not an HH-RLHF transcript"),
        ("\n\nHuman: Hi.\n\nAssistant:   ", "empty final assistant response"),
    ],
)
def test_split_transcript_rejects_non_transcripts(text, reason):
    with pytest.raises(BadRow, match=reason):
        split_transcript(text)


def test_split_transcript_rejects_a_transcript_ending_with_a_human_turn():
    """The final turn must be the assistant's: otherwise the 'response' would contain a human turn."""
    text = "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: Bye."
    with pytest.raises(BadRow):
        split_transcript(text)


FIXTURE_LINES = [1, 2, 3, 4, 5, 7, 9, 11, 12, 13, 14, 15]


def test_read_hh_rlhf_fixture(tmp_path):
    path = tmp_path / "hh.jsonl"
    shutil.copy(HH_SMALL, path)
    cfg = DataConfig(source="hh_rlhf", path=str(path))
    log = BadRowLog("error")
    pairs, stats = read_hh_rlhf(cfg, log)
    assert log.rows_read == {str(path): 14}  # 15 lines, one blank: 12 pairs and 2 that are no pairs
    assert stats == {
        "path": str(path), "pairs_read": 12, "history_mismatch_dropped": 2,
        "history_mismatch_rows": [f"{path}:6", f"{path}:10"],
    }  # fmt: skip
    assert [p["_src"] for p in pairs] == [f"{path}:{n}" for n in FIXTURE_LINES]
    assert pairs[0] == {
        "prompt": "Human: How do I boil an egg?",
        "chosen": "Put it in boiling water for nine minutes.",
        "rejected": "Eggs are round.",
        "_src": f"{path}:1",
        "_file": str(path),
    }
    assert pairs[5] == {
        "prompt": "Human: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 + 2?",
        "chosen": "2 + 2 = 4.",
        "rejected": "2 + 2 = 5.",
        "_src": f"{path}:7",
        "_file": str(path),
    }
    assert pairs[-1]["chosen"] == "Joyful." and pairs[-1]["rejected"] == "Sad."
    assert all(p["prompt"].startswith("Human: ") for p in pairs)

    gz = tmp_path / "hh.jsonl.gz"
    with gzip.open(gz, "wb") as handle:
        handle.write(HH_SMALL.read_bytes())
    pairs_gz, stats_gz = read_hh_rlhf(DataConfig(source="hh_rlhf", path=str(gz)), BadRowLog("error"))
    assert stats_gz == {**stats, "path": str(gz), "history_mismatch_rows": [f"{gz}:6", f"{gz}:10"]}
    strip = [{k: v for k, v in p.items() if not k.startswith("_")} for p in pairs]
    assert [{k: v for k, v in p.items() if not k.startswith("_")} for p in pairs_gz] == strip
    assert pairs_gz[0]["_src"] == f"{gz}:1"


def test_read_hh_rlhf_bad_rows(tmp_path):
    def t(human, assistant):
        return f"\n\nHuman: {human}\n\nAssistant: {assistant}"

    lines = [
        json.dumps({"chosen": t("Hi.", "Hello."), "rejected": t("Hi.", "Go away.")}),  # 1 good
        json.dumps({"chosen": t("Hi.", "Hello.")}),  # 2 no rejected
        json.dumps({"chosen": "Hello there.", "rejected": t("Hi.", "No.")}),  # 3 not a transcript
        json.dumps({"chosen": t("Yo.", "Hey."), "rejected": t("Yo.", " Hey. ")}),  # 4 identical responses
        json.dumps({"chosen": t("Sup?", ""), "rejected": t("Sup?", "Nothing.")}),  # 5 empty final response
        "{oops",  # 6 bad JSON
        json.dumps({"chosen": 3, "rejected": t("Hi.", "No.")}),  # 7 non-string
        json.dumps({"chosen": t("Why?", "Because."), "rejected": t("How?", "Like so.")}),  # 8 mismatch
        json.dumps({"chosen": t("Bye.", "Goodbye."), "rejected": t("Bye.", "Whatever.")}),  # 9 good
    ]
    path = write_lines(tmp_path / "hh_bad.jsonl", lines)
    cfg = DataConfig(source="hh_rlhf", path=str(path))
    with pytest.raises(DataError) as info:
        read_hh_rlhf(cfg, BadRowLog("error"))
    assert str(info.value) == (
        f"{path}:2: missing or non-string field 'rejected' (HH-RLHF rows need chosen, rejected){HINT}"
    )

    bad = BadRowLog("skip")
    pairs, stats = read_hh_rlhf(cfg, bad)
    assert [p["_src"] for p in pairs] == [f"{path}:1", f"{path}:9"]
    assert stats == {
        "path": str(path), "pairs_read": 2, "history_mismatch_dropped": 1, "history_mismatch_rows": [f"{path}:8"]
    }  # fmt: skip
    assert bad.as_stats()["by_reason"] == {
        "missing or non-string field 'rejected' (HH-RLHF rows need chosen, rejected)": 1,
        "not an HH-RLHF transcript": 1,
        "identical chosen and rejected responses": 1,
        "empty final assistant response": 1,
        "bad JSON": 1,
        "missing or non-string field 'chosen' (HH-RLHF rows need chosen, rejected)": 1,
    }
    assert [e.split(": ")[0] for e in bad.as_stats()["examples"]] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7)]


def test_read_real_hh_rlhf_harmless_test_file():
    if not HH_SHARED.is_file():
        pytest.skip(f"{HH_SHARED} is not available")
    cfg = DataConfig(source="hh_rlhf", path=str(HH_SHARED), on_bad_rows="skip")
    bad = BadRowLog("skip")
    pairs, stats = read_hh_rlhf(cfg, bad)
    with gzip.open(HH_SHARED, "rt", encoding="utf-8") as handle:
        n_lines = sum(1 for line in handle if line.strip())
    assert len(pairs) > 2200  # the harmless-base test file has 2312 rows
    assert stats["pairs_read"] == len(pairs)
    assert len(pairs) + stats["history_mismatch_dropped"] + bad.as_stats()["total"] == n_lines
    for pair in pairs:
        assert pair["prompt"].startswith("Human:")
        # the history ends with a human turn, the responses are the final assistant turns
        history = "\n\n" + pair["prompt"]
        assert history.rfind("\n\nHuman:") > history.rfind("\n\nAssistant:")
        assert pair["chosen"].strip() and pair["rejected"].strip()
        assert pair["chosen"].strip() != pair["rejected"].strip()
        assert "\n\nHuman:" not in pair["chosen"] and "\n\nAssistant:" not in pair["chosen"]


# -------------------------------------------------------------------------------------------------- partition
def _rows(n, prefix="p"):
    return [{"prompt": f"{prefix}{i}", "i": i} for i in range(n)]


def _prompts(rows):
    return {r["prompt"] for r in rows}


def test_partition_respects_sizes_and_is_disjoint():
    rows = _rows(10)
    sizes = {"a": 4, "b": 3, "c": 3}
    out, info = partition(rows, sizes, random.Random(0))
    assert info == {}
    assert {k: len(v) for k, v in out.items()} == sizes
    assert _prompts(out["a"]) | _prompts(out["b"]) | _prompts(out["c"]) == _prompts(rows)
    assert not (_prompts(out["a"]) & _prompts(out["b"]) or _prompts(out["a"]) & _prompts(out["c"])
                or _prompts(out["b"]) & _prompts(out["c"]))  # fmt: skip
    # the shuffled prompts fill the splits in order
    order = [r["prompt"] for r in rows]
    random.Random(0).shuffle(order)
    assert [r["prompt"] for r in out["a"]] == order[:4]
    assert [r["prompt"] for r in out["b"]] == order[4:7]
    assert [r["prompt"] for r in out["c"]] == order[7:]
    # deterministic for an rng seed
    assert partition(rows, sizes, random.Random(0)) == (out, info)
    assert partition(rows, sizes, random.Random(1))[0] != out


def test_partition_leaves_surplus_rows_out():
    out, info = partition(_rows(10), {"a": 3, "b": 2}, random.Random(0))
    assert info == {}
    assert (len(out["a"]), len(out["b"])) == (3, 2)


@pytest.mark.parametrize(
    ("n", "sizes", "expected", "scale"),
    [
        (10, {"a": 8, "b": 8, "c": 4}, {"a": 4, "b": 4, "c": 2}, 0.5),
        (6, {"a": 8, "b": 2}, {"a": 4, "b": 1}, 0.6),  # floor(4.8), floor(1.2)
        (50, {"a": 60, "b": 20, "c": 20}, {"a": 30, "b": 10, "c": 10}, 0.5),
        (3, {"a": 10, "b": 2}, {"a": 2, "b": 0}, 0.25),  # floor(2.5), floor(0.5)
    ],
)
def test_partition_scales_down_proportionally_when_rows_are_short(n, sizes, expected, scale):
    out, info = partition(_rows(n), sizes, random.Random(0))
    assert {k: len(v) for k, v in out.items()} == expected
    assert info == {"requested": sizes, "scale": scale}


def test_partition_scaling_is_exact_when_the_proportion_is_a_whole_number():
    """30 rows for 22 + 22 requested: scale 30/44, so each split should get exactly 22 * 30/44 = 15 rows."""
    out, info = partition(_rows(30), {"a": 22, "b": 22}, random.Random(0))
    assert info["scale"] == pytest.approx(30 / 44, abs=1e-6)
    assert {k: len(v) for k, v in out.items()} == {"a": 15, "b": 15}


def test_partition_keeps_rows_of_one_prompt_together():
    rows = [{"prompt": f"q{i}", "k": k} for i in range(4) for k in range(3)]  # 4 prompts x 3 rows
    out, info = partition(rows, {"a": 6, "b": 6}, random.Random(3))
    assert info == {}
    for name in ("a", "b"):
        assert len(out[name]) == 6
        assert len(_prompts(out[name])) == 2  # two whole prompt groups each
        for prompt in _prompts(out[name]):
            assert sorted(r["k"] for r in out[name] if r["prompt"] == prompt) == [0, 1, 2]
    assert not _prompts(out["a"]) & _prompts(out["b"])


@pytest.mark.parametrize("seed", range(30))
def test_partition_never_splits_a_prompt_across_splits(seed):
    # one prompt with 5 rows among 7 singletons; groups that do not fit lose their surplus rows
    rows = [{"prompt": "big", "k": k} for k in range(5)] + _rows(7)
    sizes = {"a": 3, "b": 4, "c": 5}
    out, _ = partition(rows, sizes, random.Random(seed))
    seen = {}
    for name, split_rows in out.items():
        assert len(split_rows) <= sizes[name]
        for r in split_rows:
            assert seen.setdefault(r["prompt"], name) == name
    assert sum(len(v) for v in out.values()) >= 7


# ---------------------------------------------------------------------------------------- prepare (jsonl)
SFT_ROWS = [{"prompt": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1}.", "category": "math"} for i in range(6)]
RM_ROWS = [{"prompt": f"Name colour {i}.", "chosen": f"Colour {i} is red.", "rejected": "No."} for i in range(6)]
PPO_ROWS = [{"prompt": f"Tell me fact {i}."} for i in range(6)]
SIZES = {"sft_train": 4, "sft_val": 2, "rm_train": 4, "rm_test": 2, "ppo": 4, "eval": 2}
LONG_PROMPT = " ".join(f"word{i}x" for i in range(60)) + "?"  # >= 60 tokens (at least one per word)


def jsonl_config(tmp_path, sft=SFT_ROWS, rm=RM_ROWS, ppo=PPO_ROWS, sizes=SIZES, extra=()):
    files = {}
    for name, rows in (("sft", sft), ("rm", rm), ("ppo", ppo)):
        files[name] = write_rows(tmp_path / f"{name}.jsonl", rows)
    overrides = [
        "data.source=jsonl",
        f"data.sft_file={files['sft']}",
        f"data.rm_file={files['rm']}",
        f"data.ppo_file={files['ppo']}",
        *[f"data.splits.{k}={v}" for k, v in sizes.items()],
        "model.vocab_size=300",
        "tracking.enabled=false",
        f"paths.data={tmp_path / 'data'}",
        *extra,
    ]
    return load_config(None, overrides), files


def _prepared_stats(config) -> dict:
    run_stage("prepare", config)
    return json.loads((Path(config.paths.data) / "stats.json").read_text())


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_prepare_jsonl_end_to_end(tmp_path):
    from rlhf_core.models.tokenizer import load_tokenizer

    config, _ = jsonl_config(tmp_path)
    result = run_stage("prepare", config)
    data = tmp_path / "data"
    assert result.artifacts == {"splits": str(data / "splits"), "tokenizer": str(data / "tokenizer"),
                                "stats": str(data / "stats.json")}  # fmt: skip
    assert sorted(p.name for p in (data / "splits").iterdir()) == sorted(f"{s}.jsonl" for s in SPLITS)
    assert (data / "tokenizer" / "tokenizer.json").is_file()
    assert (data / "stats.json").is_file() and (data / "config.yaml").is_file()
    assert load_config(data / "config.yaml") == config

    fields = {
        "sft": {"prompt", "response", "category"},
        "rm": {"prompt", "chosen", "rejected"},
        "prompt": {"prompt"},
    }
    written = {s: read_jsonl(data / "splits" / f"{s}.jsonl") for s in SPLITS}
    assert {s: len(rows) for s, rows in written.items()} == SIZES
    for split, rows in written.items():
        for row in rows:
            assert set(row) == fields[SPLIT_KINDS[split]]  # no _src leaks into the outputs
    sources = {"sft": SFT_ROWS, "rm": RM_ROWS, "prompt": PPO_ROWS}
    for a, b in (("sft_train", "sft_val"), ("rm_train", "rm_test"), ("ppo", "eval")):
        kind = SPLIT_KINDS[a]
        assert sorted(written[a] + written[b], key=str) == sorted(sources[kind], key=str)
        assert not _prompts(written[a]) & _prompts(written[b])

    stats = json.loads((data / "stats.json").read_text())
    assert {f"data/counts.{k}": v for k, v in stats["counts"].items()}.items() <= result.metrics.items()
    assert stats["source"] == "files"
    assert stats["counts"] == SIZES
    assert stats["categories"] == {"sft_train": {"math": 4}, "sft_val": {"math": 2}}
    assert stats["bad_rows"] == {"total": 0, "by_reason": {}, "by_file": {}, "examples": []}
    assert stats["scaled_splits"] == {}
    assert stats["cross_split_prompt_overlap"] == {}
    assert stats["token_lengths"]["prompt"]["max"] == stats["token_limits"]["max_prompt_tokens"]  # derived

    tokenizer = load_tokenizer(data / "tokenizer")
    assert stats["tokenizer"] == {"vocab_size": len(tokenizer), "trained": True}
    assert tokenizer.padding_side == "left"
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    rm_train = data / "splits" / "rm_train.jsonl"
    assert load_split(data, "rm_train", config.data) == [
        {**row, "_src": f"{rm_train}:{i}", "_file": str(rm_train)} for i, row in enumerate(written["rm_train"], 1)
    ]


def test_prepare_jsonl_reports_prompts_shared_between_files(tmp_path):
    ppo = [*PPO_ROWS[:5], {"prompt": SFT_ROWS[0]["prompt"]}]
    config, _ = jsonl_config(tmp_path, ppo=ppo)
    stats = _prepared_stats(config)
    overlap = stats["cross_split_prompt_overlap"]
    assert sum(overlap.values()) == 1
    (key,) = overlap
    a, b = key.split("-")
    assert a in ("sft_train", "sft_val") and b in ("ppo", "eval")


def test_prepare_jsonl_scales_short_files(tmp_path):
    sizes = {**SIZES, "ppo": 8, "eval": 4}  # 6 prompt rows for 12 requested: scale 0.5
    config, _ = jsonl_config(tmp_path, sizes=sizes)
    stats = _prepared_stats(config)
    assert stats["counts"] == {**SIZES, "ppo": 4, "eval": 2}
    assert stats["scaled_splits"] == {"prompt": {"requested": {"ppo": 8, "eval": 4}, "scale": 0.5}}


def test_prepare_empty_split_is_an_error_naming_it(tmp_path):
    # 2 prompt rows for ppo=3 + eval=1: scale 0.5 -> ppo floor(1.5) = 1, eval floor(0.5) = 0
    config, _ = jsonl_config(tmp_path, ppo=PPO_ROWS[:2], sizes={**SIZES, "ppo": 3, "eval": 1})
    with pytest.raises(DataError, match=r"split 'eval' is empty.*data\.splits\.eval"):
        run_stage("prepare", config)
    assert not (tmp_path / "data" / "splits").exists()  # nothing half-written


def test_prepare_empty_split_after_skipping_bad_rows(tmp_path):
    rm = [*RM_ROWS]
    # 5 of the 6 sft rows lack a response
    sft = [{"prompt": "Hi", "response": "Hi"}] + [{"prompt": f"P{i}"} for i in range(5)]
    config, files = jsonl_config(tmp_path, sft=sft, rm=rm, extra=["data.on_bad_rows=skip"])
    # 1 usable sft row for 4 + 2 requested: floor(4/6) = 0 rows for sft_train
    with pytest.raises(DataError, match=r"split 'sft_train' is empty after reading and validation \(5 bad"):
        run_stage("prepare", config)


def test_prepare_over_long_prompt_tokens_name_file_and_line(tmp_path):
    sft = [*SFT_ROWS]
    sft[3] = {"prompt": LONG_PROMPT, "response": "Sure."}  # line 4
    config, files = jsonl_config(tmp_path, sft=sft, extra=["data.max_prompt_tokens=48"])
    # short prompts: <= 21 + 20 characters formatted, so <= 42 tokens with BOS even byte by byte
    with pytest.raises(DataError) as info:
        run_stage("prepare", config)
    assert re.fullmatch(
        re.escape(f"{files['sft']}:4: over-long prompt: ")
        + r"(\d+) tokens > data\.max_prompt_tokens=48 "
        + r"\(the longest with this tokenizer: prompt \1, response \d+ tokens\)"
        + re.escape(HINT),
        str(info.value),
    )  # the error says what would fit: this prompt is the longest
    assert int(re.search(r"prompt: (\d+) tokens", str(info.value)).group(1)) > 60


def test_prepare_over_long_response_tokens_name_file_and_line(tmp_path):
    rm = [*RM_ROWS]
    rm[1] = {**rm[1], "rejected": " ".join(f"no{i}x" for i in range(40)) + "."}  # line 2
    config, files = jsonl_config(tmp_path, rm=rm, extra=["data.max_response_tokens=30"])
    with pytest.raises(DataError) as info:
        run_stage("prepare", config)
    assert re.fullmatch(
        re.escape(f"{files['rm']}:2: over-long rejected: ")
        + r"(\d+) tokens \(with EOS\) > data\.max_response_tokens=30 \(the longest with this tokenizer: prompt \d+, "
        + r"response \1 tokens\)"
        + re.escape(HINT),
        str(info.value),
    )


def test_prepare_over_long_tokens_are_skipped_and_counted(tmp_path):
    sft = [*SFT_ROWS]
    sft[3] = {"prompt": LONG_PROMPT, "response": "Sure."}  # line 4
    rm = [*RM_ROWS]
    rm[1] = {**rm[1], "rejected": " ".join(f"no{i}x" for i in range(40)) + "."}  # line 2
    config, files = jsonl_config(
        tmp_path, sft=sft, rm=rm,
        extra=["data.max_prompt_tokens=48", "data.max_response_tokens=30", "data.on_bad_rows=skip"],
    )  # fmt: skip
    stats = _prepared_stats(config)
    assert stats["counts"]["sft_train"] + stats["counts"]["sft_val"] == 5
    assert stats["counts"]["rm_train"] + stats["counts"]["rm_test"] == 5
    assert stats["counts"]["ppo"] == 4 and stats["counts"]["eval"] == 2
    assert stats["bad_rows"]["total"] == 2
    assert stats["bad_rows"]["by_reason"] == {"over-long prompt": 1, "over-long rejected": 1}
    wheres = sorted(e.split(": ")[0] for e in stats["bad_rows"]["examples"])
    assert wheres == sorted([f"{files['sft']}:4", f"{files['rm']}:2"])
    written = [
        r["prompt"] for s in ("sft_train", "sft_val") for r in read_jsonl(tmp_path / "data/splits" / f"{s}.jsonl")
    ]
    assert LONG_PROMPT not in written
    assert stats["token_lengths"]["prompt"]["max"] <= 48
    assert stats["token_lengths"]["response"]["max"] <= 30


# ------------------------------------------------------------------------------------------ prepare (hh_rlhf)
def test_prepare_hh_rlhf_fixture(tmp_path):
    # 24 rows requested from 12 pairs: every split scaled by 0.5
    sizes = {"sft_train": 6, "sft_val": 2, "rm_train": 6, "rm_test": 2, "ppo": 4, "eval": 4}
    config = load_config(None, [
        "data.source=hh_rlhf", f"data.path={HH_SMALL}", *[f"data.splits.{k}={v}" for k, v in sizes.items()],
        "model.vocab_size=300", "tracking.enabled=false", f"paths.data={tmp_path / 'data'}",
    ])  # fmt: skip
    result = run_stage("prepare", config)
    stats = json.loads(Path(result.artifacts["stats"]).read_text())
    expected = {"sft_train": 3, "sft_val": 1, "rm_train": 3, "rm_test": 1, "ppo": 2, "eval": 2}
    assert stats["counts"] == expected
    assert stats["source"] == "hh_rlhf"
    assert stats["pairs_read"] == 12
    assert stats["history_mismatch_dropped"] == 2
    assert stats["history_mismatch_rows"] == [f"{HH_SMALL}:6", f"{HH_SMALL}:10"]
    assert stats["scaled_splits"] == {"requested": sizes, "scale": 0.5}
    assert stats["bad_rows"]["total"] == 0

    pairs, _ = read_hh_rlhf(DataConfig(source="hh_rlhf", path=str(HH_SMALL)), BadRowLog("error"))
    by_prompt = {p["prompt"]: p for p in pairs}
    written = {s: read_jsonl(Path(result.artifacts["splits"]) / f"{s}.jsonl") for s in SPLITS}
    all_prompts = [r["prompt"] for rows in written.values() for r in rows]
    assert len(all_prompts) == len(set(all_prompts)) == 12  # every pair used once, splits disjoint
    assert set(all_prompts) == set(by_prompt)
    for split, rows in written.items():
        kind = SPLIT_KINDS[split]
        for row in rows:
            pair = by_prompt[row["prompt"]]
            assert row["prompt"].startswith("Human: ")
            if kind == "sft":
                assert row == {"prompt": pair["prompt"], "response": pair["chosen"]}
            elif kind == "rm":
                assert row == {k: pair[k] for k in ("prompt", "chosen", "rejected")}
            else:
                assert row == {"prompt": pair["prompt"]}
    assert (Path(result.artifacts["tokenizer"]) / "tokenizer.json").is_file()
    assert load_config(tmp_path / "data" / "config.yaml") == config
