"""Joining the tensor-parallel group: the store, the process groups, the layers' context.

Each rank connects to a TCP store at ``master_addr:master_port`` (rank 0 hosts it, or
torchrun's agent does when it says so with ``TORCHELASTIC_USE_AGENT_STORE``), marks
itself joined, and, once every rank has, initialises torch.distributed on that store:
the default group runs the model's collectives (gloo on CPU, NCCL on CUDA), a second
gloo group carries the step plans and never touches a device. Every collective on
either group times out after ``timeout`` seconds.

Store keys (under ``tgi/<attempt>/``): ``joined/R``, ``loaded/R`` (the rank's weight
bytes, JSON), ``setup`` (rank 0's KV-cache size and dtype, JSON), ``ready/R``,
``failed/R`` (why rank R stopped), ``stop/R`` (rank R was asked to stop), ``beat/R``
(rank R's heartbeat counter).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from tgi_core.distributed.topology import Topology
from tgi_core.errors import TGIError
from tgi_core.model.parallel import ParallelContext, set_parallel_context


class ShardError(TGIError):
    """The tensor-parallel group cannot start or has failed; the message says which rank
    and why."""


def backend_for(device: torch.device) -> str:
    """The collective backend for the model's tensors: NCCL on CUDA, gloo elsewhere."""
    return "nccl" if device.type == "cuda" else "gloo"


def _uses_agent_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "") == "True"


def connect_store(topology: Topology, timeout: float, *, host: bool = False) -> Any:
    """A client of the group's store (the server itself with ``host`` on rank 0)."""
    from torch.distributed import PrefixStore, TCPStore  # type: ignore[attr-defined]

    is_server = host and topology.rank == 0 and not _uses_agent_store()
    try:
        store = TCPStore(
            topology.master_addr,
            topology.master_port,
            None,
            is_server,
            timedelta(seconds=timeout),
            wait_for_workers=False,
        )
    except Exception as exc:  # RuntimeError / DistNetworkError: port in use, unreachable
        what = "serve the store on" if is_server else "reach the store at"
        raise ShardError(
            f"rank {topology.rank} cannot {what} {topology.master_addr}:"
            f"{topology.master_port} (--master-addr/--master-port, MASTER_ADDR/MASTER_PORT): "
            f"{' '.join(str(exc).split())[:300]}"
        ) from None
    return PrefixStore(f"tgi/{topology.attempt}/", store)


def use_local_cpus(topology: Topology) -> None:
    """Split this machine's CPUs between its ranks (unless OMP_NUM_THREADS says)."""
    if topology.local_world_size > 1 and not os.environ.get("OMP_NUM_THREADS"):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        torch.set_num_threads(max(1, cpus // topology.local_world_size))


@dataclass
class ShardGroup:
    """This process's membership of an initialised group."""

    topology: Topology
    store: Any
    #: what layers use: rank, world size, and the group their collectives run on
    context: ParallelContext
    #: the gloo group step plans are broadcast on
    control: Any
    timeout: float

    @classmethod
    def initialise(
        cls, topology: Topology, store: Any, *, timeout: float, device: torch.device
    ) -> ShardGroup:
        """Initialise torch.distributed (every rank must have joined) and make its
        context the process-wide one layers use."""
        import torch.distributed as dist
        from torch.distributed import PrefixStore  # type: ignore[attr-defined]

        delta = timedelta(seconds=timeout)
        dist.init_process_group(
            backend_for(device),
            store=PrefixStore("pg/", store),
            rank=topology.rank,
            world_size=topology.world_size,
            timeout=delta,
        )
        control = dist.new_group(backend="gloo", timeout=delta)
        context = ParallelContext(topology.rank, topology.world_size, dist.group.WORLD)
        set_parallel_context(context)
        return cls(topology, store, context, control, timeout)

    def close(self) -> None:
        """Leave torch.distributed (only once no collective is in flight)."""
        import torch.distributed as dist

        set_parallel_context(ParallelContext())
        if dist.is_initialized():
            dist.destroy_process_group()
