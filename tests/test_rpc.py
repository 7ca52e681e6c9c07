"""A real second ggml device in every test run: llama.cpp's RPC backend, served on loopback by
`cascade-local rpc-server` in a child process. The placement paths (experts on the device, the whole model on it,
several sequences in one batch) must give exactly what a CPU-only run gives, and llama.cpp's own log must show the
tensors where the planner said they would go.

Only a build without the RPC backend skips these tests; `make` always builds it in.
"""

from __future__ import annotations

import json
import re
import signal
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI, run_cli

from cascade_local.devices import plan_overrides, tensor_buft_overrides
from cascade_local.engine import Engine, PromptCache, Request
from cascade_local.errors import ModelLoadError
from cascade_local.llama_log import RECENT, quiet_llama
from cascade_local.llama_model import LoadedModel
from cascade_local.logits import sequence_logits
from cascade_local.placement import CPU, EXPERT_REGEX, GPU, MiB
from cascade_local.rpc import RpcError, connect, free_port, hello, parse_endpoints, rpc_supported
from cascade_local.runtime import PlacementOptions, open_engine, plan_for
from cascade_local.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [[1, 10, 20, 31, 45, 300, 17, 99, 5, 11], [1, 10, 700, 12, 33, 64, 128, 250, 9]]
TINY_LAYERS = 5  # blk.0-4; experts in layers 1 and 4

pytestmark = pytest.mark.skipif(not rpc_supported(), reason="this llama-cpp-python build has no RPC backend "
                                "(`make` builds it with -DGGML_RPC=ON)")


def start_server(port: int, *extra: str) -> subprocess.Popen:
    """`cascade-local rpc-server` on 127.0.0.1:port, returned once it answers the protocol's HELLO."""
    # One server thread: on 2 cores, server and client threads that outnumber the cores spin against each other.
    proc = subprocess.Popen([*CLI, "rpc-server", "--port", str(port), "--threads", "1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            hello(f"127.0.0.1:{port}", timeout=2)
            return proc
        except RpcError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"rpc-server did not start: {proc.communicate()[1]}") from None
            time.sleep(0.2)


@pytest.fixture(scope="session")
def rpc_endpoint() -> Iterator[str]:
    """A live RPC server on a free loopback port for the whole session (the test process's second device)."""
    port = free_port()
    proc = start_server(port)
    yield f"127.0.0.1:{port}"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def rpc_device(rpc_endpoint):
    (device,) = connect([rpc_endpoint])
    return device


def fresh_log() -> None:
    """Empties the ring of llama.cpp's recent log lines, so what follows is one load's (it keeps 400)."""
    quiet_llama()
    RECENT.clear()


def overridden(lines: list[str], device: str) -> list[str]:
    """Tensor names llama.cpp logged as 'tensor X (...) buffer type overridden to DEVICE'."""
    return sorted(line.split()[1] for line in lines if "buffer type overridden to " + device in line)


def buffer_mib(lines: list[str], what: str, device: str = "RPC0[") -> float:
    """The size llama.cpp logged for a buffer on a device ('RPC0[127.0.0.1:N] model buffer size =  1.23 MiB').

    A buffer type is named after the device's index on its server, so each server's is RPC0[ENDPOINT].
    """
    found = [re.search(r"= +([\d.]+) MiB", line) for line in lines if device in line and what in line]
    assert found and found[-1], f"no '{device} {what}' line in llama.cpp's log"
    return float(found[-1].group(1))


def cpu_logits(path: Path) -> list[np.ndarray]:
    with LoadedModel(path) as model:
        return list(sequence_logits(model, PROMPTS, threads=2))


# -- the server and the client's checks ---------------------------------------------------------------------------


def test_the_device_is_the_servers(rpc_device, rpc_endpoint):
    assert rpc_device.name.startswith("RPC") and rpc_device.endpoint == rpc_endpoint
    from cascade_local.devices import buffer_type_name

    assert buffer_type_name(rpc_device.buffer_type) == f"{rpc_device.name}[{rpc_endpoint}]"
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert rpc_device.total == int(meminfo["MemTotal"].split()[0]) * 1024  # the server host's RAM
    assert 0 < rpc_device.free <= rpc_device.total


def test_endpoints_are_parsed_like_llama_cpp():
    assert parse_endpoints("127.0.0.1:50052,gpu-box:50053") == ["127.0.0.1:50052", "gpu-box:50053"]
    for bad in ("127.0.0.1", "host:0", "host:70000", "a b:1", ""):
        with pytest.raises(Exception, match="HOST:PORT"):
            parse_endpoints(bad)


def test_an_unreachable_server_is_an_error_not_an_abort():
    port = free_port()
    with pytest.raises(RpcError, match=f"cannot reach the RPC server at 127.0.0.1:{port}"):
        connect([f"127.0.0.1:{port}"])


class _Banner(socketserver.BaseRequestHandler):
    """Talks first, like an SSH server: what `--rpc` pointed at the wrong port meets."""

    def handle(self) -> None:
        self.request.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        self.request.recv(64)


def test_a_server_of_another_protocol_is_refused():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Banner)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RpcError, match=r"is not a llama\.cpp RPC server"):
            connect([f"127.0.0.1:{server.server_address[1]}"], timeout=5)
    finally:
        server.shutdown()
        server.server_close()


