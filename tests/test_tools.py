"""Tool-integrated reasoning: the call parser, a real Python kernel, and the loop on the tiny model."""

from __future__ import annotations

import os
import time

import psutil
import pytest

from cascade_local.engine import Engine
from cascade_local.errors import UsageError
from cascade_local.llama_model import LoadedModel
from cascade_local.sampling import SamplingParams
from cascade_local.testing.scripted import ScriptedSampler
from cascade_local.tools import (
    DECLINED,
    PYTHON_TOOL_NAME,
    PythonTool,
    Text,
    ToolCall,
    ToolCallError,
    ToolCallParser,
    ToolLoop,
    parse_call,
)

pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

from cascade_local.tools.python_kernel import PythonKernel

GREEDY = SamplingParams(temperature=0.0)
IM_END, TOOL_CALL, TOOL_CALL_END = 11, 14, 15
TOOLS = {PYTHON_TOOL_NAME: ["code"]}
CALL = (f"<tool_call>\n<function={PYTHON_TOOL_NAME}>\n<parameter=code>\nprint(6*7)\n</parameter>\n</function>\n"
        "</tool_call>")


# -- the parser ----------------------------------------------------------------------------------------


def parse_chunks(chunks: list[str]) -> list:
    parser = ToolCallParser(TOOLS)
    out = [item for chunk in chunks for item in parser.feed(chunk)] + parser.flush()
    merged: list = []  # adjacent Text pieces joined, so splits do not matter
    for item in out:
        if isinstance(item, Text) and merged and isinstance(merged[-1], Text):
            merged[-1] = Text(merged[-1].text + item.text)
        else:
            merged.append(item)
    return merged


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_parser_finds_a_call_however_the_text_is_split(size):
    text = f"Let me compute. {CALL} done <tool"
    items = parse_chunks([text[i : i + size] for i in range(0, len(text), size)])
    assert items == [Text("Let me compute. "), ToolCall(PYTHON_TOOL_NAME, {"code": "print(6*7)"}, CALL),
                     Text(" done <tool")]


def test_parser_keeps_multiline_code_and_angle_brackets():
    code = "x = [1, 2]\nif x[0] < 2 and 3 > 1:\n    print('<b>')\n"
    call = parse_call(f"\n<function={PYTHON_TOOL_NAME}>\n<parameter=code>\n{code}\n</parameter>\n</function>\n", TOOLS)
    assert isinstance(call, ToolCall) and call.arguments == {"code": code}


@pytest.mark.parametrize(("body", "said"), [
    ("just some text", "malformed tool call"),
    ("<function=>\n</function>", "function name is empty"),
    ("<function=run_shell>\n<parameter=cmd>\nls\n</parameter>\n</function>", "unknown function 'run_shell'"),
    (f"<function={PYTHON_TOOL_NAME}>\n</function>", "missing required parameter(s): code"),
])
def test_malformed_calls_become_errors_the_model_can_read(body, said):
    [item] = parse_chunks([f"<tool_call>{body}</tool_call>"])
    assert isinstance(item, ToolCallError)
    assert said in item.message and item.message.startswith("Error:")


def test_parser_is_lenient_about_a_missing_closing_parameter_tag():
    [item] = parse_chunks([f"<tool_call>\n<function={PYTHON_TOOL_NAME}>\n<parameter=code>\n1+1\n</function>\n"
                           "</tool_call>"])
    assert item == ToolCall(PYTHON_TOOL_NAME, {"code": "1+1"}, item.raw)


def test_an_unfinished_call_at_the_end_is_plain_text():
    assert parse_chunks(["a <tool_call>\n<function=x>"]) == [Text("a <tool_call>\n<function=x>")]


# -- the kernel ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel():
    os.environ["CASCADE_SECRET_TEST"] = "1"  # set before the kernel starts: it must not see it
    try:
        with PythonKernel(timeout=2, output_limit=200) as k:
            yield k
    finally:
        del os.environ["CASCADE_SECRET_TEST"]


def test_kernel_executes_and_keeps_state(kernel):
    assert kernel.execute("x = 6 * 7\nx").output == "42"
    assert kernel.execute("import sys\nprint(x + 1)\nprint('oops', file=sys.stderr)").output == "43\noops"


