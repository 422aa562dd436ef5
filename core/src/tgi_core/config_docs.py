"""Render the configuration reference (docs/configuration.md) from ``ServeConfig``.

Run ``python -m tgi_core.config_docs > docs/configuration.md`` (``make docs``); a test
fails when the committed file is stale.
"""

from __future__ import annotations

from itertools import groupby

from tgi_core.config import FIELDS, FILE_ONLY_FIELDS, format_value

_HEADER = """\
# Configuration reference

<!-- Generated from tgi_core.config.ServeConfig by `make docs`; do not edit by hand. -->

`tgi-core serve` reads its settings from four sources, lowest to highest precedence:

1. the defaults below;
2. a config file, `--config FILE` (or `TGI_CONFIG=FILE`), in TOML (`.toml`) or YAML
   (`.yaml`, `.yml`), whose keys are the setting names below (`max_total_tokens` or
   `max-total-tokens`);
3. environment variables, with TGI's names (`MODEL_ID`, `PORT`, ...); a variable set to
   the empty string counts as unset;
4. command-line flags (`--model-id`, `--port`, ...).

`tgi-core config` prints the effective configuration and the source of every value;
it takes the same flags as `serve`. An unknown key, a malformed value or one out of
range stops startup with a message that names the key, its source and what is allowed.
List settings (`cors_allow_origin`) take comma-separated values in the environment and
on the command line, where the flag may also be repeated.

## Differences from TGI's launcher

The names, environment variables and defaults follow `text-generation-launcher`, with
these deliberate differences:

- The default port is 8080 (TGI: 3000; its Docker image: 80), so the examples copied
  from TGI's documentation work as written. `-p` works as in TGI.
- The bind address is read from `TGI_HOSTNAME`, not `HOSTNAME`, which shells and
  containers set to the machine's name.
- `model_id` has no default (TGI: `bigscience/bloom-560m`, which would need a download):
  it names a local checkpoint folder or a model source a plugin registered (`demo`);
  unset, the demo model of `tgi-demo` is served when it is installed. `num_shard`
  defaults to 1 (TGI: every visible GPU).
- `MASTER_ADDR` and `MASTER_PORT` are torch.distributed's own variables, so a launcher
  (torchrun) that sets them, with `WORLD_SIZE` and `RANK`, makes this process one rank
  of its group (`docs/sharding.md`). `shard_timeout` and `shard_startup_timeout` are
  ours: TGI's launcher has no such settings.
- `json_output` unset means JSON lines unless stderr is a terminal; `log_level` takes
  any case and `warn`.
- The legacy spellings `--max-input-length` / `MAX_INPUT_LENGTH` are accepted for
  `max_input_tokens`.
- Launcher flags for things this server does not do are not accepted (an unknown flag is
  an error, not silently ignored): `--revision`, `--trust-remote-code` (no remote code
  and no hub downloads), `--sharded`, `--speculate`, `--kv-cache-dtype`, `--cuda-graphs`,
  `--cuda-memory-fraction`, `--prometheus-port` (metrics are served at `/metrics` on the
  main port), `--disable-grammar-support`, `--validation-workers`, `--shard-uds-path`,
  `--huggingface-hub-cache`, `--weights-cache-override`, `--disable-custom-kernels`,
  `--rope-scaling`/`--rope-factor` (read from the checkpoint), `--watermark-*`,
  `--ngrok*`, `--otlp-*`, `--lora-adapters`, `--usage-stats`, `--env`.

A complete example: [`examples/deploy.toml`](examples/deploy.toml).
"""

_PLUGINS = """\
## Plugin sections

Plugins add their own settings as `[plugins.NAME]` tables of the config file, each
validated against a schema the plugin registers through the `register_config_sections`
hook (see [plugins.md](plugins.md)). `tgi-core plugins` lists the sections installed
plugins provide, and `tgi-core config` shows their effective values. A table that names
no installed section is an error.

```toml
[plugins.hello]
greeting = "Bonjour"
```
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(name: str, value: object) -> str:
    text = format_value(name, value)
    return text if value is None else f"`{text}`"


_KERNEL_SWITCHES = """\
## CPU kernel switches

Environment variables only (for comparisons and debugging; the defaults are the fast
paths, each falling back by itself where the CPU or the machine cannot run it):

| env | default | effect |
|---|---|---|
| `TGI_CPU_AMX_GEMM` | `1` | `0`: neither AMX nor AVX-512 GEMM kernel (oneDNN, torch int8) |
| `TGI_CPU_GEMM_OPS` | `1` | `0`: the packed-weight GEMM ops run in Python, not C++ kernels |
| `TGI_CPU_PACKED_GEMM` | `1` | `0`: bf16 linear layers use plain `F.linear`, no packed weights |
| `TGI_CPU_DECODE_KERNEL` | `1` | `0`: decode attention by gather + SDPA, not the paged kernel |
| `TGI_CPU_ATTENTION_OP` | `1` | `0`: decode steps' attention calls run in Python, not C++ |
| `TGI_CPU_FUSED_OPS` | `1` | `0`: eager RMSNorm and rotary by PyTorch ops, not one C++ call |
| `TGI_CPU_AMX_DECODE` | `1` | `0`: decode kernel scores by AVX-512 dot products, not AMX tiles |
| `TGI_COMPILE_CPP_WRAPPER` | `1` | `0`: a compiled step's graph is run by Python code, not C++ |
| `TGI_CPU_PREFILL_KERNEL` | `1` | `0`: prefills (and T5's encoder) without the prefill kernel |
| `TGI_KERNEL_CACHE` | `~/.cache/tgi/kernels` | where the C++ kernels are built, at first use |
"""


def render() -> str:
    """The whole configuration reference, as Markdown."""
    parts = [_HEADER]
    settings = [info for info in FIELDS.values() if info.name not in FILE_ONLY_FIELDS]
    for group, infos in groupby(settings, key=lambda info: info.group):
        parts.append(f"## {group}\n")
        parts.append("| key | flag | env | default | allowed | description |")
        parts.append("|---|---|---|---|---|---|")
        for info in infos:
            parts.append(
                f"| `{info.name}` | `{info.flag}` | `{info.env}` "
                f"| {_default(info.name, info.default)} "
                f"| {_cell(info.allowed)} | {_cell(info.description)} |"
            )
        parts.append("")
    parts.append(_KERNEL_SWITCHES)
    parts.append(_PLUGINS)
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