def test_a_busy_server_is_named_busy_not_waited_for(tiny_gguf, rpc_device, rpc_endpoint):
    """A server serves one client at a time; ggml's add_server would wait for it without end."""
    overrides = tensor_buft_overrides([(EXPERT_REGEX, GPU)], 0, [rpc_device.handle])
    with LoadedModel(tiny_gguf("q8_0"), overrides=overrides):  # its buffers hold the server's one connection
        started = time.monotonic()
        with pytest.raises(RpcError, match=r"did not answer within 1 s .*another one connected"):
            hello(rpc_endpoint, timeout=1)
        assert time.monotonic() - started < 5
    assert hello(rpc_endpoint, timeout=5)[0] == 7  # free again once the model is freed


def test_server_stops_on_ctrl_c_and_refuses_a_taken_port():
    import select

    port = free_port()
    proc = start_server(port)
    assert proc.stderr is not None
    said = ""
    deadline = time.monotonic() + 30
    while "serving on" not in said and time.monotonic() < deadline:  # announced once it answers, not before
        if select.select([proc.stderr], [], [], 1)[0]:
            said += proc.stderr.readline()
    try:
        taken = run_cli("rpc-server", "--port", str(port), timeout=60)
        assert taken.returncode == 2 and taken.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
        assert "Traceback" not in taken.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    err = said + err
    assert proc.returncode == 0, err
    assert f"serving on 127.0.0.1:{port}" in err and "rpc-server: stopped" in err and "Traceback" not in err


def test_server_refuses_a_public_address_without_the_flag():
    done = run_cli("rpc-server", "--host", "0.0.0.0", "--port", str(free_port()), timeout=60)
    assert done.returncode == 1 and "no authentication" in done.stderr and len(done.stderr.splitlines()) == 1


# -- placement on the device, bit for bit -------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_experts_on_the_device_give_identical_logits(tiny_gguf, rpc_device, qtype):
    path = tiny_gguf(qtype)
    reference = cpu_logits(path)
    fresh_log()
    overrides = tensor_buft_overrides([(EXPERT_REGEX, GPU)], 0, [rpc_device.handle])
    with LoadedModel(path, overrides=overrides) as model:
        lines = list(RECENT)
        got = list(sequence_logits(model, PROMPTS, threads=2))
    assert overridden(lines, f"RPC0[{rpc_device.endpoint}]") == [
        "blk.1.ffn_down_exps.weight", "blk.1.ffn_up_exps.weight",
        "blk.4.ffn_down_exps.weight", "blk.4.ffn_up_exps.weight"]
    assert buffer_mib(lines, "model buffer size") > 0
    for want, have in zip(reference, got, strict=True):
        assert np.array_equal(want, have)


def test_the_whole_model_on_the_device_gives_identical_logits(tiny_gguf, rpc_device):
    path = tiny_gguf("q8_0")
    reference = cpu_logits(path)
    fresh_log()
    with LoadedModel(path, overrides=tensor_buft_overrides([], TINY_LAYERS + 1, [rpc_device.handle])) as model:
        lines = list(RECENT)
        got = list(sequence_logits(model, PROMPTS, threads=2))
        lines = list(RECENT)
    assert any("offloaded 6/6 layers to GPU" in line for line in lines)
    assert buffer_mib(lines, "model buffer size") > 0
    for want, have in zip(reference, got, strict=True):
        assert np.array_equal(want, have)


