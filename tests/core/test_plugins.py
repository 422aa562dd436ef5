"""The plugin manager and registries: discovery, filtering and every plugin error."""

from __future__ import annotations

import pytest

import tgi_core
from tgi_core.errors import PluginError
from tgi_core.plugins import PluginInfo, make_plugin_manager
from tgi_core.registry import Registry

GOOD_MODEL = """
import tgi_core

@tgi_core.hookimpl
def register_models(register):
    register(tgi_core.ModelSpec(name="{name}", architectures=("{arch}",),
                                factory="os.path:join"))
"""


def build(environ: dict[str, str] | None = None) -> Registry:
    return Registry.build(make_plugin_manager(environ=environ or {}))


def test_installed_plugins_are_found_through_entry_points() -> None:
    registry = build()
    llama = registry.models["llama"]
    assert "LlamaForCausalLM" in llama.architectures
    assert registry.models.owner("llama").distribution == "tgi-llama"
    assert registry.models.for_architecture("MistralForCausalLM") is llama
    assert registry.models.for_model_type("qwen2") is llama


def test_a_written_distribution_is_discovered(make_distribution) -> None:
    make_distribution(
        "tgi-alpha",
        {"tgi_alpha": GOOD_MODEL.format(name="alpha", arch="AlphaLM")},
        {"alpha": "tgi_alpha"},
        version="2.0",
    )
    registry = build()
    assert registry.models.for_architecture("AlphaLM").name == "alpha"
    owner = registry.models.owner("alpha")
    assert (owner.distribution, owner.version, owner.builtin) == ("tgi-alpha", "2.0", False)


class TestLoadPluginsAllowList:
    @pytest.fixture(autouse=True)
    def two_plugins(self, make_distribution) -> None:
        make_distribution(
            "tgi-alpha",
            {"tgi_alpha": GOOD_MODEL.format(name="alpha", arch="AlphaLM")},
            {"alpha": "tgi_alpha"},
        )
        make_distribution(
            "tgi-beta",
            {"tgi_beta": GOOD_MODEL.format(name="beta", arch="BetaLM")},
            {"beta": "tgi_beta"},
        )

    def test_unset_loads_all(self) -> None:
        assert {"alpha", "beta", "llama"} <= set(build().models.names())

    def test_a_list_loads_only_those_by_distribution_or_entry_point(self) -> None:
        assert build({"TGI_LOAD_PLUGINS": "tgi-alpha"}).models.names() == ["alpha"]
        names = build({"TGI_LOAD_PLUGINS": "beta, tgi_llama"}).models.names()
        assert sorted(names) == ["beta", "llama"]

    def test_empty_loads_none(self) -> None:
        registry = build({"TGI_LOAD_PLUGINS": ""})
        assert registry.models.names() == []
        assert all(info.builtin for info in registry.plugins)

    def test_an_unknown_name_is_an_error(self) -> None:
        with pytest.raises(
            PluginError,
            match=r"TGI_LOAD_PLUGINS names tgi-gamma.*installed "
            r"plugins: .*tgi-alpha",
        ):
            build({"TGI_LOAD_PLUGINS": "tgi-gamma"})


def test_duplicate_name_names_both_distributions(make_distribution) -> None:
    make_distribution(
        "tgi-one", {"tgi_one": GOOD_MODEL.format(name="same", arch="OneLM")}, {"one": "tgi_one"}
    )
    make_distribution(
        "tgi-two", {"tgi_two": GOOD_MODEL.format(name="same", arch="TwoLM")}, {"two": "tgi_two"}
    )
    with pytest.raises(PluginError) as info:
        build()
    message = str(info.value)
    assert "model 'same'" in message
    assert "distribution tgi-one" in message and "distribution tgi-two" in message


def test_duplicate_architecture_names_both_distributions(make_distribution) -> None:
    make_distribution(
        "tgi-fastllama",
        {"tgi_fastllama": GOOD_MODEL.format(name="fast", arch="LlamaForCausalLM")},
        {"fastllama": "tgi_fastllama"},
    )
    with pytest.raises(PluginError, match=r"architecture 'LlamaForCausalLM'") as info:
        build()
    assert "distribution tgi-fastllama" in str(info.value)
    assert "distribution tgi-llama" in str(info.value)


def test_entry_point_name_clash_names_both_distributions(make_distribution) -> None:
    make_distribution(
        "tgi-one", {"tgi_one": GOOD_MODEL.format(name="one", arch="OneLM")}, {"shared": "tgi_one"}
    )
    make_distribution(
        "tgi-two", {"tgi_two": GOOD_MODEL.format(name="two", arch="TwoLM")}, {"shared": "tgi_two"}
    )
    with pytest.raises(PluginError, match=r"plugin name 'shared'") as info:
        build()
    assert "tgi-one" in str(info.value) and "tgi-two" in str(info.value)


def test_import_failure_names_the_distribution(make_distribution) -> None:
    make_distribution(
        "tgi-broken",
        {"tgi_broken": "import does_not_exist_anywhere\n"},
        {"broken": "tgi_broken"},
        version="0.3",
    )
    with pytest.raises(PluginError) as info:
        build()
    message = str(info.value)
    assert "distribution tgi-broken 0.3" in message
    assert "failed to import 'tgi_broken'" in message
    assert "ModuleNotFoundError" in message and "does_not_exist_anywhere" in message


