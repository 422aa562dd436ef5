"""The tgi-core command: help, config, plugins, and one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tgi_core.cli import cli
from tgi_core.config import FIELDS, FILE_ONLY_FIELDS


@pytest.fixture
def run(clean_environ):
    def invoke(*args: str, env: dict[str, str] | None = None):
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)

    return invoke


def test_serve_help_lists_every_option_with_default_and_env(run) -> None:
    result = run("serve", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for info in FIELDS.values():
        if info.name in FILE_ONLY_FIELDS:
            continue
        assert info.flag in text, info.name
        assert f"env: {info.env}" in text, info.name
    assert "-p, --port INT Port to listen on. [default: 8080; env: PORT]" in text
    assert "--max-input-tokens, --max-input-length INT" in text
    assert "env: MAX_INPUT_TOKENS, MAX_INPUT_LENGTH]" in text
    assert "--prefix-caching / --no-prefix-caching" in text
    for group in (
        "Model:",
        "KV cache:",
        "Batching:",
        "Limits:",
        "Server:",
        "Sharding:",
        "Logging:",
    ):
        assert group in result.output


def test_config_shows_values_and_sources(run, tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.toml"
    deploy.write_text("max_best_of = 3\n")
    result = run("config", "--config", str(deploy), "--port", "9000", env={"MAX_TOP_N_TOKENS": "7"})
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines() if line}
    assert rows["port"] == ["9000", "cli:--port"]
    assert rows["max_top_n_tokens"] == ["7", "env:MAX_TOP_N_TOKENS"]
    assert rows["max_best_of"] == ["3", f"file:{deploy}"]
    assert rows["max_stop_sequences"] == ["4", "default"]


def test_config_json(run) -> None:
    result = run("config", "--json", "--no-prefix-caching", env={"TGI_LOAD_PLUGINS": ""})
    data = json.loads(result.output)
    assert data["config"]["prefix_caching"] is False
    assert data["sources"]["prefix_caching"] == "cli:--prefix-caching"
    assert data["config"]["port"] == 8080 and data["sources"]["port"] == "default"


def test_config_file_from_environment(run, tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text("port: 8181\n")
    data = json.loads(run("config", "--json", env={"TGI_CONFIG": str(deploy)}).output)
    assert data["config"]["port"] == 8181


def test_config_errors_are_one_line_with_exit_code_2(run) -> None:
    result = run("config", "--port", "99999")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: port = '99999' from command-line flag --port is invalid: Expected `int` <= "
        "65535; allowed: an integer from 1 to 65535"
    ]
    assert "Traceback" not in result.output


def test_serve_without_a_model_says_how_to_give_one(run) -> None:
    result = run("serve", "--port", "8123", env={"TGI_LOAD_PLUGINS": ""})
    assert result.exit_code == 2
    assert "no model to serve: pass --model-id DIR or set MODEL_ID" in result.output


def test_plugins_table(run) -> None:
    result = run("plugins")
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if line.startswith("llama"))
    assert re.match(r"llama\s+tgi-llama\s+0\.1\.0\s+model llama: LlamaForCausalLM", line)


def test_plugins_json(run) -> None:
    data = json.loads(run("plugins", "--json").output)
    llama = next(p for p in data["plugins"] if p["distribution"] == "tgi-llama")
    assert llama["models"][0]["architectures"][0] == "LlamaForCausalLM"
    assert llama["models"][0]["factory"] == "tgi_llama.model:build_model"
    assert llama["attention_backends"] == [] and llama["frontends"] == []


def test_plugins_show_the_shard_count_and_its_source(run) -> None:
    assert "Sharding: 1 shard (from default)" in run("plugins").output
    data = json.loads(run("plugins", "--json", env={"NUM_SHARD": "2"}).output)
    assert data["sharding"] == {"num_shard": 2, "source": "env:NUM_SHARD", "launcher": "tgi"}
    launched = run("plugins", env={"WORLD_SIZE": "4", "RANK": "3"}).output
    assert "Sharding: 4 shards (from env:WORLD_SIZE)" in launched


def test_plugin_errors_are_one_line(run, make_distribution) -> None:
    make_distribution(
        "tgi-broken", {"tgi_broken": "raise RuntimeError('boom')\n"}, {"broken": "tgi_broken"}
    )
    result = run("plugins")
    assert result.exit_code == 1
    assert result.output.startswith(
        "Error: plugin 'broken' (distribution tgi-broken 0.1) "
        "failed to import 'tgi_broken': RuntimeError: boom"
    )


def test_version(run) -> None:
    assert re.match(r"tgi-core, version \d+\.\d+", run("--version").output)


def test_tgi_spellings_short_port_and_legacy_input_length(run) -> None:
    data = json.loads(run("config", "--json", "-p", "3000", "--max-input-length", "100").output)
    assert data["config"]["port"] == 3000
    assert data["config"]["max_input_tokens"] == 100
    assert data["sources"]["max_input_tokens"] == "cli:--max-input-tokens"


def test_api_key_is_never_printed(run) -> None:
    table = run("config", "--api-key", "s3cret").output
    assert "s3cret" not in table and "<redacted>" in table
    data = json.loads(run("config", "--json", env={"API_KEY": "s3cret"}).output)
    assert data["config"]["api_key"] == "<redacted>"


def test_json_output_is_tri_state(run) -> None:
    assert json.loads(run("config", "--json").output)["config"]["json_output"] is None
    data = json.loads(run("config", "--json", "--no-json-output").output)
    assert data["config"]["json_output"] is False


def test_unknown_plugin_names_in_settings_are_config_errors(run) -> None:
    result = run("config", "--quantize", "nope")
    assert result.exit_code == 2
    assert (
        "quantize = 'nope' from command-line flag --quantize names no installed "
        "quantizer; available:" in result.output
    )
    result = run("config", env={"ATTENTION": "flashy"})
    assert result.exit_code == 2
    assert (
        "attention = 'flashy' from environment variable ATTENTION names no installed "
        "attention backend" in result.output
    )


def test_builtin_attention_backends_are_listed_first(run) -> None:
    data = json.loads(run("plugins", "--json").output)
    builtin = data["plugins"][0]
    assert builtin["builtin"] and builtin["distribution"] == "tgi-core"
    backends = {b["name"]: b for b in builtin["attention_backends"]}
    assert set(backends) == {"sdpa", "reference"}
    assert backends["sdpa"]["priority"] > backends["reference"]["priority"]
    assert "alibi" in backends["sdpa"]["features"]


def test_serve_reports_a_missing_model_folder(run, tmp_path: Path) -> None:
    result = run("serve", "--model-id", str(tmp_path / "missing"))
    assert result.exit_code == 1
    assert "model folder" in result.output and "does not exist" in result.output


def test_convert_command(run, tmp_path: Path) -> None:
    import torch

    torch.save({"weight": torch.ones(2, 2)}, tmp_path / "pytorch_model.bin")
    result = run("convert", str(tmp_path))
    assert result.exit_code == 0 and "model.safetensors" in result.output
    result = run("convert", str(tmp_path / "nowhere"))
    assert result.exit_code == 1 and "is not a folder" in result.output
