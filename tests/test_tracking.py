"""Run tags: the data version names the data settings and, for file sources, the files' contents."""

from __future__ import annotations

from rlhf_core.config import load_config
from rlhf_core.tracking import data_version


def test_data_version_follows_settings_and_file_contents(tmp_path):
    base = load_config(None, [])
    assert data_version(base) == data_version(load_config(None, ["ppo.seed=3"]))  # not a data setting
    assert data_version(base) != data_version(load_config(None, ["data.seed=5"]))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello", "rejected": "x"}\n')
    hh = load_config(None, ["data.source=hh_rlhf", f"data.path={pairs}"])
    before = data_version(hh)
    pairs.write_text(pairs.read_text() + pairs.read_text())
    assert data_version(hh) != before  # same path, new contents: a new data version
