"""The ``tgi-core`` command: ``serve``, ``config``, ``plugins``, ``convert`` and ``bench``.

Every ``ServeConfig`` setting is a flag of ``serve`` and ``config``, generated from the
config's own field descriptions, so the help, the docs and the loader never disagree.
Errors raised on purpose (:class:`~tgi_core.errors.TGIError`) print as one line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from tgi_core.config import (
    FIELDS,
    FILE_ONLY_FIELDS,
    FieldInfo,
    ResolvedConfig,
    format_value,
    load_config,
)
from tgi_core.errors import ConfigError, TGIError

CONFIG_FILE_ENV = "TGI_CONFIG"


class _UserError(click.ClickException):
    """A TGIError as click prints it: ``Error: <message>``, exit code 1."""


class _UserConfigError(_UserError):
    """A ConfigError: exit code 2, like click's own usage errors."""

    exit_code = 2


class _Group(click.Group):
    """Turns a TGIError into one line on stderr with the error's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TGIError as exc:
            kind = _UserConfigError if isinstance(exc, ConfigError) else _UserError
            raise kind(str(exc)) from None


class _ConfigCommand(click.Command):
    """A command whose help lists the config flags in groups (Model, Server, ...)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            info = FIELDS.get(param.name or "")
            groups.setdefault(info.group if info else "Options", []).append(record)
        for title, records in sorted(groups.items(), key=lambda item: item[0] != "Options"):
            with formatter.section(title):
                formatter.write_dl(records)


_METAVARS = {"int": "INT", "float": "FLOAT", "str": "TEXT", "list": "TEXT"}


def _config_option(info: FieldInfo) -> click.Option:
    help_text = (
        f"{info.description}  [default: {format_value(info.name, info.default)}; "
        f"env: {', '.join((info.env, *info.alias_envs))}]"
    )
    if info.kind == "bool":
        name = info.flag.removeprefix("--")
        return click.Option([f"--{name}/--no-{name}", info.name], default=None, help=help_text)
    names = [info.flag, *info.alias_flags, *([info.short_flag] if info.short_flag else [])]
    if info.kind == "list":
        return click.Option(
            [*names, info.name], multiple=True, default=(), metavar="TEXT", help=help_text
        )
    metavar = "[" + "|".join(info.choices) + "]" if info.choices else _METAVARS[info.kind]
    return click.Option([*names, info.name], default=None, metavar=metavar, help=help_text)


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config`` and one flag per ServeConfig setting to a click command."""
    for info in reversed(FIELDS.values()):
        if info.name not in FILE_ONLY_FIELDS:
            command = _add_param(command, _config_option(info))
    config_file = click.Option(
        ["--config", "config_file"],
        metavar="FILE",
        default=None,
        envvar=CONFIG_FILE_ENV,
        help=f"A TOML or YAML file of settings, below env and flags.  [env: {CONFIG_FILE_ENV}]",
    )
    return _add_param(command, config_file)


def _add_param(command: Callable[..., Any], param: click.Parameter) -> Callable[..., Any]:
    params: list[click.Parameter] = getattr(command, "__click_params__", [])
    params.append(param)
    command.__click_params__ = params  # type: ignore[attr-defined]
    return command


def resolve(config_file: str | None, flags: dict[str, Any]) -> ResolvedConfig:
    """Build the effective config from ``--config``, the environment and given flags."""
    given = {
        name: value
        for name, value in flags.items()
        if name in FIELDS and value is not None and value != ()
    }
    return load_config(cli=given, config_file=config_file or None)


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(package_name="tgi-core", prog_name="tgi-core")
def cli() -> None:
    """tgi: serve large language models with continuous batching, extended by plugins."""


@cli.command(cls=_ConfigCommand)
@config_options
def serve(config_file: str | None, **flags: Any) -> None:
    """Serve a model over TGI's REST API and the OpenAI API."""
    from tgi_core.serving import serve as run_server

    run_server(resolve(config_file, flags))


