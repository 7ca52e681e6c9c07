"""The GGUF's chat template, rendered by the runtime's sandboxed renderer, equals transformers' output."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade_local.chat_template import ChatTemplate
from cascade_local.errors import TemplateError
from cascade_local.gguf_meta import read_metadata

SHARED_TEMPLATE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "nemotron-chat-template.jinja"


@pytest.fixture(scope="module")
def gguf_template(tiny_gguf) -> ChatTemplate:
    meta = read_metadata(tiny_gguf("q8_0"))
    return ChatTemplate(meta["tokenizer.chat_template"], bos_token="<s>", eos_token="<|im_end|>")


def test_golden_prompts_cover_the_cases(golden_prompts):
    names = {p["name"] for p in golden_prompts}
    assert {"thinking_on", "thinking_off", "system_multi_turn", "tools_call_and_response"} <= names


def test_every_golden_prompt_renders_byte_for_byte(gguf_template, golden_prompts):
    for case in golden_prompts:
        kwargs = dict(case["kwargs"])
        add_generation_prompt = kwargs.pop("add_generation_prompt")
        got = gguf_template.render(case["messages"], tools=case.get("tools"),
                                   add_generation_prompt=add_generation_prompt, **kwargs)
        assert got == case["expected"], case["name"]


def test_thinking_switch_changes_only_the_generation_prompt(gguf_template):
    messages = [{"role": "user", "content": "Hi"}]
    on = gguf_template.render(messages, enable_thinking=True)
    off = gguf_template.render(messages, enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    assert off.endswith("<|im_start|>assistant\n<think></think>")
    assert on.removesuffix("<think>\n") == off.removesuffix("<think></think>")


def test_packaged_template_is_the_published_one():
    if not SHARED_TEMPLATE.exists():
        pytest.skip("../shared/reference is not beside this checkout")
    from cascade_local.llama_model import default_template

    assert default_template() == SHARED_TEMPLATE.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__.__base__ }}",
        "{{ raise_exception.__globals__['os'].environ }}",
        "{% set ns = namespace() %}{{ ns.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_sandbox_blocks_python_internals(source):
    with pytest.raises(TemplateError, match=r"sandbox|failed"):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source", ["{% include '/etc/passwd' %}", "{% import 'os' as os %}{{ os }}"])
def test_templates_cannot_read_files(source):
    with pytest.raises(TemplateError):
        ChatTemplate(source).render([])


def test_template_errors_are_reported_not_raised_raw():
    with pytest.raises(TemplateError, match="no system role"):
        ChatTemplate("{{ raise_exception('no system role') }}").render([])
    with pytest.raises(TemplateError, match="syntax error"):
        ChatTemplate("{% if %}")
