"""Renders a model's chat template exactly as transformers' `apply_chat_template` does, in a sandbox.

Chat templates arrive inside downloaded files, so they are untrusted code: they run in Jinja's
immutable sandbox, without a loader (no `include`/`import` of files), with the environment's
globals limited to what transformers provides. Any escape attempt, and any rendering failure,
becomes a TemplateError with the template's own message.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cascade_local.errors import TemplateError

Message = dict[str, Any]


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' override: Jinja's own tojson escapes HTML characters, which templates never want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], loader=None
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from None


class ChatTemplate:
    """A compiled template plus the special-token strings it may refer to."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.special = {"bos_token": bos_token, "eos_token": eos_token}
        self._template = _compile(source)

    def render(
        self,
        messages: list[Message],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text. Extra keyword arguments (enable_thinking=...) reach the template as variables."""
        context = {**self.special, **kwargs, "messages": messages, "add_generation_prompt": add_generation_prompt}
        if tools is not None:
            context["tools"] = tools
        try:
            return self._template.render(**context)
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"chat template tried something the sandbox forbids: {exc}") from None
        except jinja2.exceptions.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from None
        except Exception as exc:  # a template can raise anything Python can (e.g. TypeError on bad data)
            raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None