def greedy_pair(engine: Engine) -> list[tuple[str, str, int]]:
    results = engine.generate_many([Request(p, GREEDY, max_tokens=12) for p in PROMPTS])
    return [(r.content, r.reasoning, r.completion_tokens) for r in results]


def test_two_sequences_in_one_batch_on_the_device(tiny_gguf, rpc_device):
    path = tiny_gguf("q8_0")
    with Engine(LoadedModel(path), n_ctx=512, n_seq_max=2, threads=2, owns_model=True) as engine:
        reference = greedy_pair(engine)
    overrides = tensor_buft_overrides([], TINY_LAYERS + 1, [rpc_device.handle])
    with Engine(LoadedModel(path, overrides=overrides), n_ctx=512, n_seq_max=2, threads=2,
                owns_model=True) as engine:
        assert greedy_pair(engine) == reference
    assert all(tokens == 12 for _, _, tokens in reference)


def test_a_prompt_snapshot_taken_and_restored_on_the_device(tiny_gguf, rpc_device):
    """The Mamba state and KV cells live on RPC0: saving them copies from the server, restoring writes back."""
    path = tiny_gguf("f32")
    prompt = [20 + i * 7 % 700 for i in range(120)]

    def twice(overrides) -> list[tuple[str, int, int]]:
        with Engine(LoadedModel(path, overrides=overrides), n_ctx=512, threads=2, owns_model=True) as engine:
            cache = PromptCache()
            out = []
            for extra in ([22], [22, 23, 24]):  # the second prompt extends the first: restored, then the suffix
                r = engine.generate(Request([*prompt, *extra], GREEDY, max_tokens=8, cache=cache))
                out.append((r.content, r.completion_tokens, r.cached_tokens))
            return out

    on_device = twice(tensor_buft_overrides([], TINY_LAYERS + 1, [rpc_device.handle]))
    assert on_device == twice(None)
    assert [cached for _, _, cached in on_device] == [0, len(prompt)]


def test_an_override_to_a_device_not_loaded_on_is_refused(tiny_gguf, rpc_device):
    """llama.cpp would load it, then abort the process when creating a context."""
    overrides = tensor_buft_overrides([(EXPERT_REGEX, GPU)], 0, [rpc_device.handle])
    with pytest.raises(ModelLoadError, match=r"names the buffer RPC0\[.*not among the devices"):
        LoadedModel(tiny_gguf("q8_0"), overrides=replace(overrides, devices=None))


# -- the planner's figures against llama.cpp's log ----------------------------------------------------------------


@pytest.mark.parametrize("n_cpu_moe", [None, 2, 5])
def test_the_plan_is_what_llama_cpp_does_on_the_device(tiny_gguf, rpc_endpoint, n_cpu_moe):
    path = tiny_gguf("q8_0")
    placement = PlacementOptions(n_cpu_moe=n_cpu_moe, rpc=(rpc_endpoint,))
    fresh_log()
    engine, plan = open_engine(str(path), ctx=512, parallel=2, threads=2, placement=placement)
    with engine:
        lines = list(RECENT)
        answers = greedy_pair(engine)
    assert plan.mode == GPU and plan.gpu_name == f"RPC0 ({rpc_endpoint})"
    # Every expert tensor the plan keeps in RAM was overridden to the CPU, and no other.
    planned_cpu = sorted(t.name for t in plan.tensors if t.device == CPU and re.search(EXPERT_REGEX, t.name))
    assert [n for n in overridden(lines, "CPU") if re.search(EXPERT_REGEX, n)] == planned_cpu
    assert len(planned_cpu) == {None: 0, 2: 2, 5: 4}[n_cpu_moe]
    # The device holds what the plan put there, the KV cache and the Mamba state too (log: MiB, 2 decimals).
    assert buffer_mib(lines, "model buffer size") == pytest.approx(plan.weights(GPU) / MiB, abs=0.01)
    assert buffer_mib(lines, "KV buffer size") == pytest.approx(plan.memory.kv / MiB, abs=0.01)
    assert buffer_mib(lines, "RS buffer size") == pytest.approx(plan.memory.state / MiB, abs=0.01)
    with Engine(LoadedModel(path), n_ctx=1024, n_seq_max=2, threads=2, owns_model=True) as cpu_engine:
        assert answers == greedy_pair(cpu_engine)


