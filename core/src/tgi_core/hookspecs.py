"""The hooks a tgi plugin can implement: the whole plugin contract on one page.

Plugins implement hooks with ``@tgi_core.hookimpl`` on module-level functions (or
methods of an object they register). Every hook is called with keyword arguments, and
an implementation may accept only the arguments it needs, so new arguments can be
added without breaking existing plugins.

Registration hooks run once while the server is assembled, never per request or per
decoding step. Each receives a ``register`` callback; calling it with a spec adds the
spec to the typed registry of its kind (``tgi_core.registry``). Two plugins registering
the same name, or a spec of the wrong type, stop startup with an error that names the
distribution at fault.

This module imports neither torch nor litestar, so listing plugins stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:
    from tgi_core.specs import (
        AttentionBackendSpec,
        ConfigSectionSpec,
        FrontendSpec,
        ModelSourceSpec,
        ModelSpec,
        QuantizerSpec,
    )

hookspec = HookspecMarker("tgi")
hookimpl = HookimplMarker("tgi")


# -- Registration: each called once per plugin while the server is assembled ---------


@hookspec
def register_models(register: Callable[[ModelSpec], None]) -> None:
    """Register model implementations.

    A model is chosen for a checkpoint by the ``architectures`` listed in its
    ``config.json`` (then by ``model_type``). Each architecture may be served by one
    registered model only.

    :param register: call with one :class:`~tgi_core.specs.ModelSpec` per model.
    """


@hookspec
def register_attention_backends(register: Callable[[AttentionBackendSpec], None]) -> None:
    """Register attention backends.

    A backend owns the KV-cache layout, writes new keys and values by slot, and
    computes attention for a packed batch. Its ``features`` say which models it can
    serve; the server refuses at startup a model whose ``requires`` a backend lacks.

    :param register: call with one :class:`~tgi_core.specs.AttentionBackendSpec` each.
    """


@hookspec
def register_quantizers(register: Callable[[QuantizerSpec], None]) -> None:
    """Register weight quantization methods.

    A quantizer is chosen with ``--quantize NAME``, or detected from a checkpoint's
    ``quantization_config.quant_method`` when its spec lists that method.

    :param register: call with one :class:`~tgi_core.specs.QuantizerSpec` each.
    """


@hookspec
def register_frontends(register: Callable[[FrontendSpec], None]) -> None:
    """Register API frontends.

    A frontend's factory receives the serving context (engine, tokenizer, config) and
    returns Litestar route handlers; the server mounts the handlers of every frontend
    in one app. Two frontends may not serve the same route.

    :param register: call with one :class:`~tgi_core.specs.FrontendSpec` each.
    """


@hookspec
def register_config_sections(register: Callable[[ConfigSectionSpec], None]) -> None:
    """Register a plugin's own configuration section.

    The ``[plugins.NAME]`` table of a config file is validated against the section's
    ``msgspec.Struct`` schema at startup; a table that names no registered section is
    an error.

    :param register: call with one :class:`~tgi_core.specs.ConfigSectionSpec` each.
    """


@hookspec
def register_model_sources(register: Callable[[ModelSourceSpec], None]) -> None:
    """Register named model sources: names that ``--model-id`` accepts besides a folder.

    ``--model-id NAME`` serves the checkpoint folder that the source's ``path_factory``
    returns, called only when that name is served. A ``--model-id`` that is an existing
    folder is always served as the folder, so a source never hides a path. The source
    named ``demo`` (distribution ``tgi-demo``) is also served when no model is given.
    Each name may be registered by one installed plugin.

    :param register: call with one :class:`~tgi_core.specs.ModelSourceSpec` each.
    """
