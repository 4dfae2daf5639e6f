import pytest

from router import protocol as P
from router.validation import InvalidRequest, validate_generate
from tests.router.helpers import model_info


def gen(prompt="hi", ids=None, **params):
    return P.Generate("r1", prompt, ids, params)


def check(msg, match, **kw):
    with pytest.raises(InvalidRequest, match=match):
        validate_generate(msg, model_info(**kw), 64)


def test_text_prompt_is_tokenized_with_bos_and_defaults_filled():
    spec = validate_generate(gen("hi"), model_info(), 64)
    assert spec.prompt_ids == [256, ord("h"), ord("i")]
    assert spec.sampling == {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None,
                             "stop_token_ids": [], "ignore_eos": False}
    assert spec.stop == () and spec.stream is True and spec.timeout_s is None


def test_token_prompt_stop_strings_and_clipping_to_max_model_len():
    spec = validate_generate(gen(None, [1, 2, 3], max_tokens=1000, stop=["ab", "ab", "c"],
                                 stop_token_ids=[5, 5, 7], temperature=0), model_info(), 64)
    assert spec.prompt_ids == [1, 2, 3]
    assert spec.max_tokens == 61 and spec.sampling["max_tokens"] == 61  # 64 - 3 prompt tokens
    assert spec.stop == ("ab", "c") and spec.sampling["stop_token_ids"] == [5, 7]
    assert spec.sampling["temperature"] == 0.0


@pytest.mark.parametrize("msg, match", [
    (gen(""), "prompt is empty"),
    (gen(None, []), "prompt_token_ids is empty"),
    (gen(None, None), "exactly one of prompt"),
    (P.Generate("r1", "x", [1], {}), "exactly one of prompt"),
    (gen("x" * 63), "prompt has 64 tokens but the max model length is 64"),
    (gen(None, list(range(64))), "prompt has 64 tokens"),
    (gen("x" * 5000), "5000 characters"),
    (gen(None, [1, 258]), r"prompt_token_ids\[1\] = 258 is not a token id"),
    (gen(None, [-1]), r"prompt_token_ids\[0\] = -1"),
    (gen(None, [1.5]), r"prompt_token_ids\[0\] = 1.5"),
    (gen(None, [True]), r"prompt_token_ids\[0\] = True"),
    (gen(max_tokens=0), "max_tokens must be a positive integer, got 0"),
    (gen(max_tokens=-3), "max_tokens must be a positive integer, got -3"),
    (gen(max_tokens=2.0), "max_tokens must be a positive integer"),
    (gen(temperature=-0.1), "temperature must be"),
    (gen(temperature=float("nan")), "temperature must be"),
    (gen(temperature="hot"), "temperature must be"),
    (gen(top_p=0), r"top_p must be a number in \(0, 1\]"),
    (gen(top_p=1.5), "top_p must be"),
    (gen(top_k=-1), "top_k must be an integer >= 0"),
    (gen(seed=-1), "seed must be null or an integer"),
    (gen(seed=2**63), "seed must be null"),
    (gen(ignore_eos=1), "ignore_eos must be true or false"),
    (gen(stop=""), "non-empty string"),
    (gen(stop=[1]), "non-empty string"),
    (gen(stop=["a"] * 17), "at most 16 strings"),
    (gen(stop_token_ids=[300]), "stop_token_ids contains 300"),
    (gen(stop_token_ids="1"), "stop_token_ids must be a list"),
    (gen(beam_width=2), "unknown parameter.*beam_width"),
    (P.Generate("r1", "x", None, [], True), "params must be a mapping"),
    (P.Generate("r1", "x", None, {}, "yes"), "stream must be true or false"),
    (P.Generate("r1", "x", None, {}, True, -1.0), "timeout_s must be"),
    (P.Generate("", "x", None, {}), "rid must be a non-empty string"),
])
def test_each_invalid_input_gets_a_clear_message(msg, match):
    check(msg, match)


def test_text_and_stop_strings_need_a_tokenizer():
    check(gen("hello"), "has no tokenizer; send prompt_token_ids", with_tokenizer=False)
    check(gen(None, [1], stop="x"), "no tokenizer, so stop strings", with_tokenizer=False)
    spec = validate_generate(gen(None, [1], stop_token_ids=[2]), model_info(with_tokenizer=False), 64)
    assert spec.prompt_ids == [1]


CHATML = ("{% for m in messages %}<s>{{ m['role'] }}:{{ m['content'] }}</s>{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def chat(messages, tmp_path, template=CHATML):
    """Validate a chat against the demo tokenizer, the model directory holding ``template``."""
    import json

    model = model_info()
    model.model_dir = str(tmp_path)
    if template is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return validate_generate(P.Generate("r1", None, None, {}, messages=messages), model, 64)


def test_chat_messages_are_rendered_with_the_template_and_keep_its_special_tokens(tmp_path):
    spec = chat([{"role": "user", "content": "hi"}], tmp_path)
    # the template's <s> and </s> are the special tokens 256/257; no extra bos is added
    assert spec.prompt_ids == [256, *b"user:hi", 257, 256, *b"assistant:"]
    # Text parts and a content-less message (tool calls only) reach the template as they are.
    template = ("{% for m in messages %}{% for p in m['content'] or [] %}{{ p['text'] }}"
                "{% endfor %}{% endfor %}")
    spec = chat([{"role": "user", "content": [{"type": "text", "text": "ab"}]},
                 {"role": "assistant", "tool_calls": []}], tmp_path, template)
    assert spec.prompt_ids == [*b"ab"]


@pytest.mark.parametrize("messages, template, match", [
    ([{"role": "user", "content": "hi"}], None, "has no chat template; send a prompt"),
    ([], CHATML, "messages must be a non-empty list"),
    ([{"content": "no role"}], CHATML, r"messages\[0\].role must be a string"),
    ([{"role": "user", "content": 5}], CHATML, r"messages\[0\].content must be a string or a list of text parts"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], CHATML,
     r"messages\[0\].content must be a string or a list of text parts"),
    ([{"role": "user", "content": "x" * 5000}], CHATML, "the chat has 50.. characters"),
    ([{"role": "user", "content": "x"}], "{{ raise_exception('only system roles') }}", "only system roles"),
    ([{"role": "user", "content": "x"}] * 4097, CHATML, "at most 4096 messages"),
    ([{"role": "user", "content": "x"}], "{% if %}", "unusable chat template"),
])
def test_bad_chats_are_refused_with_the_reason(messages, template, match, tmp_path):
    with pytest.raises(InvalidRequest, match=match):
        chat(messages, tmp_path, template)


def test_chat_and_prompt_are_exclusive():
    msg = P.Generate("r1", "hi", None, {}, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequest, match="exactly one of prompt"):
        validate_generate(msg, model_info(), 64)
