"""Hugging Face chat templates, rendered for ``/v1/chat/completions``.

The rendering follows ``transformers``' ``apply_chat_template(..., tokenize=False)``: the same
sandboxed jinja2 environment, helpers and template variables. Templates are untrusted code from
the model folder, so they run in jinja2's immutable sandbox and see only plain JSON data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The named special tokens a tokenizer config may define; templates read them as variables.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# Appended to the final assistant message to find where its content ends in the rendered text.
# The trailing space tells whether the template trimmed the content (see ``_cut_after_content``).
_CONTINUE_TAG = "TGI_CONTINUE_FINAL_MESSAGE "


class ChatTemplateError(Exception):
    """A template that cannot be found or rendered; str(exc) is the message for the user."""


class _RaisedByTemplate(jinja2.TemplateError):
    """What ``raise_exception(message)`` raises, so its message reaches the user verbatim."""


class _GenerationBlocks(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` and renders the body unchanged.

    transformers uses these tags to mark assistant tokens for training masks; serving ignores them.
    """

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
    ensure_ascii: bool = False,
) -> str:
    """``json.dumps`` without jinja's HTML escaping; non-ASCII text is kept as is by default."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlocks],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special tokens it is rendered with."""

    source: str
    origin: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike[str],
        tokenizer_config_path: str | None = None,
        *,
        tokenizer: Any = None,
    ) -> ChatTemplate | None:
        """Find the model's chat template; None when it has none.

        Looked up in order: ``tokenizer_config_path``'s ``chat_template`` (that file must exist and
        be JSON), ``model_dir/chat_template.jinja``, ``model_dir/tokenizer_config.json``'s
        ``chat_template``. A ``chat_template`` that is a list of ``{"name", "template"}`` entries
        gives its "default" one. Special tokens come from ``tokenizer`` when given, else from the
        tokenizer config files (``tokenizer_config_path``'s values win). Raises ChatTemplateError
        for files that cannot be read and templates that cannot be chosen.
        """
        model_dir = Path(model_dir)
        found = None
        override: dict[str, Any] = {}
        if tokenizer_config_path is not None:
            override = _read_config(Path(tokenizer_config_path))
            found = _choose(override.get("chat_template"), tokenizer_config_path)
        model_config_file = model_dir / "tokenizer_config.json"
        model_config = _read_config(model_config_file) if model_config_file.is_file() else {}
        jinja_file = model_dir / "chat_template.jinja"
        if found is None and jinja_file.is_file():
            found = (_read_text(jinja_file), "chat_template.jinja")
        if found is None:
            found = _choose(model_config.get("chat_template"), "tokenizer_config.json")
        if found is None:
            return None

        if tokenizer is not None:
            special_tokens = _tokenizer_special_tokens(tokenizer)
        else:
            special_tokens = {
                **_config_special_tokens(model_config),
                **_config_special_tokens(override),
            }
        source, origin = found
        return cls(source=source, origin=origin, special_tokens=special_tokens)

    @cached_property
    def _compiled(self) -> jinja2.Template:
        return _ENV.from_string(self.source)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text for ``messages``.

        When the last message is the assistant's, it is continued instead: the chat is rendered
        without the generation prompt and cut right after that message's content. The template
        sees ``messages`` (top-level None values dropped), ``add_generation_prompt``, ``tools``
        (None when not given, as in transformers), the special tokens and ``extra``; ``extra``
        overrides special tokens but not the other three. Raises ChatTemplateError when the
        template fails: ``raise_exception(message)`` gives ``message`` verbatim.
        """
        chat = [_plain_message(message) for message in messages]
        if not chat:
            raise ChatTemplateError("the chat has no messages")
        continued = _mark_final_message(chat[-1]) if chat[-1].get("role") == "assistant" else None
        variables: dict[str, Any] = {
            **self.special_tokens,
            **_plain(dict(extra or {})),
            "messages": chat,
            "add_generation_prompt": add_generation_prompt and continued is None,
            "tools": None if tools is None else _plain(list(tools)),
        }
        try:
            text = self._compiled.render(variables)
        except _RaisedByTemplate as exc:
            raise ChatTemplateError(str(exc)) from exc
        except jinja2.TemplateSyntaxError as exc:
            detail = f"syntax error on line {exc.lineno}: {exc.message}"
            raise ChatTemplateError(f"the chat template failed: {detail}") from exc
        except Exception as exc:
            detail = str(exc) or type(exc).__name__
            raise ChatTemplateError(f"the chat template failed: {detail}") from exc
        return text if continued is None else _cut_after_content(text, continued)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatTemplateError(f"tokenizer config {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ChatTemplateError(f"cannot read tokenizer config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ChatTemplateError(f"tokenizer config {path} is not a JSON object")
    return config


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise ChatTemplateError(f"cannot read chat template {path}: {exc}") from exc


def _choose(value: Any, origin: str) -> tuple[str, str] | None:
    """(source, origin) from a config's ``chat_template`` value; None when there is none."""
    if value is None:
        return None
    if isinstance(value, str):
        return value, origin
    if not isinstance(value, list):
        raise ChatTemplateError(f"{origin}: chat_template must be a string or a list of templates")
    names = []
    for entry in value:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("template"), str)
        ):
            raise ChatTemplateError(
                f'{origin}: each chat_template entry must be {{"name": ..., "template": ...}}'
            )
        if entry["name"] == "default":
            return entry["template"], f"{origin} (template 'default')"
        names.append(repr(entry["name"]))
    listed = ", ".join(names) or "none"
    raise ChatTemplateError(f"{origin} has no chat template named 'default' (it has: {listed})")


def _config_special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """Named special tokens in a tokenizer config: strings or AddedToken dicts."""
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _tokenizer_special_tokens(tokenizer: Any) -> dict[str, str]:
    """A transformers tokenizer's named special tokens, as ``apply_chat_template`` passes them."""
    mapping = getattr(tokenizer, "special_tokens_map", None)
    if not isinstance(mapping, Mapping):
        mapping = {name: getattr(tokenizer, name, None) for name in SPECIAL_TOKEN_NAMES}
    return {
        str(name): str(value)
        for name, value in mapping.items()
        if value is not None and not isinstance(value, list | tuple | dict)
    }


def _plain(value: Any) -> Any:
    """A copy of ``value`` made only of JSON types, so templates never touch other objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (str enums, numpy-like scalars) lose their extra methods and reprs.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    raise ChatTemplateError(f"a {type(value).__name__} cannot be passed to the chat template")


def _plain_message(message: Any) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"a chat message must be an object, not {message!r}")
    return {str(key): _plain(value) for key, value in message.items() if value is not None}


def _mark_final_message(message: dict[str, Any]) -> str:
    """Append the continue tag to the message's (last text) content; return the text it had."""
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content + _CONTINUE_TAG
        return content
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                text: str = part["text"]
                part["text"] = text + _CONTINUE_TAG
                return text
    raise ChatTemplateError("the final assistant message has no text to continue")


def _cut_after_content(text: str, content: str) -> str:
    """``text`` up to the end of the continued message's content, where the tag was rendered."""
    at = text.rfind(_CONTINUE_TAG.rstrip())
    if at < 0 or content.strip() not in text[:at]:
        raise ChatTemplateError(
            "the chat template does not render the final assistant message's content as given, "
            "so it cannot be continued"
        )
    if text.startswith(_CONTINUE_TAG, at):
        return text[:at]
    # The template trimmed the content (and the tag's space): trim it the same way.
    return text[:at].rstrip()
