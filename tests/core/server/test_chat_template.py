"""Chat templates: finding them in a model folder, and rendering them as transformers does."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from tgi_core.server.chat_template import ChatTemplate, ChatTemplateError

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

CHATML = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

ZEPHYR = """\
{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}
"""

ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('" + ALTERNATE + "') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

# The assistant's turns are wrapped in {% generation %} tags, as in templates made for training.
GENERATION = (
    "{% for message in messages %}<|{{ message.role }}|>\n"
    "{% if message.role == 'assistant' %}{% generation %}{{ message.content }}{{ eos_token }}"
    "{% endgeneration %}{% else %}{{ message.content }}{{ eos_token }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML, "zephyr": ZEPHYR, "generation": GENERATION}

CHATS = {
    "system-user": [
        {"role": "system", "content": "Réponds en français."},
        {"role": "user", "content": "Bonjour ! Ça va ?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "  4  "},
        {"role": "user", "content": "And 3+3? 🙂"},
    ],
}

CONTINUED = [
    {"role": "user", "content": "Write a haiku."},
    {"role": "assistant", "content": "Autumn moonlight -"},
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo d'une ville",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def reference(
    tokenizer: PreTrainedTokenizerFast, source: str, messages: list[dict[str, Any]], **kwargs: Any
) -> str:
    """What transformers renders for the same template and chat."""
    text = tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False, **kwargs)
    assert isinstance(text, str)
    return text


def template(source: str, **special_tokens: str) -> ChatTemplate:
    tokens = special_tokens or {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return ChatTemplate(source=source, origin="test", special_tokens=tokens)


def write_config(folder: Path, **config: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


# Finding the template


def test_string_template_in_tokenizer_config(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        chat_template=ZEPHYR,
        bos_token="<s>",
        eos_token={"content": "</s>", "lstrip": False, "special": True},
        pad_token=None,
    )
    found = ChatTemplate.load(tmp_path)
    assert found == ChatTemplate(
        source=ZEPHYR,
        origin="tokenizer_config.json",
        special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
    )


def test_named_templates_give_the_default_one(tmp_path: Path) -> None:
    named = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "plain"},
    ]
    write_config(tmp_path, chat_template=named)
    found = ChatTemplate.load(tmp_path)
    assert found is not None
    assert (found.source, found.origin) == ("plain", "tokenizer_config.json (template 'default')")


def test_named_templates_without_default_are_an_error(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "a"}, {"name": "rag", "template": "b"}]
    write_config(tmp_path, chat_template=named)
    with pytest.raises(
        ChatTemplateError, match=r"no chat template named 'default'.*'tool_use', 'rag'"
    ):
        ChatTemplate.load(tmp_path)


def test_chat_template_jinja_is_preferred_over_tokenizer_config(tmp_path: Path) -> None:
    write_config(tmp_path, chat_template="from config", eos_token="</s>")
    (tmp_path / "chat_template.jinja").write_text("from jinja file", encoding="utf-8")
    found = ChatTemplate.load(tmp_path)
    assert found == ChatTemplate(
        source="from jinja file",
        origin="chat_template.jinja",
        special_tokens={"eos_token": "</s>"},
    )


def test_tokenizer_config_path_overrides_the_model_folder(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_config(model, chat_template="model's", bos_token="<s>", eos_token="</s>")
    (model / "chat_template.jinja").write_text("model's jinja", encoding="utf-8")
    override = write_config(tmp_path / "elsewhere", chat_template="override", eos_token="<|end|>")
    found = ChatTemplate.load(model, str(override))
    assert found == ChatTemplate(
        source="override",
        origin=str(override),
        special_tokens={"bos_token": "<s>", "eos_token": "<|end|>"},
    )


def test_tokenizer_config_path_without_a_template_falls_back_to_the_model(tmp_path: Path) -> None:
    write_config(tmp_path / "model", chat_template="model's")
    override = write_config(tmp_path / "elsewhere", eos_token="<|end|>")
    found = ChatTemplate.load(tmp_path / "model", str(override))
    assert found is not None
    assert (found.source, found.special_tokens) == ("model's", {"eos_token": "<|end|>"})


@pytest.mark.parametrize("content", [None, "{not json"])
def test_unreadable_tokenizer_config_path_is_an_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "custom_config.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    write_config(tmp_path / "model", chat_template="model's")
    with pytest.raises(ChatTemplateError, match=r"custom_config\.json"):
        ChatTemplate.load(tmp_path / "model", str(path))


def test_no_template_is_none(tmp_path: Path) -> None:
    assert ChatTemplate.load(tmp_path) is None
    write_config(tmp_path, bos_token="<s>", chat_template=None)
    assert ChatTemplate.load(tmp_path) is None


def test_special_tokens_come_from_the_tokenizer_when_given(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    write_config(tmp_path, chat_template=ZEPHYR, eos_token="<not this one>")
    found = ChatTemplate.load(tmp_path, tokenizer=tokenizer)
    assert found is not None
    assert found.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


# Rendering, compared with transformers


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS.values(), ids=CHATS.keys())
@pytest.mark.parametrize("source", TEMPLATES.values(), ids=TEMPLATES.keys())
def test_render_matches_transformers(
    tokenizer: PreTrainedTokenizerFast,
    source: str,
    chat: list[dict[str, Any]],
    add_generation_prompt: bool,
) -> None:
    rendered = template(source).render(chat, add_generation_prompt=add_generation_prompt)
    expected = reference(tokenizer, source, chat, add_generation_prompt=add_generation_prompt)
    assert rendered == expected


def test_add_generation_prompt_on_and_off() -> None:
    chat = [{"role": "user", "content": "Hi"}]
    on = template(CHATML).render(chat, add_generation_prompt=True)
    off = template(CHATML).render(chat, add_generation_prompt=False)
    assert off == "<|im_start|>user\nHi<|im_end|>\n"
    assert on == off + "<|im_start|>assistant\n"


def test_llama3_prompt_text() -> None:
    rendered = template(LLAMA3, bos_token="<|begin_of_text|>").render(
        [{"role": "user", "content": " Hi "}]
    )
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_tools_match_transformers_and_keep_non_ascii(tokenizer: PreTrainedTokenizerFast) -> None:
    chat = [{"role": "user", "content": "Quel temps fait-il à Paris ?"}]
    rendered = template(CHATML).render(chat, tools=TOOLS)
    assert rendered == reference(tokenizer, CHATML, chat, tools=TOOLS, add_generation_prompt=True)
    assert '"description": "Météo d\'une ville"' in rendered


def test_tools_are_none_when_not_given_as_in_transformers(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    source = "{{ tools is defined }} {{ tools is none }}"
    chat = [{"role": "user", "content": "Hi"}]
    assert template(source).render(chat) == reference(tokenizer, source, chat) == "True True"


@pytest.mark.parametrize(
    "source", [CHATML, LLAMA3, ZEPHYR, MISTRAL], ids=["chatml", "llama3", "zephyr", "mistral"]
)
def test_continue_final_assistant_message_matches_transformers(
    tokenizer: PreTrainedTokenizerFast, source: str
) -> None:
    rendered = template(source).render(CONTINUED, add_generation_prompt=True)
    expected = reference(tokenizer, source, CONTINUED, continue_final_message=True)
    assert rendered == expected
    assert rendered.endswith("Autumn moonlight -")


def test_continue_cuts_right_after_the_content() -> None:
    rendered = template(ZEPHYR).render(CONTINUED)
    assert rendered == "<|user|>\nWrite a haiku.</s>\n<|assistant|>\nAutumn moonlight -"


def test_continue_keeps_trailing_space_when_the_template_does() -> None:
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, "}]
    assert template(CHATML).render(chat).endswith("<|im_start|>assistant\nWell, ")
    # Llama 3's template trims the content, so the prompt is trimmed the same way.
    assert template(LLAMA3).render(chat).endswith("<|end_header_id|>\n\nWell,")


def test_continue_content_parts_and_leaves_the_caller_messages_alone() -> None:
    source = (
        "{% for m in messages %}[{{ m.role }}]"
        "{% for part in m.content %}{{ part.text }}{% endfor %}[end]{% endfor %}"
    )
    chat = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hel"}]},
    ]
    assert template(source).render(chat) == "[user]Hi[end][assistant]Hel"
    assert chat[1] == {"role": "assistant", "content": [{"type": "text", "text": "Hel"}]}


def test_continue_fails_when_the_template_drops_the_content() -> None:
    source = "{% for m in messages %}<{{ m.role }}>{% endfor %}"
    with pytest.raises(ChatTemplateError, match="cannot be continued"):
        template(source).render(CONTINUED)


def test_continue_needs_text() -> None:
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]
    with pytest.raises(ChatTemplateError, match="no text to continue"):
        template(CHATML).render(chat)


def test_none_values_are_dropped_from_messages(tokenizer: PreTrainedTokenizerFast) -> None:
    source = "{% for m in messages %}{{ m.role }}:{{ 'tool_calls' in m }};{% endfor %}"
    chat = [{"role": "user", "content": "Hi", "tool_calls": None}]
    assert template(source).render(chat) == reference(tokenizer, source, chat) == "user:False;"


def test_extra_variables_override_special_tokens_only() -> None:
    source = (
        "{{ eos_token }}|{{ enable_thinking }}|{{ messages | length }}|{{ add_generation_prompt }}"
    )
    extra = {
        "eos_token": "<eot>",
        "enable_thinking": False,
        "messages": [],
        "add_generation_prompt": 7,
    }
    chat = [{"role": "user", "content": "Hi"}]
    assert template(source).render(chat, extra=extra) == "<eot>|False|1|True"


# Template helpers and errors


def test_raise_exception_message_reaches_the_user() -> None:
    chat = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError) as excinfo:
        template(MISTRAL).render(chat)
    assert str(excinfo.value) == ALTERNATE


def test_strftime_now() -> None:
    source = "Today is {{ strftime_now('%Y-%m-%d') }}."
    before = datetime.now().strftime("%Y-%m-%d")
    rendered = template(source).render([{"role": "user", "content": "Hi"}])
    after = datetime.now().strftime("%Y-%m-%d")
    assert rendered in (f"Today is {before}.", f"Today is {after}.")


def test_generation_tags_render_their_body() -> None:
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = template(GENERATION).render(chat, add_generation_prompt=False)
    assert rendered == "<|user|>\nHi</s><|assistant|>\nHello</s><|user|>\nBye</s>"


def test_loop_controls() -> None:
    source = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    chat = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert template(source).render(chat) == "a"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ messages.append('x') }}",
        "{{ messages[0].update({'role': 'system'}) }}",
    ],
)
def test_sandbox_blocks_unsafe_access(source: str) -> None:
    with pytest.raises(ChatTemplateError, match=r"^the chat template failed: .*unsafe"):
        template(source).render([{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize(
    ("source", "detail"),
    [
        ("{% for m in messages %}", "syntax error on line 1"),
        ("{{ messages[0].missing.deeper }}", "has no attribute 'missing'"),
        ("{{ 1 / 0 }}", "division by zero"),
    ],
)
def test_template_failures_are_chat_template_errors(source: str, detail: str) -> None:
    with pytest.raises(ChatTemplateError, match=r"^the chat template failed: ") as excinfo:
        template(source).render([{"role": "user", "content": "Hi"}])
    assert detail in str(excinfo.value)


def test_tojson_keeps_non_ascii_and_takes_options() -> None:
    source = "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=1, sort_keys=true) }}"
    rendered = template(source).render([{"role": "user", "content": "héllo 世界 <b>"}])
    assert rendered == (
        '{"role": "user", "content": "héllo 世界 <b>"}|'
        '{\n "content": "héllo 世界 <b>",\n "role": "user"\n}'
    )


def test_empty_chat_is_an_error() -> None:
    with pytest.raises(ChatTemplateError, match="no messages"):
        template(CHATML).render([])


def test_template_is_compiled_once() -> None:
    chat_template = template(CHATML)
    chat_template.render([{"role": "user", "content": "Hi"}])
    compiled = chat_template._compiled
    chat_template.render([{"role": "user", "content": "Hi again"}])
    assert chat_template._compiled is compiled