def test_kernel_reports_an_exception_and_survives_it(kernel):
    run = kernel.execute("y = 1\n1 / 0")
    assert run.error and "ZeroDivisionError" in run.output and "\x1b[" not in run.output
    assert kernel.execute("print(y)").output == "1"


def test_kernel_times_out_an_infinite_loop_and_stays_usable(kernel):
    kernel.execute("z = 'kept'")
    started = time.monotonic()
    run = kernel.execute("while True: pass")
    assert run.timed_out and not run.restarted and "timed out after 2 seconds" in run.output
    assert time.monotonic() - started < 10
    assert kernel.execute("print(z)").output == "kept"


def test_kernel_output_is_truncated(kernel):
    run = kernel.execute("print('a' * 1000)")
    assert run.truncated and run.output.startswith("a" * 200) and "[output truncated: 800 more" in run.output


def test_kernel_environment_is_scrubbed_and_its_cwd_is_a_temp_dir(kernel):
    out = kernel.execute("import os\nprint('CASCADE_SECRET_TEST' in os.environ, "
                         "[n for n in os.environ if 'TOKEN' in n or 'KEY' in n or 'SECRET' in n])\n"
                         "print(os.getcwd())").output.splitlines()
    assert out[0] == "False []"
    assert os.path.realpath(out[1]) == os.path.realpath(kernel.workdir)
    assert os.path.basename(out[1]).startswith("cascade-python-") and out[1] != os.getcwd()


def test_kernel_runs_under_resource_limits(kernel):
    out = kernel.execute("import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0], "
                         "resource.getrlimit(resource.RLIMIT_CPU)[0])").output
    assert out.split() == [str(kernel.memory_bytes), str(kernel.cpu_seconds)]


def test_a_dead_kernel_is_replaced_and_closing_leaves_no_process_and_no_directory():
    k = PythonKernel()
    first = k.pid
    run = k.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")  # as the CPU limit would
    assert run.restarted and "every variable and import is lost" in run.output
    assert k.execute("print('alive')").output == "alive" and k.pid != first
    pid, workdir = k.pid, k.workdir
    assert pid and psutil.pid_exists(pid)
    k.close()
    deadline = time.monotonic() + 5
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(pid)
    assert not os.path.exists(workdir)


# -- the loop ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_gguf) -> LoadedModel:
    return LoadedModel(tiny_gguf("q8_0"))


class Recording:
    """The engine, with every prompt it was asked to continue written down."""

    def __init__(self, engine: Engine):
        self.engine, self.model, self.prompts = engine, engine.model, []

    def stream(self, request):
        self.prompts.append(b"".join(self.model.piece(t) for t in request.prompt_tokens).decode())
        return self.engine.stream(request)


def scripted_engine(model: LoadedModel, scripts: list[list[int]]) -> Recording:
    rounds = iter(scripts)
    return Recording(Engine(model, n_ctx=1024, threads=2,
                            sampler_factory=lambda params: ScriptedSampler(next(rounds), then=IM_END)))


def test_call_tokens_are_the_special_tags(model):
    tokens = model.tokenize(CALL)
    assert tokens[0] == TOOL_CALL and tokens[-1] == TOOL_CALL_END


def test_loop_runs_the_call_and_feeds_the_result_back(model):
    engine = scripted_engine(model, [model.tokenize(CALL), [*model.tokenize("42"), IM_END]])
    messages = [{"role": "user", "content": "What is 6*7?"}]
    with ToolLoop(engine, [PythonTool()], thinking=False, yes=True, max_tokens=200) as loop:
        events = list(loop.stream(messages))
    answer = events[-1].answer
    assert [e.kind for e in events if e.kind in ("tool_call", "tool_result")] == ["tool_call", "tool_result"]
    assert [e.text for e in events if e.kind == "tool_call"] == ["print(6*7)"]
    assert [e.text for e in events if e.kind == "tool_result"] == ["42"]
    assert len(engine.prompts) == 2
    assert "stateful_python_code_exec" in engine.prompts[0]
    assert "<tool_response>\n42\n</tool_response>" in engine.prompts[1]
    assert "<tool_call>\n<function=stateful_python_code_exec>\n<parameter=code>\nprint(6*7)" in engine.prompts[1]
    assert answer.content == "42" and answer.finish_reason == "stop"
    assert [(c.name, c.code, c.output, c.status) for c in answer.calls] == [
        (PYTHON_TOOL_NAME, "print(6*7)", "42", "ok")]
    assert answer.to_dict()["tool_calls"][0]["output"] == "42"
    assert len(messages) == 1  # the caller's list is left alone
    assert not any("<tool_call>" in e.text for e in events if e.kind in ("reasoning", "content"))


