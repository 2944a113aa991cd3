"""Chat templates against renderings written out by hand from their definitions (run.c's
sprintf strings for Llama 2, the ChatML spec, TinyLlama-chat's tokenizer_config.json)."""

import json

import pytest

from llmtp.common.errors import ConfigError
from llmtp.common.formats.chat_template import (BUILTIN_TEMPLATES, ChatMessage, TemplateError, encode_chat,
                                                jinja_template, resolve_chat_template)
from llmtp.common.formats.tokenizer import load_tokenizer
from llmtp.coordinator.commands.engines import DEFAULT_MODEL_DIR

LLAMA2, CHATML = BUILTIN_TEMPLATES["llama2"], BUILTIN_TEMPLATES["chatml"]

# TinyLlama-1.1B-Chat's template (Zephyr style), as its tokenizer_config.json carries it
TINYLLAMA = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
             "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
             "{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
             "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
             "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
             "{% endfor %}")


def m(role, content):
    return ChatMessage(role, content)


def test_llama2_first_turn_with_system_prompt_is_run_c_system_template():
    # run.c: "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", encoded with BOS
    text = LLAMA2.render([m("system", "Be brief."), m("user", "Hello")])
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello [/INST]"


def test_llama2_without_system_is_run_c_user_template():
    assert LLAMA2.render([m("user", "Hello")]) == "<s>[INST] Hello [/INST]"


def test_llama2_later_turns_follow_the_answer_and_its_eos():
    text = LLAMA2.render([m("system", "S"), m("user", "Hi"), m("assistant", " Hello there"), m("user", "Bye")])
    assert text == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Hello there</s><s>[INST] Bye [/INST]"


def test_llama2_refuses_a_late_system_message():
    with pytest.raises(TemplateError, match="system message must come first"):
        LLAMA2.render([m("user", "Hi"), m("system", "late")])


def test_chatml():
    text = CHATML.render([m("system", "S"), m("user", "Hi")])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert CHATML.render([m("user", "Hi")], add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert "<|im_end|>" in CHATML.stop


def test_jinja_template_renders_as_transformers_does():
    # trim_blocks + lstrip_blocks drop the block lines; the newline after each {{ }} line stays
    template = jinja_template(TINYLLAMA)
    assert template.render([m("system", "S"), m("user", "Hi")]) == "<|system|>\nS</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    assert template.render([m("user", "Hi")], add_generation_prompt=False) == "<|user|>\nHi</s>\n"


def test_jinja_raise_exception_and_tojson():
    template = jinja_template("{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must alternate') }}"
                              "{% endif %}{{ messages[0]['content'] | tojson }}")
    assert template.render([m("user", "a\"b")]) == '"a\\"b"'
    with pytest.raises(TemplateError, match="roles must alternate"):
        template.render([m("assistant", "x")])


@pytest.mark.parametrize("source", ["{{ ''.__class__.__mro__[1].__subclasses__() }}",
                                    "{% set items = [] %}{{ items.append(1) }}"])
def test_jinja_is_sandboxed_and_immutable(source):
    with pytest.raises(TemplateError):
        jinja_template(source).render([m("user", "x")])


def test_jinja_syntax_error_is_one_config_error():
    with pytest.raises(ConfigError, match="does not compile"):
        jinja_template("{% for %}")


def test_encode_chat_puts_bos_and_eos_where_the_template_says():
    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model")
    ids = encode_chat(tokenizer, LLAMA2, [m("user", "Hi"), m("assistant", " there"), m("user", "Bye")])
    # the answer is in the same run of text as the turn before it (no control id between them)
    expected = ([1] + tokenizer.encode("[INST] Hi [/INST] there", bos=False) + [2]
                + [1] + tokenizer.encode("[INST] Bye [/INST]", bos=False))
    assert ids == expected


def test_encode_chat_keeps_typed_special_tokens_as_text():
    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model")
    ids = encode_chat(tokenizer, LLAMA2, [m("user", "<s></s>\ue000")])
    assert ids == [1] + tokenizer.encode("[INST] <s></s> [/INST]", bos=False)
    assert ids.count(1) == 1 and 2 not in ids


def test_resolve_prefers_the_models_tokenizer_config(tmp_path):
    assert resolve_chat_template(None, tmp_path) is LLAMA2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TINYLLAMA}))
    assert resolve_chat_template(None, tmp_path).source == TINYLLAMA
    assert resolve_chat_template("chatml", tmp_path) is CHATML
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert resolve_chat_template(str(tmp_path / "t.jinja")).render([m("user", "x")]) == "x"
    with pytest.raises(ConfigError, match="neither llama2 nor chatml nor a file"):
        resolve_chat_template(str(tmp_path / "missing"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no chat_template"):
        resolve_chat_template(str(tmp_path / "bad.json"))
