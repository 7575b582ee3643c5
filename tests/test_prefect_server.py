"""The temporary Prefect server `rlhf run` starts: in its own session (a Ctrl-C to the terminal's process group
spares it), the Prefect client pointed at it while the flow runs, stopped afterwards; none when one is configured."""

from __future__ import annotations

import os

import httpx
import pytest

from flows.prefect_server import temporary_server


def test_the_server_runs_in_its_own_session_serves_the_client_and_stops(tmp_path):
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, get_current_settings, temporary_settings

    with (
        temporary_settings(updates={PREFECT_HOME: tmp_path}, restore_defaults={PREFECT_API_URL}),
        temporary_server() as server,
    ):
        assert server is not None
        assert os.getsid(server.pid) != os.getsid(0), "in the terminal's session a Ctrl-C would kill it first"
        assert get_current_settings().api.url == server.url
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)  # gone (reaped), not left running
    assert get_current_settings().api.url != server.url
    assert (tmp_path / "prefect.db").is_file(), "the server keeps its database under PREFECT_HOME"


def test_a_configured_server_is_left_alone():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}), temporary_server() as server:
        assert server is None