def test_plan_overrides_name_the_planned_device(tiny_gguf, rpc_device, rpc_endpoint):
    plan = plan_for(str(tiny_gguf("q8_0")), ctx=512, parallel=1,
                    placement=PlacementOptions(override_tensor=[r"blk\.4\.ffn_up_exps=RPC0"], cpu_moe=True,
                                               rpc=(rpc_endpoint,)))
    overrides = plan_overrides(plan, [rpc_device.handle])
    from cascade_local.devices import buffer_type_name

    targets = [(e.pattern.decode(), buffer_type_name(e.buft)) for e in overrides.array if e.pattern]
    assert targets[0] == (r"blk\.4\.ffn_up_exps", f"RPC0[{rpc_endpoint}]")
    assert all(name == "CPU" for _, name in targets[1:])


# -- the commands ---------------------------------------------------------------------------------------------------


def test_run_with_rpc_answers_as_cpu_only(tiny_gguf, rpc_endpoint):
    path = str(tiny_gguf("q8_0"))
    args = ["run", path, "Hello there", "--temperature", "0", "--max-tokens", "12", "--no-think", "--threads", "2"]
    cpu = run_cli(*args)
    pooled = run_cli(*args, "--rpc", rpc_endpoint, env={"CASCADE_LOCAL_LLAMA_LOG": "1"})
    assert cpu.returncode == 0 and pooled.returncode == 0, pooled.stderr
    assert pooled.stdout == cpu.stdout and cpu.stdout.strip()
    assert f"RPC0[{rpc_endpoint}] model buffer size" in pooled.stderr


def test_run_with_cpu_moe_keeps_experts_off_the_device(tiny_gguf, rpc_endpoint):
    path = str(tiny_gguf("q8_0"))
    args = ["run", path, "Hi", "--temperature", "0", "--max-tokens", "6", "--no-think", "--threads", "2"]
    pooled = run_cli(*args, "--rpc", rpc_endpoint, "-ot", r"blk\.4\.ffn_(up|down)_exps=RPC0", "--cpu-moe",
                     env={"CASCADE_LOCAL_LLAMA_LOG": "1"})
    assert pooled.returncode == 0, pooled.stderr
    lines = pooled.stderr.splitlines()
    assert overridden(lines, f"RPC0[{rpc_endpoint}]") == ["blk.4.ffn_down_exps.weight", "blk.4.ffn_up_exps.weight"]
    assert overridden(lines, "CPU") == ["blk.1.ffn_down_exps.weight", "blk.1.ffn_up_exps.weight"]
    assert pooled.stdout == run_cli(*args).stdout


