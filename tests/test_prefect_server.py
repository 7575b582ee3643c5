"""The temporary Prefect server `rlhf run` starts: none when the user runs one. Its own session (a Ctrl-C to the
terminal's process group spares it, so the flow run is recorded as crashed) and its stop after the run are tested
end to end by ``test_flow.py::test_one_ctrl_c_stops_rlhf_run_under_prefect_within_seconds``."""

from __future__ import annotations

from flows.prefect_server import temporary_server


def test_a_configured_server_is_left_alone():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}), temporary_server() as server:
        assert server is None
