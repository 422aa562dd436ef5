"""Which rank a process is: from --num-shard, or from a launcher's environment."""

from __future__ import annotations

import pytest

from tgi_core.config import load_config
from tgi_core.distributed.topology import resolve_topology
from tgi_core.errors import ConfigError


def topology(cli: dict[str, str] | None = None, **environ: str):
    return resolve_topology(load_config(cli=cli or {}, environ=environ), environ)


def test_one_shard_is_a_single_process() -> None:
    result = topology()
    assert (result.rank, result.world_size, result.launcher, result.sharded) == (
        0,
        1,
        "single",
        False,
    )


def test_num_shard_makes_this_process_rank_0_of_a_local_group() -> None:
    result = topology({"num_shard": "4", "master_port": "29999"})
    assert (result.rank, result.world_size, result.local_world_size) == (0, 4, 4)
    assert (result.launcher, result.master_addr, result.master_port) == ("tgi", "localhost", 29999)
    assert result.is_driver


def test_a_launchers_environment_names_the_rank() -> None:
    result = topology(
        WORLD_SIZE="4",
        RANK="3",
        LOCAL_RANK="1",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="10.0.0.1",
        MASTER_PORT="23456",
        TORCHELASTIC_RESTART_COUNT="2",
    )
    assert (result.rank, result.world_size, result.local_rank, result.local_world_size) == (
        3,
        4,
        1,
        2,
    )
    assert (result.master_addr, result.master_port, result.launcher) == (
        "10.0.0.1",
        23456,
        "external",
    )
    assert result.attempt == 2 and not result.is_driver


def test_num_shard_from_the_environment_may_repeat_world_size() -> None:
    assert topology(NUM_SHARD="2", WORLD_SIZE="2", RANK="0").world_size == 2


@pytest.mark.parametrize(
    ("cli", "environ", "message"),
    [
        ({}, {"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
        ({}, {"WORLD_SIZE": "2", "RANK": "2"}, "RANK from 0 to WORLD_SIZE - 1"),
        ({}, {"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE = 'two' is invalid"),
        (
            {"num_shard": "4"},
            {"WORLD_SIZE": "2", "RANK": "0"},
            "num_shard = 4 from command-line flag --num-shard disagrees with the launcher's "
            "WORLD_SIZE = 2",
        ),
    ],
)
def test_inconsistent_launch_settings_are_config_errors(
    cli: dict[str, str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        topology(cli, **environ)