@pytest.mark.parametrize("gpu_mem", ["auto", "1GiB,3GiB"])
def test_two_servers_share_the_layers(tiny_gguf, rpc_endpoint, gpu_mem):
    """Two endpoints: the plan pools them, llama.cpp splits the offloaded layers between RPC0 and RPC1 by their
    free memory, or by the budgets given per server."""
    port = free_port()
    second = start_server(port)
    try:
        pair = f"{rpc_endpoint},127.0.0.1:{port}"
        path = str(tiny_gguf("q8_0"))
        # The context the plan below is made for (run's own default, --ctx auto, would size it to the prompt).
        args = ["run", path, "Hello there", "--temperature", "0", "--max-tokens", "12", "--no-think", "--threads", "1",
                "--ctx", "8192"]
        pooled = run_cli(*args, "--rpc", pair, "--gpu-mem", gpu_mem, env={"CASCADE_LOCAL_LLAMA_LOG": "1"})
        plan = json.loads(run_cli("plan", path, "--rpc", pair, "--gpu-mem", gpu_mem, "--ctx", "8192", "--json").stdout)
    finally:
        second.send_signal(signal.SIGINT)
        second.wait(timeout=30)
    assert pooled.returncode == 0, pooled.stderr
    assert pooled.stdout == run_cli(*args).stdout
    lines = pooled.stderr.splitlines()
    first_mib, second_mib = (buffer_mib(lines, "model buffer size", f"[{e}]") for e in pair.split(","))
    assert any("using device RPC1 (127.0.0.1:" in line for line in lines)
    assert first_mib > 0 and second_mib > 0
    assert [d["endpoint"] for d in plan["rpc"]] == pair.split(",")
    if gpu_mem == "auto":
        assert plan["gpu"]["budget"] == sum(d["free"] for d in plan["rpc"])
        assert [d["layers"] for d in plan["devices"]] == [[0, 1, 2], [3, 4]]  # equal free memory: halves
    else:  # a quarter and three quarters of the 6 offloaded layers (5 and the output layer)
        assert plan["gpu"]["budget"] == 4 * 1024**3
        assert [d["layers"] for d in plan["devices"]] == [[0, 1], [2, 3, 4]]
    # Together they hold what the plan put on "the GPU" (each buffer is logged rounded to 0.01 MiB) ...
    on_devices = sum(t["bytes"] for t in plan["tensors"] if t["device"] == GPU)
    assert first_mib + second_mib == pytest.approx(on_devices / MiB, abs=0.02)
    # ... and each holds the layers, weights, KV cache and Mamba state the plan gives it.
    assert [d["endpoint"] for d in plan["devices"]] == pair.split(",")
    for share in plan["devices"]:
        logged = [line for line in lines if f"[{share['endpoint']}]" in line]
        assert buffer_mib(logged, "model buffer size", "") == pytest.approx(share["weights"] / MiB, abs=0.01)
        for what, key in (("KV buffer size", "kv_cache"), ("RS buffer size", "mamba_state")):
            found = [line for line in logged if what in line]
            assert (buffer_mib(found, what, "") if found else 0.0) == pytest.approx(share[key] / MiB, abs=0.01)
        assigned = [int(m.group(1)) for m in (re.search(rf"layer +(\d+) assigned to device {share['device']},", line)
                                               for line in lines) if m]
        assert [il for il in assigned if il < TINY_LAYERS] == share["layers"]
    assert sorted(il for share in plan["devices"] for il in share["layers"]) == list(range(TINY_LAYERS))


@pytest.mark.parametrize("command", ["run", "plan"])
def test_an_override_naming_a_later_rpc_device_is_refused(tiny_gguf, rpc_endpoint, command):
    args = ["run", str(tiny_gguf("q8_0")), "Hi"] if command == "run" else ["plan", str(tiny_gguf("q8_0"))]
    done = run_cli(*args, "--rpc", rpc_endpoint, "-ot", r"blk\.1\.ffn_up_exps=RPC1")
    assert done.returncode == 1 and "only the first RPC device, RPC0, can be named" in done.stderr


def test_per_server_budgets_must_match_the_servers(tiny_gguf, rpc_endpoint):
    done = run_cli("plan", str(tiny_gguf("q8_0")), "--rpc", rpc_endpoint, "--gpu-mem", "1GiB,2GiB")
    assert done.returncode == 1 and "gives 2 budgets for 1 RPC devices" in done.stderr


