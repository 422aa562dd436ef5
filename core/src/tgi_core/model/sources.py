"""What ``--model-id`` names: a checkpoint folder, or a model source a plugin registered.

:func:`resolve_model_id` is the one place that turns the setting into a folder:

1. an existing folder is served as it is (a source name never hides a path);
2. a name registered through ``register_model_sources`` serves the source's folder;
3. no model id at all serves the ``demo`` source (distribution ``tgi-demo``), if loaded;
4. anything else that looks like a path is passed on, for the checkpoint loader to
   say what is wrong with it; a bare name is an error listing the registered sources.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, NamedTuple

from tgi_core.errors import ConfigError
from tgi_core.plugins import installed_plugin_names
from tgi_core.registry import Registry

#: The source served when no ``--model-id`` is given, and the distribution providing it.
DEFAULT_SOURCE = "demo"
DEFAULT_DISTRIBUTION = "tgi-demo"

How = Literal["folder", "source", "default"]


class ResolvedModelId(NamedTuple):
    """The folder to serve, how the setting led to it, and the name to report."""

    path: str
    how: How
    #: the model's name in ``/info`` and API responses: the model id, or the source name
    name: str


def resolve_model_id(model_id: str | None, registry: Registry) -> ResolvedModelId:
    """Resolve the ``model_id`` setting against the registered model sources.

    Raises :class:`~tgi_core.errors.ConfigError` when no model is given and the demo
    source is not loaded, when a bare name is neither a folder nor a source, and when a
    source's folder does not exist. A missing path is left to ``Checkpoint.open``.
    """
    sources = registry.model_sources
    if model_id is None:
        if DEFAULT_SOURCE not in sources:
            raise ConfigError(_no_model_message())
        return ResolvedModelId(_source_folder(registry, DEFAULT_SOURCE), "default", DEFAULT_SOURCE)
    if Path(model_id).is_dir():
        return ResolvedModelId(model_id, "folder", model_id)
    if model_id in sources:
        return ResolvedModelId(_source_folder(registry, model_id), "source", model_id)
    if _looks_like_a_path(model_id):
        return ResolvedModelId(model_id, "folder", model_id)
    known = ", ".join(f"{spec.name} ({sources.owner(spec.name).distribution})" for spec in sources)
    raise ConfigError(
        f"model_id {model_id!r} is neither a folder nor a model source name; "
        f"registered sources: {known or 'none'} (tgi-core serves folders on this machine "
        "and downloads nothing)"
    )


def _looks_like_a_path(model_id: str) -> bool:
    separators = (os.sep, os.altsep) if os.altsep else (os.sep,)
    return (
        any(sep in model_id for sep in separators)
        or model_id.startswith((".", "~"))
        or os.path.lexists(model_id)
    )


def _source_folder(registry: Registry, name: str) -> str:
    spec = registry.model_sources[name]
    owner = registry.model_sources.owner(name).describe()
    try:
        folder = spec.path()
    except Exception as exc:
        raise ConfigError(
            f"model source {name!r} of {owner} failed to give its folder: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not folder.is_dir():
        raise ConfigError(
            f"model source {name!r} of {owner} names the folder {folder}, which does not "
            "exist; reinstall that distribution"
        )
    return str(folder)


def _no_model_message() -> str:
    message = "no model to serve: pass --model-id DIR or set MODEL_ID"
    if DEFAULT_DISTRIBUTION in installed_plugin_names():
        return (
            f"{message} ({DEFAULT_DISTRIBUTION}, whose demo model is served by default, is "
            "installed but not loaded: see TGI_LOAD_PLUGINS)"
        )
    return f"{message}, or `pip install {DEFAULT_DISTRIBUTION}` to serve its demo model"
