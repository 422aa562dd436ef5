"""Chat messages to a prompt, through the model's chat template.

Shared by ``/v1/chat/completions`` and ``/chat_tokenize``. Text content parts are
joined into one string, which is what text-only chat templates expect; image parts get
a clear 422 (no plugin serves a vision model yet).
"""

from __future__ import annotations

from typing import Any

import msgspec

from tgi_core.server.errors import template_error, validation_error
from tgi_core.server.state import ServerState


class ChatMessage(msgspec.Struct, kw_only=True):
    """One message of OpenAI's ``messages`` list."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


def _text(content: str | list[dict[str, Any]] | None, position: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_audio", "file"):
            raise validation_error(
                f"`messages[{position}].content`: {kind} parts are not supported; "
                "the model served takes text only",
                f"messages[{position}].content",
            )
        else:
            raise validation_error(
                f'`messages[{position}].content` parts must be {{"type": "text", "text": "..."}}',
                f"messages[{position}].content",
            )
    return "".join(texts)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """``messages`` as the plain dicts a chat template reads."""
    if not messages:
        raise validation_error("`messages` cannot be empty", "messages")
    result = []
    for position, message in enumerate(messages):
        if message.content is None and not message.tool_calls:
            raise validation_error(
                f"`messages[{position}].content` is required", f"messages[{position}].content"
            )
        item: dict[str, Any] = {"role": message.role, "content": _text(message.content, position)}
        if message.name is not None:
            item["name"] = message.name
        if message.tool_calls is not None:
            item["tool_calls"] = message.tool_calls
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        result.append(item)
    return result


def render_prompt(
    state: ServerState,
    messages: list[ChatMessage],
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text; a missing or failing template is a 422 ``template_error``."""
    from tgi_core.server.chat_template import ChatTemplateError

    dicts = message_dicts(messages)
    if state.chat_template is None:
        raise template_error(
            "template not found: the model has no chat template (add `chat_template` to "
            "tokenizer_config.json, a chat_template.jinja file, or pass "
            "--tokenizer-config-path)"
        )
    try:
        return state.chat_template.render(dicts, add_generation_prompt=True, tools=tools)
    except ChatTemplateError as exc:
        raise template_error(str(exc)) from None
