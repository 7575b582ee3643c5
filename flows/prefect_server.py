"""The temporary Prefect API server ``rlhf run`` starts when no server is configured (``PREFECT_API_URL`` unset).

Prefect would start one itself, as a child in the terminal's process group: a Ctrl-C reached it too, it died
first, and the run then printed about 200 KB of connection errors for over two minutes and left the flow run
RUNNING in the database. Started here instead, in a session of its own, only ``rlhf run`` gets the Ctrl-C: the flow
run is marked crashed through the living server, and the server is stopped once the flow has ended. The server is
Prefect's own ASGI app run by uvicorn, as ``prefect server start`` runs it, on a free local port, against the
database under ``PREFECT_HOME``; its web UI is off (``prefect server start`` serves the UI on the same database).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_healthy(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"the temporary Prefect server did not answer at {url} within {timeout:.0f} s")


def _send_what_prefect_holds() -> None:
    """Prefect sends logs and events from background workers: let them deliver what they hold while the server
    still answers (they would otherwise retry against a closed port at exit, for over a minute)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=5)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class Server:
    url: str  # the API's, .../api
    pid: int


@contextlib.contextmanager
def temporary_server() -> Iterator[Server | None]:
    """Point this process's Prefect client at a temporary server in its own session while the block runs, and stop
    the server after it. Yields the server, or None (and starts nothing) when a server is configured: one the user
    runs is not ours to start or stop."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        yield None
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]  # fmt: skip
    env = {**os.environ, **settings.to_environment_variables(exclude_unset=True), "PREFECT_UI_ENABLED": "0"}
    process = subprocess.Popen(command, env=env, start_new_session=True)  # its own session: Ctrl-C spares it
    try:
        _wait_until_healthy(process, url, float(settings.server.ephemeral.startup_timeout_seconds))
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield Server(url, process.pid)
            finally:
                _send_what_prefect_holds()
    finally:
        _stop(process)
