"""``ServeConfig``: every setting of ``tgi-core serve``, and where each value came from.

Sources, lowest to highest precedence: the defaults below, a config file (``--config
FILE``, TOML or YAML), environment variables (TGI's names: ``MODEL_ID``, ``PORT``, ...),
and command-line flags (``--model-id``, ``--port``, ...). Names follow TGI's launcher.

Every value is validated where it enters: an unknown key, a malformed value or one out
of range raises :class:`~tgi_core.errors.ConfigError` naming the key, the source and
what is allowed. Plugins add their own ``[plugins.NAME]`` sections through the
``register_config_sections`` hook; those are validated once plugins are loaded.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from msgspec import inspect as mi

from tgi_core.errors import ConfigError

if typing.TYPE_CHECKING:
    from tgi_core.registry import Registry

DType = Literal["float32", "bfloat16", "float16"]
LogLevel = Literal["trace", "debug", "info", "warning", "error"]


def _opt(description: str, group: str, **extra: Any) -> Meta:
    """Field metadata: ``env`` (if not the upper-cased name), ``aliases`` (legacy names),
    ``short`` (a one-letter flag), ``secret`` (never printed), ``value_aliases``."""
    return Meta(description=description, extra={"group": group, **extra})


PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
NonNegativeFloat = Annotated[float, Meta(ge=0.0)]
Port = Annotated[int, Meta(ge=1, le=65535)]
NonEmptyStr = Annotated[str, Meta(min_length=1)]


class ServeConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The effective configuration of a server (TGI's launcher names and defaults)."""

    # -- Model ------------------------------------------------------------------------
    model_id: Annotated[
        str | None,
        _opt(
            "Hugging Face checkpoint folder to serve (config.json, safetensors, tokenizer "
            "files), or a model source name (`tgi-core plugins` lists them); unset serves "
            "the demo model when tgi-demo is installed.",
            "Model",
        ),
    ] = None
    dtype: Annotated[
        DType | None,
        _opt("Data type of the weights; unset picks the fastest for the device.", "Model"),
    ] = None
    quantize: Annotated[
        str | None,
        _opt(
            "Quantizer to apply (`tgi-core plugins` lists them); unset uses the "
            "checkpoint's quantization_config, if any.",
            "Model",
        ),
    ] = None
    compile: Annotated[
        bool,
        _opt(
            "Compile the model's forward with torch.compile (inductor): faster steps "
            "(docs/benchmarks.md), at the cost of compiling at startup.",
            "Model",
        ),
    ] = False
    tokenizer_config_path: Annotated[
        str | None,
        _opt(
            "tokenizer_config.json to use instead of the checkpoint's (e.g. for "
            "another chat template).",
            "Model",
        ),
    ] = None
    # -- Attention and KV cache -------------------------------------------------------
    attention: Annotated[
        str | None,
        _opt(
            "Attention backend; unset picks the highest-priority installed backend "
            "that supports the model.",
            "KV cache",
            env="ATTENTION",
        ),
    ] = None
    block_size: Annotated[
        Annotated[int, Meta(ge=1, le=1024)], _opt("Tokens per KV-cache block.", "KV cache")
    ] = 16
    prefix_caching: Annotated[
        bool,
        _opt("Reuse the KV blocks of prompt prefixes shared between requests.", "KV cache"),
    ] = True
    # -- Batching ---------------------------------------------------------------------
    max_batch_prefill_tokens: Annotated[
        PositiveInt,
        _opt(
            "Most prompt tokens processed in one step (the prefill chunk budget); the "
            "default is capped at max_batch_total_tokens.",
            "Batching",
        ),
    ] = 4096
    max_batch_total_tokens: Annotated[
        PositiveInt | None,
        _opt(
            "Most tokens held in the KV cache at once; unset: half the memory available "
            "after loading, but no more than max_concurrent_requests requests of "
            "max_total_tokens each.",
            "Batching",
        ),
    ] = None
    max_batch_size: Annotated[
        PositiveInt | None, _opt("Most sequences in one step; unset means no limit.", "Batching")
    ] = None
    prefill_chunking: Annotated[
        bool,
        _opt("Split long prompts into chunks prefilled alongside running decodes.", "Batching"),
    ] = True
    waiting_served_ratio: Annotated[
        NonNegativeFloat,
        _opt(
            "Without prefill chunking: waiting/running ratio that triggers a prefill.", "Batching"
        ),
    ] = 0.3
    max_waiting_tokens: Annotated[
        NonNegativeInt,
        _opt(
            "Without prefill chunking: decode steps a waiting request may be made to wait.",
            "Batching",
        ),
    ] = 20
    # -- Request limits ---------------------------------------------------------------
    max_concurrent_requests: Annotated[
        PositiveInt,
        _opt("Requests in flight at once; more are answered 429.", "Limits"),
    ] = 128
    max_input_tokens: Annotated[
        PositiveInt | None,
        _opt(
            "Longest prompt in tokens; unset means max_total_tokens - 1.",
            "Limits",
            aliases=("max_input_length",),
        ),
    ] = None
    max_total_tokens: Annotated[
        Annotated[int, Meta(ge=2)] | None,
        _opt(
            "Longest prompt plus generation in tokens; unset means the model's "
            "context length (capped by the KV cache).",
            "Limits",
        ),
    ] = None
    max_best_of: Annotated[PositiveInt, _opt("Largest best_of / n of one request.", "Limits")] = 2
    max_stop_sequences: Annotated[
        NonNegativeInt, _opt("Most stop sequences in one request.", "Limits")
    ] = 4
    max_top_n_tokens: Annotated[
        NonNegativeInt, _opt("Largest top_n_tokens / top_logprobs of one request.", "Limits")
    ] = 5
    max_client_batch_size: Annotated[
        PositiveInt, _opt("Most prompts in one /v1/completions request.", "Limits")
    ] = 4
    payload_limit: Annotated[
        PositiveInt, _opt("Largest request body in bytes; larger bodies get 413.", "Limits")
    ] = 2_000_000
    enable_prefill_logprobs: Annotated[
        bool, _opt("Allow requests to ask for the logprobs of prompt tokens.", "Limits")
    ] = False
    # -- Server -----------------------------------------------------------------------
    hostname: Annotated[
        NonEmptyStr,
        _opt("Address to listen on.", "Server", env="TGI_HOSTNAME"),
    ] = "0.0.0.0"
    port: Annotated[Port, _opt("Port to listen on.", "Server", short="-p")] = 8080
    api_key: Annotated[
        NonEmptyStr | None,
        _opt("Require `Authorization: Bearer KEY` on generation routes.", "Server", secret=True),
    ] = None
    cors_allow_origin: Annotated[
        list[str],
        _opt("Origins allowed by CORS (comma-separated); empty allows any.", "Server"),
    ] = []
    graceful_termination_timeout: Annotated[
        NonNegativeInt,
        _opt("Seconds in-flight requests may take to finish after SIGTERM.", "Server"),
    ] = 90
    # -- Sharding ---------------------------------------------------------------------
    num_shard: Annotated[
        PositiveInt,
        _opt(
            "Tensor-parallel ranks: this machine starts them, or a launcher (torchrun) "
            "does and sets WORLD_SIZE, which must then agree.",
            "Sharding",
        ),
    ] = 1
    master_addr: Annotated[
        NonEmptyStr, _opt("torch.distributed rendezvous address (rank 0's host).", "Sharding")
    ] = "localhost"
    master_port: Annotated[Port, _opt("torch.distributed rendezvous port.", "Sharding")] = 29500
    shard_timeout: Annotated[
        Annotated[float, Meta(gt=0)],
        _opt(
            "Seconds a rank may stay silent (in a collective, or without a heartbeat) "
            "before the group is declared failed and shut down.",
            "Sharding",
        ),
    ] = 60.0
    shard_startup_timeout: Annotated[
        Annotated[float, Meta(gt=0)],
        _opt("Seconds the ranks may take to join the group and load their shards.", "Sharding"),
    ] = 600.0
    # -- Logging ----------------------------------------------------------------------
    json_output: Annotated[
        bool | None,
        _opt("Log JSON lines; unset logs JSON unless stderr is a terminal.", "Logging"),
    ] = None
    log_level: Annotated[
        LogLevel,
        _opt(
            "Least severe level logged (any case; `warn` means warning).",
            "Logging",
            value_aliases={"warn": "warning"},
        ),
    ] = "info"
    # -- Plugins ----------------------------------------------------------------------
    plugins: Annotated[
        dict[str, dict[str, Any]],
        _opt(
            "Plugin sections, `[plugins.NAME]` in a config file (validated by each "
            "plugin's schema).",
            "Plugins",
        ),
    ] = {}