@cli.command("config", cls=_ConfigCommand)
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show_config(config_file: str | None, as_json: bool, **flags: Any) -> None:
    """Print the effective configuration and where each value came from."""
    from tgi_core.plugins import make_plugin_manager
    from tgi_core.registry import Registry

    resolved = resolve(config_file, flags)
    resolved = resolved.with_registry(Registry.build(make_plugin_manager()))
    if as_json:
        click.echo(json.dumps(resolved.to_dict(), indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    from tgi_core.listing import print_table

    table = Table("setting", "value", "source", box=None, pad_edge=False)
    for name, value, source in resolved.rows():
        if name in FILE_ONLY_FIELDS:
            continue
        table.add_row(name, Text(format_value(name, value)), Text(source.short()))
    for section_name, section in resolved.plugin_sections.items():
        for key, value in _struct_items(section):
            table.add_row(
                f"plugins.{section_name}.{key}",
                Text(format_value("", value)),
                Text(resolved.sources["plugins"].short()),
            )
    print_table(table)


def _struct_items(struct: Any) -> Iterable[tuple[str, Any]]:
    return ((name, getattr(struct, name)) for name in struct.__struct_fields__)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_plugins(as_json: bool) -> None:
    """List installed plugins and what each registered."""
    from tgi_core.listing import plugins_as_json, render_plugins_table
    from tgi_core.plugins import make_plugin_manager
    from tgi_core.registry import Registry

    registry = Registry.build(make_plugin_manager())
    if as_json:
        click.echo(json.dumps(plugins_as_json(registry), indent=2))
    else:
        render_plugins_table(registry)


@cli.command("convert")
@click.argument("folder", type=click.Path(file_okay=False))
def convert(folder: str) -> None:
    """Convert a checkpoint's PyTorch pickle weights (.bin) to safetensors.

    Reads them with torch.load(weights_only=True), which refuses anything but tensors,
    and writes model.safetensors (or shards and an index) next to them.
    """
    from tgi_core.model.convert import convert_checkpoint

    for path in convert_checkpoint(folder):
        click.echo(f"wrote {path}")


def _concurrency_list(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"{value!r} is not a list of positive integers, e.g. 1,8,32")
    return levels


def _length_range(_ctx: click.Context, _param: click.Parameter, value: str) -> Any:
    from tgi_core.bench.workload import LengthRange, WorkloadError

    try:
        return LengthRange.parse(value)
    except WorkloadError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command("bench")
@click.option(
    "--url", default="http://127.0.0.1:8080", show_default=True, help="The server's base URL."
)
@click.option(
    "--api",
    type=click.Choice(["tgi", "openai"]),
    default="tgi",
    show_default=True,
    help="tgi: POST /generate_stream; openai: POST /v1/completions, streamed.",
)
@click.option(
    "--concurrency",
    "-c",
    default="1,8,32",
    show_default=True,
    callback=_concurrency_list,
    metavar="N[,N...]",
    help="Concurrent streaming clients; a comma-separated list is swept.",
)
@click.option(
    "--requests",
    "-n",
    type=click.IntRange(min=1),
    default=None,
    help="Requests per concurrency level.  [default: 4 per client]",
)
@click.option(
    "--prompt-tokens",
    default="128",
    show_default=True,
    callback=_length_range,
    metavar="N|LOW:HIGH",
    help="Prompt length: N, or LOW:HIGH drawn uniformly (tokens with --tokenizer, else words).",
)
@click.option(
    "--max-new-tokens",
    default="128",
    show_default=True,
    callback=_length_range,
    metavar="N|LOW:HIGH",
    help="Tokens to generate per request: N, or LOW:HIGH drawn uniformly.",
)
@click.option(
    "--shared-prefix",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Tokens of a prefix every prompt starts with (a shared system prompt).",
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True),
    default=None,
    help="tokenizer.json (or a checkpoint folder) to build prompts of exact token lengths.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the whole plan.")
@click.option(
    "--temperature",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="0 decodes greedily; above 0 samples, with a seed per request.",
)
@click.option(
    "--ignore-eos",
    is_flag=True,
    help="Generate every requested token, past EOS (--api openai: vLLM's ignore_eos field).",
)
@click.option("--model", default=None, help="The `model` field of OpenAI requests.")
@click.option("--api-key", envvar="TGI_BENCH_API_KEY", default=None, help="Sent as a Bearer token.")
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Requests sent one by one before the sweep, not reported.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.0, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds to wait for a connection, or for the next bytes of a response.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a PNG of throughput and latencies against concurrency (needs matplotlib).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on stderr.  [default: when stderr is a terminal]",
)
def bench(as_json: bool, plot: str | None, progress: bool | None, **options: Any) -> None:
    """Load-test a running TGI- or OpenAI-compatible server with streaming clients.

    Sweeps the concurrency levels and reports, for each, output tokens/s, time to first
    token and inter-token latency (p50, p95), end-to-end latency, and errors.
    """
    from rich.console import Console

    from tgi_core.bench.command import BenchSettings, all_failed, run_sweep
    from tgi_core.bench.report import as_json as report_json
    from tgi_core.bench.report import print_report

    if options["ignore_eos"] and options["api"] != "openai":
        raise click.UsageError("--ignore-eos needs --api openai: TGI's API has no such field")
    settings = BenchSettings(**options)
    stderr = Console(stderr=True)
    reports = run_sweep(
        settings, progress=stderr.is_terminal if progress is None else progress, console=stderr
    )
    if as_json:
        click.echo(json.dumps(report_json(settings.as_json(), reports), indent=2))
    else:
        print_report(reports)
    if plot is not None:
        from tgi_core.bench.plot import write_plot

        write_plot(reports, plot, title=f"{settings.url} ({settings.api} API)")
        if not as_json:
            click.echo(f"wrote {plot}")
    failure = all_failed(reports)
    if failure is not None:
        raise click.ClickException(f"no request succeeded: {failure}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="tgi-core")


if __name__ == "__main__":
    main()
