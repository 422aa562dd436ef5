"""tgi-core: a text-generation server framework extended by plugins.

The public API for plugin authors: ``hookimpl`` to implement hooks, and the spec
classes to register. Importing this package does not import torch.
"""

from tgi_core.errors import ConfigError, PluginError, TGIError
from tgi_core.hookspecs import hookimpl
from tgi_core.specs import (
    ATTENTION_FEATURES,
    AttentionBackendSpec,
    ConfigSectionSpec,
    FrontendSpec,
    ModelSourceSpec,
    ModelSpec,
    QuantizerSpec,
)

__all__ = [
    "ATTENTION_FEATURES",
    "AttentionBackendSpec",
    "ConfigError",
    "ConfigSectionSpec",
    "FrontendSpec",
    "ModelSourceSpec",
    "ModelSpec",
    "PluginError",
    "QuantizerSpec",
    "TGIError",
    "hookimpl",
]