def test_a_syntax_error_is_an_import_failure(make_distribution) -> None:
    make_distribution("tgi-typo", {"tgi_typo": "def oops(:\n"}, {"typo": "tgi_typo"})
    with pytest.raises(PluginError, match=r"tgi-typo.*SyntaxError"):
        build()


def test_wrong_spec_type_names_the_distribution(make_distribution) -> None:
    source = """
    import tgi_core

    @tgi_core.hookimpl
    def register_models(register):
        register({"name": "dict-model"})
    """
    make_distribution("tgi-wrongtype", {"tgi_wrongtype": source}, {"wrongtype": "tgi_wrongtype"})
    with pytest.raises(PluginError) as info:
        build()
    message = str(info.value)
    assert "distribution tgi-wrongtype" in message
    assert "passed dict" in message and "expected tgi_core.ModelSpec" in message


def test_spec_of_another_kind_is_rejected(make_distribution) -> None:
    source = """
    import tgi_core

    @tgi_core.hookimpl
    def register_quantizers(register):
        register(tgi_core.FrontendSpec(name="oops", factory="os:getcwd"))
    """
    make_distribution("tgi-mixup", {"tgi_mixup": source}, {"mixup": "tgi_mixup"})
    with pytest.raises(
        PluginError,
        match=r"tgi-mixup.*passed FrontendSpec.*register_quantizers"
        r".*expected tgi_core.QuantizerSpec",
    ):
        build()


def test_unknown_hook_is_reported_with_a_suggestion(make_distribution) -> None:
    source = """
    import tgi_core

    @tgi_core.hookimpl
    def register_modles(register):
        pass
    """
    make_distribution("tgi-misspelt", {"tgi_misspelt": source}, {"misspelt": "tgi_misspelt"})
    with pytest.raises(PluginError) as info:
        build()
    message = str(info.value)
    assert "distribution tgi-misspelt" in message
    assert "'register_modles', which is not a tgi hook" in message
    assert "did you mean 'register_models'?" in message


def test_hook_with_an_unknown_argument_is_reported(make_distribution) -> None:
    source = """
    import tgi_core

    @tgi_core.hookimpl
    def register_models(register, engine):
        pass
    """
    make_distribution("tgi-badargs", {"tgi_badargs": source}, {"badargs": "tgi_badargs"})
    with pytest.raises(PluginError, match=r"tgi-badargs.*is invalid.*engine"):
        build()


def test_invalid_spec_values_are_reported(make_distribution) -> None:
    source = """
    import tgi_core

    @tgi_core.hookimpl
    def register_models(register):
        register(tgi_core.ModelSpec(name="bad", architectures=(), factory="os:getcwd"))
    """
    make_distribution("tgi-empty", {"tgi_empty": source}, {"empty": "tgi_empty"})
    with pytest.raises(
        PluginError,
        match=r"tgi-empty.*failed in register_models: ValueError: "
        r"model 'bad': architectures must not be empty",
    ):
        build()


def test_inline_plugins_and_hook_opt_in_arguments(tgi_registry_with) -> None:
    class Inline:
        @tgi_core.hookimpl
        def register_attention_backends(self, register):
            register(
                tgi_core.AttentionBackendSpec(
                    name="inline", factory="os:getcwd", features=frozenset({"causal"}), priority=5
                )
            )

    registry = tgi_registry_with(Inline(), installed=False)
    assert registry.attention_backends["inline"].priority == 5
    assert registry.attention_backends.owner("inline").distribution == "local"
    assert len(registry.models) == 0


def test_missing_spec_lookup_lists_what_is_available() -> None:
    with pytest.raises(KeyError, match=r"no model named 'gpt9'; available: .*llama"):
        build().models["gpt9"]


def test_each_manager_is_fresh() -> None:
    first, second = make_plugin_manager(environ={}), make_plugin_manager(environ={})
    assert first is not second
    assert [info.name for info in first.infos()] == [info.name for info in second.infos()]


def test_builtin_plugins_are_registered_first_and_marked(monkeypatch) -> None:
    pm = make_plugin_manager(environ={}, builtins=["tgi_core.testing"])
    infos = pm.infos()
    assert infos[0] == PluginInfo(
        "testing", "tgi-core", infos[0].version, "tgi_core.testing", builtin=True
    )
    assert [info.builtin for info in infos] == [True] + [False] * (len(infos) - 1)


def test_tracing_shows_the_registration_calls(capsys) -> None:
    Registry.build(make_plugin_manager(environ={"TGI_TRACE_PLUGINS": "1"}))
    assert "register_models" in capsys.readouterr().err


def test_hook_wrappers_see_registration(tgi_registry_with) -> None:
    seen = []

    class Wrapper:
        @tgi_core.hookimpl(wrapper=True)
        def register_models(self, register):
            seen.append("before")
            result = yield
            seen.append("after")
            return result

    tgi_registry_with(Wrapper())
    assert seen[:2] == ["before", "after"]


def test_system_exit_at_import_is_a_plugin_error(make_distribution) -> None:
    make_distribution("tgi-quits", {"tgi_quits": "raise SystemExit(3)\n"}, {"quits": "tgi_quits"})
    with pytest.raises(PluginError, match=r"tgi-quits.*failed to import.*SystemExit: 3"):
        build()
