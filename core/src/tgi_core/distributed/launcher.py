"""The worker processes ``--num-shard N`` starts on this machine (ranks 1 .. N-1).

Each is ``python -m tgi_core.distributed.worker`` with the environment a torch.distributed
launcher would give it (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), rank 0's resolved settings as JSON in
``TGI_SHARD_CONFIG`` (so every rank serves exactly what rank 0 resolved, whatever file,
environment and flags it came from), and rank 0's process id in ``TGI_SHARD_PARENT``
(a worker whose parent dies exits too). Workers share rank 0's standard output and
error, so their log lines land with rank 0's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgspec

from tgi_core.config import ServeConfig
from tgi_core.distributed.topology import Topology

CONFIG_VARIABLE = "TGI_SHARD_CONFIG"
PARENT_VARIABLE = "TGI_SHARD_PARENT"


class LocalRanks:
    """Ranks ``1 .. world_size - 1`` as child processes of rank 0."""

    def __init__(self, processes: dict[int, subprocess.Popen[bytes]]) -> None:
        self.processes = processes

    @classmethod
    def start(cls, config: ServeConfig, topology: Topology) -> LocalRanks:
        base = {
            **os.environ,
            "WORLD_SIZE": str(topology.world_size),
            "LOCAL_WORLD_SIZE": str(topology.local_world_size),
            "MASTER_ADDR": topology.master_addr,
            "MASTER_PORT": str(topology.master_port),
            CONFIG_VARIABLE: msgspec.json.encode(config).decode(),
            PARENT_VARIABLE: str(os.getpid()),
        }
        processes = {}
        for rank in range(1, topology.world_size):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            processes[rank] = subprocess.Popen(
                [sys.executable, "-m", "tgi_core.distributed.worker"], env=env
            )
        return cls(processes)

    def exited(self) -> tuple[int, int] | None:
        """The first rank whose process has exited, with its return code."""
        for rank, process in self.processes.items():
            code = process.poll()
            if code is not None:
                return rank, code
        return None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every process to exit; True if they did."""
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def terminate(self, grace: float = 5.0) -> None:
        """SIGTERM the processes still running, then SIGKILL those still there after
        ``grace`` seconds."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        if self.wait(grace):
            return
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        self.wait(grace)