#: Fields that only a config file can set (they have no env variable or CLI flag).
FILE_ONLY_FIELDS = frozenset({"plugins"})


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """What the CLI, the docs and the loader need to know about one setting."""

    name: str
    annotation: Any
    default: Any
    description: str
    group: str
    env: str
    flag: str
    allowed: str
    #: ``bool``, ``int``, ``float``, ``str``, ``choice``, ``list`` or ``table``
    kind: str
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    short_flag: str = ""
    secret: bool = False
    value_aliases: Mapping[str, str] = field(default_factory=dict)

    @property
    def alias_envs(self) -> tuple[str, ...]:
        return tuple(alias.upper() for alias in self.aliases)

    @property
    def alias_flags(self) -> tuple[str, ...]:
        return tuple("--" + alias.replace("_", "-") for alias in self.aliases)


def _meta_of(annotation: Any) -> Meta:
    metas = [m for m in typing.get_args(annotation)[1:] if isinstance(m, Meta)]
    return next(m for m in metas if m.extra and "group" in m.extra)


def _literal_values(annotation: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` inside ``annotation``, in declared order."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return tuple(str(value) for value in typing.get_args(annotation))
    if origin is Annotated:
        return _literal_values(typing.get_args(annotation)[0])
    for arg in typing.get_args(annotation):
        values = _literal_values(arg)
        if values:
            return values
    return ()


def describe_allowed(annotation: Any) -> str:
    """What values a field accepts, in words (used in errors, help and docs)."""
    choices = _literal_values(annotation)
    info = mi.type_info(annotation)
    optional = isinstance(info, mi.UnionType) and any(
        isinstance(t, mi.NoneType) for t in info.types
    )
    if choices:
        return "one of " + ", ".join(choices) + (" (or unset)" if optional else "")
    return _describe(info)


def _describe(info: mi.Type) -> str:
    if isinstance(info, mi.Metadata):
        return _describe(info.type)
    if isinstance(info, mi.UnionType):
        parts = [t for t in info.types if not isinstance(t, mi.NoneType)]
        text = " or ".join(_describe(t) for t in parts)
        return text + " (or unset)" if len(parts) < len(info.types) else text
    if isinstance(info, mi.BoolType):
        return "true or false"
    if isinstance(info, mi.IntType | mi.FloatType):
        noun = "an integer" if isinstance(info, mi.IntType) else "a number"
        low, high = info.ge, info.le
        if low is not None and high is not None:
            return f"{noun} from {low} to {high}"
        if low is not None:
            return f"{noun} >= {low}"
        if info.gt is not None:
            return f"{noun} > {info.gt}"
        return noun
    if isinstance(info, mi.StrType):
        return "a non-empty string" if info.min_length else "a string"
    if isinstance(info, mi.ListType):
        return f"a list of {_describe(info.item_type).removeprefix('a ')}s"
    if isinstance(info, mi.DictType):
        return "a table"
    return "any value"


def _kind_of(annotation: Any) -> str:
    if _literal_values(annotation):
        return "choice"
    info = mi.type_info(annotation)
    while isinstance(info, mi.Metadata | mi.UnionType):
        if isinstance(info, mi.Metadata):
            info = info.type
        else:
            info = next(t for t in info.types if not isinstance(t, mi.NoneType))
    kinds = {
        mi.BoolType: "bool",
        mi.IntType: "int",
        mi.FloatType: "float",
        mi.StrType: "str",
        mi.ListType: "list",
        mi.DictType: "table",
    }
    return kinds[type(info)]


def _field_infos() -> dict[str, FieldInfo]:
    hints = typing.get_type_hints(ServeConfig, include_extras=True)
    infos = {}
    for struct_field in msgspec.structs.fields(ServeConfig):
        name, annotation = struct_field.name, hints[struct_field.name]
        meta = _meta_of(annotation)
        extra = meta.extra or {}
        file_only = name in FILE_ONLY_FIELDS
        infos[name] = FieldInfo(
            name=name,
            annotation=annotation,
            default=(
                struct_field.default_factory()
                if struct_field.default is msgspec.NODEFAULT
                else struct_field.default
            ),
            description=meta.description or "",
            group=extra["group"],
            env="" if file_only else extra.get("env", name.upper()),
            flag="" if file_only else "--" + name.replace("_", "-"),
            allowed=describe_allowed(annotation),
            kind=_kind_of(annotation),
            choices=_literal_values(annotation),
            aliases=tuple(extra.get("aliases", ())),
            short_flag=extra.get("short", ""),
            secret=bool(extra.get("secret", False)),
            value_aliases=dict(extra.get("value_aliases", {})),
        )
    return infos


def format_value(name: str, value: Any) -> str:
    """A setting's value as text for tables and help; secrets are never shown."""
    if value is not None and name in FIELDS and FIELDS[name].secret:
        return "<redacted>"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or "empty"
    return str(value)


#: Every setting, in declaration order.
FIELDS: dict[str, FieldInfo] = _field_infos()


@dataclass(frozen=True, slots=True)
class Source:
    """Where a value came from: ``default``, ``file``, ``env`` or ``cli``."""

    kind: Literal["default", "file", "env", "cli"]
    detail: str = ""

    def __str__(self) -> str:
        return {
            "default": "the default",
            "file": f"config file {self.detail}",
            "env": f"environment variable {self.detail}",
            "cli": f"command-line flag {self.detail}",
        }[self.kind]

    def short(self) -> str:
        """Compact form for tables: ``default``, ``file:deploy.toml``, ``env:PORT``."""
        return self.kind if self.kind == "default" else f"{self.kind}:{self.detail}"


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated :class:`ServeConfig`, the source of each value, and plugin sections."""

    config: ServeConfig
    sources: Mapping[str, Source]
    plugin_sections: Mapping[str, msgspec.Struct] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, Any, Source]]:
        """``(name, value, source)`` for every setting, in declaration order."""
        return [(name, getattr(self.config, name), self.sources[name]) for name in FIELDS]

    def to_dict(self) -> dict[str, Any]:
        """The effective config and its sources, JSON-ready (``tgi-core config --json``)."""
        values = msgspec.to_builtins(self.config)
        for name, info in FIELDS.items():
            if info.secret and values.get(name) is not None:
                values[name] = "<redacted>"
        return {
            "config": values,
            "sources": {name: source.short() for name, source in self.sources.items()},
            "plugin_sections": {
                name: msgspec.to_builtins(section) for name, section in self.plugin_sections.items()
            },
        }

    def with_registry(self, registry: Registry) -> ResolvedConfig:
        """Check the settings that name plugins, and validate ``[plugins.NAME]`` tables.

        ``quantize`` and ``attention`` must name a registered quantizer and attention
        backend; each plugin section is validated against its registered schema.
        """
        for name, kinds in (
            ("quantize", registry.quantizers),
            ("attention", registry.attention_backends),
        ):
            value = getattr(self.config, name)
            if value is not None and value not in kinds:
                available = ", ".join(sorted(kinds.names())) or "none installed"
                raise ConfigError(
                    f"{name} = {value!r} from {self.sources[name]} names no installed "
                    f"{kinds.kind}; available: {available}"
                )
        sections = validate_plugin_sections(self.config.plugins, self.sources, registry)
        return ResolvedConfig(self.config, self.sources, sections)


def _error(name: str, raw: Any, source: Source, problem: str) -> ConfigError:
    info = FIELDS[name]
    if source.kind in ("env", "cli") and "got `str`" in problem:
        problem = "it cannot be read as such"  # every value from these sources is text
    return ConfigError(
        f"{name} = {raw!r} from {source} is invalid: {problem}; allowed: {info.allowed}"
    )


def _coerce(name: str, raw: Any, source: Source) -> Any:
    info = FIELDS[name]
    value = raw
    if info.kind == "list" and isinstance(raw, str):
        value = [part.strip() for part in raw.split(",") if part.strip()]
    elif info.kind == "list" and isinstance(raw, tuple | list) and source.kind != "file":
        value = [part.strip() for item in raw for part in str(item).split(",") if part.strip()]
    elif info.kind == "choice" and isinstance(raw, str):
        value = raw.strip().lower()
        value = info.value_aliases.get(value, value)
    try:
        return msgspec.convert(value, info.annotation, strict=False)
    except msgspec.ValidationError as exc:
        raise _error(name, raw, source, str(exc)) from None


def _canonical(key: str) -> str | None:
    """The setting a key (or legacy alias, in any spelling) names, or None."""
    name = key.strip().lower().replace("-", "_")
    if name in FIELDS:
        return name
    return next((info.name for info in FIELDS.values() if name in info.aliases), None)


def _unknown_key(key: str, source: Source) -> ConfigError:
    close = difflib.get_close_matches(key, list(FIELDS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"unknown key {key!r} in {source}{hint}; `tgi-core serve --help` lists every key"
    )


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into a mapping."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"config file {file} does not exist")
    if not file.is_file():
        raise ConfigError(f"config file {file} is not a file")
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(
            f"config file {file} has an unknown type {suffix!r}; use .toml, .yaml or .yml"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {file} is not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise ConfigError(f"config file {file} cannot be read: {exc.strerror}") from None
    data: Any
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())
            raise ConfigError(f"config file {file} is not valid YAML: {detail}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file} must hold a table of settings at its top level")
    return data


def _file_values(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Source]:
    source = Source("file", str(path))
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, raw in read_config_file(path).items():
        name = _canonical(str(key))
        if name is None:
            raise _unknown_key(str(key), source)
        if name in spelled:
            raise ConfigError(
                f"{source} sets {name} twice, as {spelled[name]!r} and {key!r}; keep one"
            )
        spelled[name] = str(key)
        is_table_of_tables = isinstance(raw, dict) and all(
            isinstance(table, dict) for table in raw.values()
        )
        if name == "plugins" and not is_table_of_tables:
            raise ConfigError(
                f"plugins in {source} must be a table of tables: [plugins.NAME] sections"
            )
        values[name] = _coerce(name, raw, source)
    return values, source


def load_config(
    *,
    cli: Mapping[str, Any] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ResolvedConfig:
    """Merge defaults < ``config_file`` < ``environ`` < ``cli`` into a validated config.

    ``cli`` maps field names to the raw values of the flags that were given (flags
    left out must be absent, not ``None``). Environment variables set to the empty
    string count as unset.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {name: Source("default") for name in FIELDS}

    if config_file is not None:
        file_values, file_source = _file_values(config_file)
        values.update(file_values)
        sources.update(dict.fromkeys(file_values, file_source))

    for name, info in FIELDS.items():
        if name in FILE_ONLY_FIELDS:
            continue
        given = [env for env in (info.env, *info.alias_envs) if environ.get(env, "") != ""]
        if len(given) > 1:
            raise ConfigError(
                f"environment variables {' and '.join(given)} both set {name}; keep one"
            )
        if given:
            source = Source("env", given[0])
            values[name] = _coerce(name, environ[given[0]], source)
            sources[name] = source

    for name, raw in (cli or {}).items():
        if name not in FIELDS or name in FILE_ONLY_FIELDS:
            raise ConfigError(f"unknown command-line setting {name!r}")
        source = Source("cli", FIELDS[name].flag)
        values[name] = _coerce(name, raw, source)
        sources[name] = source

    config = ServeConfig(**values)
    _check_relations(config, sources)
    return ResolvedConfig(config, sources)


def _check_relations(config: ServeConfig, sources: Mapping[str, Source]) -> None:
    """Rules that involve more than one setting (TGI's launcher checks)."""

    def show(name: str) -> str:
        return f"{name} ({getattr(config, name)}, from {sources[name]})"

    def require(ok: bool, smaller: str, relation: str, larger: str) -> None:
        if not ok:
            raise ConfigError(f"{show(smaller)} must be {relation} {show(larger)}")

    c = config
    if c.max_input_tokens is not None and c.max_total_tokens is not None:
        require(
            c.max_input_tokens < c.max_total_tokens,
            "max_input_tokens",
            "less than",
            "max_total_tokens",
        )
    if c.max_batch_total_tokens is not None:
        if c.max_total_tokens is not None:
            require(
                c.max_total_tokens <= c.max_batch_total_tokens,
                "max_total_tokens",
                "at most",
                "max_batch_total_tokens",
            )
        if sources["max_batch_prefill_tokens"].kind != "default":  # a default is capped
            require(
                c.max_batch_prefill_tokens <= c.max_batch_total_tokens,
                "max_batch_prefill_tokens",
                "at most",
                "max_batch_total_tokens",
            )
    if c.compile and c.num_shard > 1:
        raise ConfigError(
            f"{show('compile')} is not supported with {show('num_shard')} yet: "
            "serve a sharded model without compile"
        )
    if not c.prefill_chunking and c.max_input_tokens is not None:
        require(
            c.max_input_tokens <= c.max_batch_prefill_tokens,
            "max_input_tokens",
            "at most (without prefill chunking)",
            "max_batch_prefill_tokens",
        )


def validate_plugin_sections(
    tables: Mapping[str, Mapping[str, Any]],
    sources: Mapping[str, Source],
    registry: Registry,
) -> dict[str, msgspec.Struct]:
    """Validate each ``[plugins.NAME]`` table; every registered section gets a value."""
    source = sources.get("plugins", Source("default"))
    known = registry.config_sections
    for name in tables:
        if name not in known:
            close = difflib.get_close_matches(name, known.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            available = ", ".join(sorted(known.names())) or "none"
            raise ConfigError(
                f"[plugins.{name}] in {source} names no installed plugin section{hint}; "
                f"sections: {available}"
            )
    sections: dict[str, msgspec.Struct] = {}
    for spec in known:
        table = tables.get(spec.name, {})
        owner = known.owner(spec.name)
        allowed = [f.encode_name for f in msgspec.structs.fields(spec.schema)]
        unknown = [key for key in table if key not in allowed]
        if unknown:
            raise ConfigError(
                f"[plugins.{spec.name}] in {source} has unknown key(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(allowed)} (section of {owner.describe()})"
            )
        try:
            sections[spec.name] = msgspec.convert(table, spec.schema, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(
                f"[plugins.{spec.name}] in {source} is invalid: {exc} "
                f"(section of {owner.describe()})"
            ) from None
    return sections
