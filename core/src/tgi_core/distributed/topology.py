"""Which rank this process is, of how many, and who started the others.

Three cases, decided once at startup:

- ``single``: ``num_shard`` is 1 and no launcher set ``WORLD_SIZE``; no process group.
- ``tgi``: ``--num-shard N`` (N > 1) without a launcher: this process is rank 0 and
  starts ranks 1..N-1 on this machine.
- ``external``: a launcher (``torchrun``, or anything that sets ``WORLD_SIZE``,
  ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) started every rank; this
  process joins as ``RANK``. That is how a group spans machines.

``MASTER_ADDR`` and ``MASTER_PORT`` are the config's ``master_addr`` / ``master_port``
environment variables, so they need no special handling here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from tgi_core.config import ResolvedConfig
from tgi_core.errors import ConfigError

Launcher = Literal["single", "tgi", "external"]
#: The variables a torch.distributed launcher sets, by role.
LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True, slots=True)
class Topology:
    """This process's place in the tensor-parallel group."""

    rank: int
    world_size: int
    local_rank: int
    #: ranks on this machine (they share its CPUs and memory)
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: Launcher
    #: torchrun's restart count; keeps the store keys of different attempts apart
    attempt: int = 0

    @property
    def is_driver(self) -> bool:
        """Rank 0: hosts the HTTP server and the scheduler."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def _int_variable(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = environ.get(name, "")
    if raw == "":
        if default is None:
            raise ConfigError(
                f"environment variable WORLD_SIZE is set but {name} is not; a launcher such "
                "as torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT "
                "together (or unset WORLD_SIZE and use --num-shard)"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {name} = {raw!r} is invalid: it must be an integer"
        ) from None


def resolve_topology(
    resolved: ResolvedConfig, environ: Mapping[str, str] | None = None
) -> Topology:
    """The topology of ``tgi-core serve`` with ``resolved`` in ``environ``.

    Raises ConfigError when a launcher's variables are incomplete, out of range, or
    disagree with an explicitly set ``num_shard``.
    """
    environ = os.environ if environ is None else environ
    config = resolved.config
    if environ.get("WORLD_SIZE", "") == "":
        if config.num_shard == 1:
            return Topology(0, 1, 0, 1, config.master_addr, config.master_port, "single")
        return Topology(
            0, config.num_shard, 0, config.num_shard, config.master_addr, config.master_port, "tgi"
        )
    world_size = _int_variable(environ, "WORLD_SIZE")
    rank = _int_variable(environ, "RANK")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"environment variables WORLD_SIZE = {world_size} and RANK = {rank} are invalid: "
            "WORLD_SIZE must be at least 1 and RANK from 0 to WORLD_SIZE - 1"
        )
    source = resolved.sources["num_shard"]
    if source.kind != "default" and config.num_shard != world_size:
        raise ConfigError(
            f"num_shard = {config.num_shard} from {source} disagrees with the launcher's "
            f"WORLD_SIZE = {world_size}; leave num_shard unset under a launcher"
        )
    local_rank = _int_variable(environ, "LOCAL_RANK", default=rank)
    local_world = _int_variable(environ, "LOCAL_WORLD_SIZE", default=1)
    attempt = _int_variable(environ, "TORCHELASTIC_RESTART_COUNT", default=0)
    return Topology(
        rank,
        world_size,
        local_rank,
        max(local_world, local_rank + 1),
        config.master_addr,
        config.master_port,
        "external",
        attempt,
    )
