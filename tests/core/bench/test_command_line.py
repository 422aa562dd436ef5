"""``tgi-core bench``'s options: help and usage errors (no server needed)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tgi_core.cli import cli


def bench(*args: str):
    return CliRunner().invoke(cli, ["bench", *args])


def test_help_names_every_option() -> None:
    result = bench("--help")
    assert result.exit_code == 0
    for option in (
        "--url", "--api [tgi|openai]", "-c, --concurrency N[,N...]", "--prompt-tokens N|LOW:HIGH",
        "--max-new-tokens N|LOW:HIGH", "--shared-prefix", "--tokenizer", "--seed",
        "--temperature", "--ignore-eos", "--json", "--plot FILE", "--warmup", "--timeout",
    ):  # fmt: skip
        assert option in result.output, option


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-c", "1,x"], "is not a list of positive integers"),
        (["-c", "0"], "is not a list of positive integers"),
        (["--prompt-tokens", "9:3"], "'9:3' is not a length"),
        (["--max-new-tokens", "0"], "'0' is not a length"),
        (["--ignore-eos"], "--ignore-eos needs --api openai"),
        (["--tokenizer", "/no/such/tokenizer"], "does not exist"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str) -> None:
    result = bench(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
