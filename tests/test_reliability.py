"""What happens around a run rather than inside it: the network a single process exposes, the MLflow record of a
run that was stopped or killed, and Ctrl-C / SIGTERM on the real command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides

LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net/tcp{,6} write them


def _listening_addresses(pid: int) -> set[str]:
    """Local addresses (hex ip:port, as /proc/net/tcp{,6} list them) on which process ``pid`` listens."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(fields[1])
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_a_single_deepspeed_process_listens_on_no_outside_interface(monkeypatch):
    """torch's TCP rendezvous store listens on every interface, unauthenticated; one process needs none."""
    from rlhf_core import distributed
    from rlhf_core.config import DistributedConfig

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    before = _listening_addresses(os.getpid())
    distributed.setup(DistributedConfig(engine="deepspeed"))
    try:
        import torch

        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
        opened = _listening_addresses(os.getpid()) - before
        assert all(address.split(":")[0] in LOOPBACK for address in opened), opened
        assert "MASTER_ADDR" not in os.environ
    finally:
        distributed.shutdown()