def test_a_declined_call_tells_the_model_so(model):
    engine = scripted_engine(model, [model.tokenize(CALL), [*model.tokenize("ok"), IM_END]])
    asked: list[ToolCall] = []
    tool = PythonTool()
    loop = ToolLoop(engine, [tool], thinking=False, confirm=lambda call: asked.append(call) or False)
    answer = loop.run([{"role": "user", "content": "hi"}])
    loop.close()
    assert [c.arguments["code"] for c in asked] == ["print(6*7)"]
    assert answer.calls[0].status == "declined" and tool.kernel is None  # no kernel started for nothing
    assert f"<tool_response>\n{DECLINED}\n</tool_response>" in engine.prompts[1]


def test_an_unknown_function_is_answered_with_an_error(model):
    bad = CALL.replace(PYTHON_TOOL_NAME, "run_shell")
    engine = scripted_engine(model, [model.tokenize(bad), [*model.tokenize("sorry"), IM_END]])
    answer = ToolLoop(engine, [PythonTool()], thinking=True, yes=True).run([{"role": "user", "content": "hi"}])
    assert answer.calls[0].status == "invalid" and answer.calls[0].in_reasoning
    assert "<tool_response>\nError: unknown function 'run_shell'" in engine.prompts[1]


def test_the_loop_needs_a_confirmation_or_yes(model):
    with pytest.raises(UsageError, match="yes=True"):
        ToolLoop(scripted_engine(model, []), [PythonTool()])


def test_the_loop_on_the_real_model_completes_cleanly(model):
    engine = Engine(model, n_ctx=1024, threads=2)
    with ToolLoop(engine, [PythonTool()], thinking=True, sampling=GREEDY, max_tokens=24, yes=True) as loop:
        events = list(loop.stream([{"role": "user", "content": "What is 2+2?"}]))
    answer = events[-1].answer
    assert events[-1].kind == "done" and answer.calls == []
    assert answer.finish_reason in ("stop", "length") and answer.completion_tokens > 0


# -- the command ---------------------------------------------------------------------------------------


def test_run_with_tools_refuses_without_yes(tiny_gguf):
    from conftest import run_cli

    done = run_cli("run", str(tiny_gguf("q8_0")), "hi", "--tools", "python")
    assert done.returncode == 1 and done.stdout == ""
    assert "add --yes" in done.stderr


def test_run_with_tools_and_yes_answers_in_json(tiny_gguf):
    import json

    from conftest import run_cli

    done = run_cli("run", str(tiny_gguf("q8_0")), "hi", "--tools", "python", "--yes", "--json", "--max-tokens", "8",
                   "--threads", "2")
    assert done.returncode == 3, done.stderr  # all 8 tokens spent reasoning: no answer, said on stderr
    assert "stopped after 8 tokens while reasoning" in done.stderr
    out = json.loads(done.stdout)
    assert out["tool_calls"] == [] and out["usage"]["completion_tokens"] == 8 and out["finish_reason"] == "length"


def test_ctrl_c_while_waiting_interrupts_the_kernel_too():
    """KeyboardInterrupt in the waiting process must stop the code in the kernel, and the state survives."""
    import signal
    import threading

    from cascade_local.tools.python_kernel import PythonKernel

    with PythonKernel(timeout=30) as kernel:
        kernel.execute("x = 5")
        timer = threading.Timer(1.0, lambda: signal.raise_signal(signal.SIGINT))
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            kernel.execute("import time\nwhile True: time.sleep(0.01)")
        assert time.monotonic() - started < 10
        assert "5" in kernel.execute("print(x)").output  # the kernel is free again, state kept
