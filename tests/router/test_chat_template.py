"""router/chat_template.py renders like transformers' apply_chat_template(tokenize=False)."""
from __future__ import annotations

import json

import pytest

from router.chat_template import ChatTemplate, ChatTemplateError

# SmolLM2-Instruct's template (ChatML with a default system prompt).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")

# Llama-3.1-style: bos_token, trimming, tools as JSON, namespace, raise_exception, strftime_now.
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%Y") + "\\n\\n" }}
{%- if tools is not none %}
    {{- tools | tojson(indent=4) + "\\n\\n" }}
{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- if message['role'] == 'assistant' %}{% generation %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endgeneration %}{% else %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
{{- '' if ns.turns else raise_exception('no turns') }}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi <there> & \"you\""}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4", "tool_calls": None}, {"role": "user", "content": "é ü"}],
]


def _model_dir(tmp_path, template, **config):
    from models.demo import build_tokenizer

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tokenizer.json").write_text(build_tokenizer().to_str(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False,
                      "normalized": False, "rstrip": False, "single_word": False, "special": True}, "chat_template": template,
        **config}))
    return tmp_path


@pytest.mark.parametrize("source", [CHATML, LLAMA3], ids=["chatml", "llama3"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(tmp_path, source, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    model_dir = _model_dir(tmp_path, source)
    reference = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    template = ChatTemplate.from_model_dir(model_dir)
    tools = [{"type": "function", "function": {"name": "f<x>", "description": "naïve"}}]
    for messages in CONVERSATIONS:
        for kwargs in ({}, {"tools": tools}):
            expected = reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
            got = template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
            assert got == expected


def test_search_order_and_named_templates(tmp_path):
    assert ChatTemplate.from_model_dir(_model_dir(tmp_path / "none", None)) is None
    model_dir = _model_dir(tmp_path, [{"name": "tool_use", "template": "T"},
                                      {"name": "default", "template": "D{{ eos_token }}"}])
    messages = [{"role": "user", "content": "x"}]
    assert ChatTemplate.from_model_dir(model_dir).render(messages) == "D<|im_end|>"
    (model_dir / "chat_template.jinja").write_text("J{{ bos_token }}")
    assert ChatTemplate.from_model_dir(model_dir).render(messages) == "J<|begin_of_text|>"
    override = tmp_path / "override.jinja"
    override.write_text("{{ messages[0].content }}{{ add_generation_prompt }}")
    assert ChatTemplate.from_model_dir(model_dir, override).render(messages) == "xTrue"
    no_default = _model_dir(tmp_path / "nd", [{"name": "tool_use", "template": "T"}])
    with pytest.raises(ChatTemplateError, match="default"):
        ChatTemplate.from_model_dir(no_default)


def test_errors_are_clear(tmp_path):
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate.from_string("{% for %}")
    template = ChatTemplate.from_string(LLAMA3, bos_token="<s>")
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        template.render([{"role": "tool", "content": "x"}])
    for bad in ([], "hi", [{"content": "no role"}], [["user", "x"]]):
        with pytest.raises(ChatTemplateError, match="messages"):
            template.render(bad)
    with pytest.raises(ChatTemplateError, match="chat template"):
        ChatTemplate.from_string("{{ messages[0].content + 1 }}").render(
            [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="cannot read"):
        ChatTemplate.from_model_dir(tmp_path, tmp_path / "missing.jinja")


def test_sandbox_blocks_escapes():
    escape = ChatTemplate.from_string("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        escape.render([{"role": "user", "content": "x"}])
    mutate = ChatTemplate.from_string("{{ messages.append(1) }}")
    with pytest.raises(ChatTemplateError):
        mutate.render([{"role": "user", "content": "x"}])
    namespace = ChatTemplate.from_string("{% set ns = namespace(_x=1) %}")
    with pytest.raises(ChatTemplateError):
        namespace.render([{"role": "user", "content": "x"}])
