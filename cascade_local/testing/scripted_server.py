"""A scripted OpenAI-style server, a test double: every chat completion streams the same fixed text.

Where a test needs a model's exact words (wide characters, Markdown tables) and their timing, a real model cannot
give them. This server answers `POST /v1/chat/completions` with the text of a file, a few characters per
server-sent event, on 127.0.0.1 only. Run it as `python -m cascade_local.testing.scripted_server TEXT_FILE
PORT_FILE [--chunk N] [--delay S] [--pause-after TEXT --pause S]`; it writes its port to PORT_FILE once it listens.
"""

from __future__ import annotations

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def make_handler(text: str, size: int, delay: float, pause_after: str | None = None,
                 pause: float = 0.0) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet: the test reads the terminal
            pass

        def do_GET(self) -> None:
            body = json.dumps({"object": "list", "data": [{"id": "scripted", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            pieces = chunks(text, size)
            sent, paused = "", False
            for piece in pieces:
                self._event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                sent += piece
                if pause_after and not paused and pause_after in sent:
                    time.sleep(pause)  # a quiet moment in the stream, for the test to act in
                    paused = True
                time.sleep(delay)
            self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            self._event({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": len(pieces)}})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        def _event(self, data: dict) -> None:
            self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            self.wfile.flush()

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("text_file", type=Path)
    parser.add_argument("port_file", type=Path)
    parser.add_argument("--chunk", type=int, default=3, help="characters per event")
    parser.add_argument("--delay", type=float, default=0.01, help="seconds between events")
    parser.add_argument("--pause-after", help="once the text sent so far contains this, wait --pause seconds")
    parser.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args()
    text = args.text_file.read_text(encoding="utf-8")
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(text, args.chunk, args.delay, args.pause_after,
                                                                     args.pause))
    temporary = args.port_file.with_name(args.port_file.name + ".tmp")
    temporary.write_text(str(server.server_address[1]))
    temporary.replace(args.port_file)  # complete when it appears
    server.serve_forever()


if __name__ == "__main__":
    main()
