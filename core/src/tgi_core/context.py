"""What a frontend's factory receives: the config, plugin sections and serving objects."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from tgi_core.config import ServeConfig

T = TypeVar("T", bound=msgspec.Struct)


@dataclass(frozen=True)
class FrontendContext:
    """Handed to ``FrontendSpec`` factories when the server app is assembled.

    ``engine`` and ``tokenizer`` are the running engine and the model's tokenizer
    (``None`` where a frontend is built without a model, e.g. in its own tests).
    """

    config: ServeConfig
    plugin_sections: Mapping[str, msgspec.Struct] = field(default_factory=dict)
    engine: Any = None
    tokenizer: Any = None

    def section(self, name: str, schema: type[T]) -> T:
        """The validated ``[plugins.NAME]`` section, typed as ``schema``."""
        value = self.plugin_sections.get(name)
        if value is None:
            raise KeyError(
                f"no plugin section named {name!r}; sections: "
                f"{', '.join(sorted(self.plugin_sections)) or 'none'}"
            )
        if not isinstance(value, schema):
            raise TypeError(f"section {name!r} is a {type(value).__name__}, not {schema.__name__}")
        return value
