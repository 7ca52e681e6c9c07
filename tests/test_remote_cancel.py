"""Cancelling a remote batch: a real HTTP server on loopback whose streams send one chunk and then stall.

A request whose last message is "fail" gets a 400 after a short delay; every other one gets a streamed
answer that sends one SSE chunk and then nothing for STALL seconds (a server busy elsewhere, or hung). The
server notes when each stalled client goes away, which it sees as end-of-file on the connection.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import CLI

from cascade_local.remote import ChatRequest, RemoteEngine, RemoteServerError

STALL = 5.0  # seconds a stalled stream waits before the server gives up on it
FAIL_AFTER = 0.3  # seconds before the 400 answer, so that the other streams are already stalled by then
CHUNK = {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
DONE = {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}


class StallingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.streaming = 0  # streams that sent their chunk and are stalled
        self.gone: list[float] = []  # when each stalled client closed its connection
        self.failed_at: float | None = None
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: StallingServer

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["messages"][-1]["content"] == "fail":
            time.sleep(FAIL_AFTER)
            payload = json.dumps({"error": {"message": "bad request"}}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.server.failed_at = time.monotonic()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(f"data: {json.dumps(CHUNK)}\n\n".encode())
        self.wfile.flush()
        if body["messages"][-1]["content"] == "quick":  # a whole answer
            self.wfile.write(f"data: {json.dumps(DONE)}\n\ndata: [DONE]\n\n".encode())
            return
        with self.server.lock:
            self.server.streaming += 1
        # Stall: wait for the client to go (readable with no data: end-of-file), or give up after STALL.
        readable, _, _ = select.select([self.connection], [], [], STALL)
        if readable and not self.connection.recv(1):
            with self.server.lock:
                self.server.gone.append(time.monotonic())


@pytest.fixture
def server() -> Iterator[StallingServer]:
    srv = StallingServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def ask(text: str, tag: int) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], thinking=False, max_tokens=16, tag=tag)


def test_a_failing_request_cancels_the_stalled_ones_at_once(server):
    requests = [ask("Hi", 0), ask("Hi", 1), ask("fail", 2)]
    started = time.monotonic()
    with RemoteEngine(server.url, max_attempts=1) as engine, \
            pytest.raises(RemoteServerError, match="answered 400: bad request"):
        for _ in engine.stream_many(requests, parallel=3):
            pass
    raised = time.monotonic()
    assert server.streaming == 2  # both others were stalled mid-answer when the 400 came
    assert server.failed_at is not None and raised - server.failed_at < 0.5, raised - started
    deadline = time.monotonic() + 2
    while len(server.gone) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server.gone) == 2 and max(server.gone) - server.failed_at < 0.5  # their connections were closed


def test_closing_the_stream_cancels_what_is_in_flight(server):
    """What a consumer's own error or Ctrl-C does: the generator is closed while streams stall."""
    with RemoteEngine(server.url) as engine:
        events = engine.stream_many([ask("Hi", 0), ask("Hi", 1)], parallel=2)
        assert next(events).text == "Hel"
        while server.streaming < 2:
            time.sleep(0.01)
        started = time.monotonic()
        events.close()
        closed = time.monotonic() - started
    assert closed < 0.5
    deadline = time.monotonic() + 2
    while len(server.gone) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server.gone) == 2


def test_a_failing_batch_consumer_cancels_the_stalled_requests(server, tmp_path: Path):
    """The batch's own side fails (here its observer, as a full disk would in writing): stalled requests end."""
    from cascade_local.batch import ItemSettings, RemoteBackend, open_batch, run_batch

    class Fails:
        def start(self, total: int) -> None:
            pass

        def record(self, record: dict, completion_tokens: int) -> None:
            raise RuntimeError("disk full")

    prompts = tmp_path / "in.txt"
    prompts.write_text("Hi\nHello\nquick\n")
    with RemoteEngine(server.url) as engine, open_batch(prompts, tmp_path / "out.jsonl") as job:
        backend = RemoteBackend(engine, parallel=3)
        with pytest.raises(RuntimeError, match="disk full"):
            run_batch(job, backend, ItemSettings(thinking=False), observer=Fails())
        failed = time.monotonic()
        deadline = failed + 2
        while len(server.gone) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(server.gone) == 2 and max(server.gone) - failed < 0.5


def test_ctrl_c_ends_a_remote_batch_at_once(server, tmp_path: Path):
    prompts = tmp_path / "in.txt"
    prompts.write_text("Hi\nHello\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([*CLI, "batch", str(prompts), "-o", str(out), "--endpoint", server.url,
                             "--parallel", "2", "--no-think"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while server.streaming < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert server.streaming == 2, proc.communicate(timeout=10)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
        ended = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert ended < 1.5, ended  # not STALL seconds
    assert len(server.gone) == 2


@pytest.mark.parametrize("command", ["chat", "batch"])
def test_chat_and_batch_close_the_remote_engine_they_open(server, tmp_path: Path, monkeypatch, command):
    from typer.testing import CliRunner

    from cascade_local.cli.app import _register, app

    closed: list[RemoteEngine] = []
    real_close = RemoteEngine.close

    def close_and_note(engine: RemoteEngine) -> None:  # the real close, noted
        real_close(engine)
        closed.append(engine)

    monkeypatch.setattr(RemoteEngine, "close", close_and_note)
    if not app.registered_commands:
        _register()
    if command == "chat":
        result = CliRunner().invoke(app, ["chat", "--endpoint", server.url, "--no-think"], input="quick\n/exit\n")
    else:
        prompts = tmp_path / "in.txt"
        prompts.write_text("quick\n")
        result = CliRunner().invoke(app, ["batch", str(prompts), "-o", str(tmp_path / "out.jsonl"),
                                          "--endpoint", server.url, "--no-think"])
    assert result.exit_code == 0, result.output
    assert "Hello" in (result.output if command == "chat" else (tmp_path / "out.jsonl").read_text())
    assert len(closed) == 1 and closed[0]._client.is_closed


if sys.platform == "win32":  # pragma: no cover - select on sockets and SIGINT to a child are POSIX here
    pytestmark = pytest.mark.skip("POSIX only")
