"""ServeConfig: precedence across the four sources, and every error path."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

import tgi_core
from tgi_core.config import FIELDS, ServeConfig, Source, load_config
from tgi_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_follow_tgi_except_the_port() -> None:
    config = load_config(environ={}).config
    assert config == ServeConfig()
    assert (config.port, config.hostname) == (8080, "0.0.0.0")
    assert (
        config.max_concurrent_requests,
        config.max_best_of,
        config.max_stop_sequences,
        config.max_top_n_tokens,
        config.max_client_batch_size,
    ) == (128, 2, 4, 5, 4)
    assert (config.payload_limit, config.graceful_termination_timeout) == (2_000_000, 90)
    assert (config.waiting_served_ratio, config.max_waiting_tokens) == (0.3, 20)
    assert config.max_batch_prefill_tokens == 4096


def test_precedence_default_file_env_cli(tmp_path: Path) -> None:
    deploy = write(
        tmp_path,
        "deploy.toml",
        """
        port = 7000
        max_best_of = 3
        max_stop_sequences = 6
        model_id = "/models/from-file"
    """.replace("        ", ""),
    )
    environ = {"PORT": "7100", "MAX_BEST_OF": "5", "MODEL_ID": ""}
    resolved = load_config(cli={"port": "7200"}, config_file=deploy, environ=environ)
    config, sources = resolved.config, resolved.sources
    assert config.port == 7200 and sources["port"] == Source("cli", "--port")
    assert config.max_best_of == 5 and sources["max_best_of"] == Source("env", "MAX_BEST_OF")
    assert config.max_stop_sequences == 6
    assert sources["max_stop_sequences"] == Source("file", str(deploy))
    # an empty environment variable counts as unset: the file's value stands
    assert config.model_id == "/models/from-file"
    assert config.max_top_n_tokens == 5 and sources["max_top_n_tokens"] == Source("default")


def test_yaml_file_and_kebab_case_keys(tmp_path: Path) -> None:
    deploy = write(
        tmp_path,
        "deploy.yaml",
        "max-total-tokens: 2048\nprefix_caching: false\ncors-allow-origin: [a, b]\n",
    )
    config = load_config(config_file=deploy, environ={}).config
    assert (config.max_total_tokens, config.prefix_caching) == (2048, False)
    assert config.cors_allow_origin == ["a", "b"]


def test_environment_strings_are_parsed() -> None:
    environ = {
        "PREFIX_CACHING": "false",
        "JSON_OUTPUT": "1",
        "WAITING_SERVED_RATIO": "1.5",
        "CORS_ALLOW_ORIGIN": "https://a.example, https://b.example",
        "DTYPE": "bfloat16",
        "ATTENTION": "reference",
        "TGI_HOSTNAME": "127.0.0.1",
    }
    config = load_config(environ=environ).config
    assert config.prefix_caching is False and config.json_output is True
    assert config.waiting_served_ratio == 1.5
    assert config.cors_allow_origin == ["https://a.example", "https://b.example"]
    assert (config.dtype, config.attention, config.hostname) == (
        "bfloat16",
        "reference",
        "127.0.0.1",
    )


def test_hostname_env_of_the_shell_is_not_read() -> None:
    assert load_config(environ={"HOSTNAME": "buildbox-42"}).config.hostname == "0.0.0.0"


def test_cli_lists_accept_repeats_and_commas() -> None:
    config = load_config(cli={"cors_allow_origin": ("a,b", "c")}, environ={}).config
    assert config.cors_allow_origin == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"cli": {"port": "0"}},
            "port = '0' from command-line flag --port is invalid: Expected `int` >= 1; "
            "allowed: an integer from 1 to 65535",
        ),
        (
            {"environ": {"MAX_BEST_OF": "many"}},
            "max_best_of = 'many' from environment variable MAX_BEST_OF is invalid",
        ),
        ({"environ": {"DTYPE": "float64"}}, "allowed: one of float32, bfloat16, float16"),
        ({"environ": {"PREFIX_CACHING": "maybe"}}, "allowed: true or false"),
        ({"cli": {"waiting_served_ratio": "-1"}}, "allowed: a number >= 0.0"),
        ({"cli": {"api_key": ""}}, "allowed: a non-empty string (or unset)"),
        ({"cli": {"log_level": "verbose"}}, "one of trace, debug, info, warning, error"),
    ],
)
def test_bad_values_name_key_source_and_what_is_allowed(kwargs, expected) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(**{"environ": {}, **kwargs})
    assert expected in str(info.value)


def test_bad_value_in_a_file_names_the_file(tmp_path: Path) -> None:
    deploy = write(tmp_path, "deploy.toml", 'max_total_tokens = "lots"\n')
    with pytest.raises(
        ConfigError,
        match=rf"max_total_tokens = 'lots' from config file "
        rf"{deploy} is invalid.*an integer >= 2",
    ):
        load_config(config_file=deploy, environ={})


def test_unknown_file_key_suggests_the_right_one(tmp_path: Path) -> None:
    deploy = write(tmp_path, "deploy.toml", "max_totl_tokens = 10\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'max_totl_tokens' in config file .*"
        r"did you mean 'max_total_tokens'\?",
    ):
        load_config(config_file=deploy, environ={})


def test_unknown_cli_setting() -> None:
    with pytest.raises(ConfigError, match="unknown command-line setting 'plugins'"):
        load_config(cli={"plugins": {}}, environ={})


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.toml", "port = \n", "is not valid TOML"),
        ("bad.yaml", "port: [1,\n", "is not valid YAML"),
        ("list.yaml", "- 1\n- 2\n", "must hold a table of settings"),
        ("deploy.json", "{}", "unknown type '.json'"),
        ("plugins.toml", "plugins = 3\n", "must be a table of tables"),
    ],
)
def test_malformed_files(tmp_path: Path, name: str, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(config_file=write(tmp_path, name, text), environ={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope.toml does not exist"):
        load_config(config_file=tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    ("cli", "expected"),
    [
        (
            {"max_input_tokens": "100", "max_total_tokens": "100"},
            r"max_input_tokens \(100, from command-line flag --max-input-tokens\) must be less "
            r"than max_total_tokens \(100, from command-line flag --max-total-tokens\)",
        ),
        (
            {
                "max_total_tokens": "5000",
                "max_batch_total_tokens": "4096",
                "max_batch_prefill_tokens": "100",
            },
            r"max_total_tokens \(5000, .*\) must be at most max_batch_total_tokens \(4096",
        ),
        (
            {"max_batch_total_tokens": "1000", "max_batch_prefill_tokens": "2000"},
            r"max_batch_prefill_tokens \(2000, from command-line flag --max-batch-prefill-"
            r"tokens\) must be at most max_batch_total_tokens \(1000, from command-line flag",
        ),
        (
            {"prefill_chunking": False, "max_input_tokens": "5000"},
            r"max_input_tokens \(5000, .*\) must be at most \(without prefill chunking\) "
            r"max_batch_prefill_tokens",
        ),
    ],
)
def test_relations_between_settings(cli, expected) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(cli=cli, environ={})


class Section(msgspec.Struct, forbid_unknown_fields=True):
    threshold: int = 3
    label: str = "x"


class SectionPlugin:
    @tgi_core.hookimpl
    def register_config_sections(self, register):
        register(tgi_core.ConfigSectionSpec(name="mine", schema=Section))


def test_plugin_sections_are_validated(tmp_path: Path, tgi_registry_with) -> None:
    registry = tgi_registry_with(SectionPlugin(), installed=False)
    deploy = write(tmp_path, "deploy.toml", "[plugins.mine]\nthreshold = 7\n")
    resolved = load_config(config_file=deploy, environ={}).with_registry(registry)
    assert resolved.plugin_sections["mine"] == Section(threshold=7)
    # an absent table gives the section's defaults
    assert load_config(environ={}).with_registry(registry).plugin_sections == {"mine": Section()}


def test_plugin_section_errors(tmp_path: Path, tgi_registry_with) -> None:
    registry = tgi_registry_with(SectionPlugin(), installed=False)
    unknown = write(tmp_path, "a.toml", "[plugins.mien]\nthreshold = 7\n")
    with pytest.raises(
        ConfigError,
        match=r"\[plugins.mien\] in config file .*a.toml names no "
        r"installed plugin section \(did you mean 'mine'\?\)",
    ):
        load_config(config_file=unknown, environ={}).with_registry(registry)
    invalid = write(tmp_path, "b.toml", "[plugins.mine]\nthreshold = 'high'\n")
    with pytest.raises(
        ConfigError,
        match=r"\[plugins.mine\] in config file .*b.toml is invalid: "
        r"Expected `int`, got `str` - at `\$.threshold`",
    ):
        load_config(config_file=invalid, environ={}).with_registry(registry)
    extra = write(tmp_path, "c.toml", "[plugins.mine]\ncolour = 'red'\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown key\(s\) colour; allowed: threshold, "
        r"label \(section of plugin",
    ):
        load_config(config_file=extra, environ={}).with_registry(registry)


def test_the_documented_example_deployment_loads(tgi_registry) -> None:
    deploy = REPO / "docs/examples/deploy.toml"
    resolved = load_config(config_file=deploy, environ={}).with_registry(tgi_registry)
    config = resolved.config
    assert config.model_id and config.port == 8080
    assert all(source.kind in ("default", "file") for source in resolved.sources.values())
    assert sum(source.kind == "file" for source in resolved.sources.values()) >= 10


def test_every_setting_is_documented_with_group_env_and_flag() -> None:
    for info in FIELDS.values():
        assert info.description.endswith("."), info.name
        assert info.group
        if info.name != "plugins":
            assert info.flag == "--" + info.name.replace("_", "-")
            assert info.env


def test_log_level_in_any_case_and_warn() -> None:
    assert load_config(environ={"LOG_LEVEL": "WARN"}).config.log_level == "warning"
    assert load_config(cli={"log_level": "Debug"}, environ={}).config.log_level == "debug"


def test_legacy_max_input_length(tmp_path: Path) -> None:
    assert load_config(environ={"MAX_INPUT_LENGTH": "99"}).config.max_input_tokens == 99
    deploy = write(tmp_path, "a.toml", "max_input_length = 77\n")
    assert load_config(config_file=deploy, environ={}).config.max_input_tokens == 77
    with pytest.raises(ConfigError, match="MAX_INPUT_TOKENS and MAX_INPUT_LENGTH both set"):
        load_config(environ={"MAX_INPUT_LENGTH": "99", "MAX_INPUT_TOKENS": "98"})


def test_a_key_spelled_twice_in_a_file(tmp_path: Path) -> None:
    deploy = write(tmp_path, "a.yaml", "max-total-tokens: 10\nmax_total_tokens: 20\n")
    with pytest.raises(
        ConfigError,
        match=r"sets max_total_tokens twice, as "
        r"'max-total-tokens' and 'max_total_tokens'",
    ):
        load_config(config_file=deploy, environ={})


def test_unreadable_files(tmp_path: Path) -> None:
    latin = tmp_path / "latin.toml"
    latin.write_bytes("model_id = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(config_file=latin, environ={})
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(config_file=folder, environ={})


def test_section_schemas_must_default_every_field() -> None:
    class Required(msgspec.Struct):
        needed: int

    with pytest.raises(ValueError, match=r"every field needs a default.*no default: needed"):
        tgi_core.ConfigSectionSpec(name="req", schema=Required)


def test_unknown_section_keys_are_errors_even_without_forbid_unknown_fields(
    tmp_path: Path, tgi_registry_with
) -> None:
    class Lenient(msgspec.Struct):
        size: int = 1

    class LenientPlugin:
        @tgi_core.hookimpl
        def register_config_sections(self, register):
            register(tgi_core.ConfigSectionSpec(name="lenient", schema=Lenient))

    registry = tgi_registry_with(LenientPlugin(), installed=False)
    deploy = write(tmp_path, "a.toml", "[plugins.lenient]\nsiez = 2\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) siez; allowed: size"):
        load_config(config_file=deploy, environ={}).with_registry(registry)