def test_plan_with_rpc_shows_the_device(tiny_gguf, rpc_endpoint):
    done = run_cli("plan", str(tiny_gguf("q8_0")), "--rpc", rpc_endpoint, "--n-cpu-moe", "2", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["mode"] == GPU and plan["gpu"]["name"] == f"RPC0 ({rpc_endpoint})"
    assert [d["device"] for d in plan["rpc"]] == ["RPC0"] and plan["rpc"][0]["endpoint"] == rpc_endpoint
    assert plan["expert_layers"] == {"gpu": [4], "cpu": [1]}
    table = run_cli("plan", str(tiny_gguf("q8_0")), "--rpc", rpc_endpoint, "--cpu-moe")
    assert table.returncode == 0 and f"RPC0 ({rpc_endpoint})" in table.stdout
    assert re.search(r"^\s*class\s+tensors\s+RPC0\s+RAM\s*$", table.stdout, re.MULTILINE)  # the device's column
    assert "=RPC0" not in table.stdout and "exps=CPU" in table.stdout


def test_batch_with_rpc_answers_as_cpu_only(tiny_gguf, rpc_endpoint, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(["Hi", "2+2?"])))
    common = ["--parallel", "2", "--max-tokens", "8", "--temperature", "0", "--no-think", "--threads", "2"]
    for name, extra in (("cpu", []), ("rpc", ["--rpc", rpc_endpoint])):
        done = run_cli("batch", str(questions), "-o", str(tmp_path / f"{name}.jsonl"), "--model",
                       str(tiny_gguf("q8_0")), *common, *extra)
        assert done.returncode == 0, done.stderr
    cpu, pooled = ([json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
                   for n in ("cpu", "rpc"))
    assert [a["content"] for a in cpu] == [a["content"] for a in pooled] and len(cpu) == 2


def test_chat_with_rpc_answers_as_cpu_only(tiny_gguf, rpc_endpoint):
    args = ["chat", str(tiny_gguf("q8_0")), "--temperature", "0", "--max-tokens", "8", "--no-think", "--threads", "2"]
    cpu = run_cli(*args, input="Hello\n")
    pooled = run_cli(*args, "--rpc", rpc_endpoint, input="Hello\n")
    assert cpu.returncode == 0 and pooled.returncode == 0, pooled.stderr
    assert pooled.stdout == cpu.stdout and cpu.stdout.strip()


@pytest.mark.parametrize("command", ["run", "chat", "batch", "plan"])
def test_unreachable_server_is_one_line_and_exit_2(tiny_gguf, tmp_path, command):
    port = free_port()
    path = str(tiny_gguf("q8_0"))
    args = {"run": ["run", path, "Hi"], "chat": ["chat", path], "plan": ["plan", path],
            "batch": ["batch", str(tmp_path / "q.jsonl"), "-o", str(tmp_path / "a.jsonl"), "--model", path]}[command]
    (tmp_path / "q.jsonl").write_text('{"prompt": "Hi"}\n')
    done = run_cli(*args, "--rpc", f"127.0.0.1:{port}", input="Hi\n")
    assert done.returncode == 2, (done.returncode, done.stderr)  # never -6 (SIGABRT)
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: cannot reach the RPC server at 127.0.0.1:{port}")
    assert "Traceback" not in done.stderr


def connected(port: int) -> bool:
    """Whether a client holds a connection to the server on `port`: an ESTABLISHED row in /proc/net/tcp."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return any(row[1].endswith(f":{port:04X}") and row[3] == "01" for row in rows)


def test_a_server_that_dies_mid_answer_ends_the_client_with_one_line(tiny_gguf, tmp_path):
    port = free_port()
    server = start_server(port)
    args = ["chat", str(tiny_gguf("q8_0")), "--rpc", f"127.0.0.1:{port}", "--temperature", "0", "--ignore-eos",
            "--max-tokens", "100000", "--ctx", "65536", "--no-think", "--threads", "1"]
    (tmp_path / "said").write_text("Hello\n")
    with (tmp_path / "said").open() as said:
        client = subprocess.Popen([*CLI, *args], stdin=said, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
    try:
        deadline = time.monotonic() + 60
        while not connected(port) and client.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # loaded and generating: the answer is tens of thousands of tokens long
        assert client.poll() is None, client.communicate()
        server.kill()
        _, err = client.communicate(timeout=60)
    finally:
        server.kill()
        server.wait()
        if client.poll() is None:
            client.kill()
    assert client.returncode == 2, (client.returncode, err)  # never -6 (SIGABRT)
    assert err.strip().splitlines()[-1].startswith("error: llama.cpp stopped the process: Remote RPC server crashed")
    assert "Traceback" not in err


def test_a_budget_too_small_for_the_dense_part_is_refused(tiny_gguf, rpc_endpoint):
    done = run_cli("run", str(tiny_gguf("q8_0")), "Hi", "--rpc", rpc_endpoint, "--gpu-mem", "1MiB")
    assert done.returncode == 2 and "too small for the dense part" in done.stderr
    assert "Traceback" not in done.stderr
