"""llama.cpp's RPC backend: another process's (or machine's) memory and compute as a ggml device.

A server (`serve`) runs `ggml_backend_rpc_start_server` on this machine's devices; a client (`connect`) adds a
server with `ggml_backend_rpc_add_server` and gets a device named RPC0, RPC1... of type GPU, whose memory is the
server host's. llama.cpp then places tensors there like on a GPU (`n_gpu_layers`, `tensor_buft_overrides`).

ggml aborts the whole process (SIGABRT) where a server cannot be reached or does not speak its protocol, so
`connect` first does the protocol's HELLO itself, over a plain socket with a timeout, and raises RpcError (one
line) instead. The protocol has no authentication: whoever reaches the port can read and write the server's memory.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from cascade_local.errors import CascadeError, UsageError

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default

# ggml-rpc.cpp (llama-cpp-python 0.3.36): request | cmd u8 | size u64 | data |, response | size u64 | data |.
RPC_CMD_HELLO = 14
PROTO_MAJOR, PROTO_MINOR = 7, 0
CONN_CAPS_SIZE = 24  # transport.h: RPC_CONN_CAPS_SIZE; zeros ask for plain TCP
HELLO_RSP_SIZE = 4 + CONN_CAPS_SIZE  # major, minor, patch, padding, caps


class RpcError(CascadeError):
    """An RPC server that cannot be used (unreachable, busy, another protocol); the message says which and why."""

    exit_code = 2


# -- endpoints ----------------------------------------------------------------------------------------------------

_ENDPOINT = re.compile(r"^(?P<host>[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")  # ggml parses host:port (no IPv6)


def parse_endpoints(text: str) -> list[str]:
    """'HOST:PORT[,HOST:PORT...]' (llama.cpp's --rpc) -> ['HOST:PORT', ...]; UsageError for anything else."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        match = _ENDPOINT.match(item)
        if not match or not 0 < int(match.group("port")) < 65536:
            raise UsageError(f"--rpc '{text}': write HOST:PORT[,HOST:PORT...], for example 127.0.0.1:{DEFAULT_PORT}")
        if item not in out:
            out.append(item)
    return out


def check_override_devices(override_tensor: Sequence[str]) -> None:
    """Refuses `-ot REGEX=RPC1` and above: the planner has one offload target, which is the first device (RPC0).

    Sending those tensors to RPC0 instead would be a silent misplacement.
    """
    for text in override_tensor:
        for item in text.split(","):
            device = item.rpartition("=")[2]
            match = re.fullmatch(r"RPC(\d+)", device, re.IGNORECASE)
            if match and int(match.group(1)) != 0:
                raise UsageError(f"--override-tensor '{item}': only the first RPC device, RPC0, can be named for "
                                 f"now (the plan pools the servers and llama.cpp splits layers between them)")


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it); for a server started just after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def hello(endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """Does the protocol's HELLO with the server at `endpoint`: its version (major, minor, patch), or RpcError.

    What ggml would otherwise abort the process on: nothing listening, a handshake that fails, a version it does
    not speak. A server serves one client at a time, so a busy one answers only when its client has gone.
    """
    host, port = split_endpoint(endpoint)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise RpcError(f"RPC server {endpoint} does not answer (no connection within {timeout:g} s)") from None
    except OSError as exc:
        raise RpcError(f"cannot reach the RPC server at {endpoint}: {exc.strerror or exc} (start one there with "
                       f"`cascade-local rpc-server --port {port}`)") from None
    with sock:
        try:
            sock.sendall(struct.pack("<BQ", RPC_CMD_HELLO, CONN_CAPS_SIZE) + bytes(CONN_CAPS_SIZE))
            header = _recv(sock, 8)
            (size,) = struct.unpack("<Q", header) if len(header) == 8 else (None,)
            body = _recv(sock, HELLO_RSP_SIZE) if size == HELLO_RSP_SIZE else b""
        except TimeoutError:
            raise RpcError(f"RPC server {endpoint} accepted the connection but did not answer within {timeout:g} s "
                           "(it serves one client at a time: is another one connected?)") from None
        except OSError as exc:
            raise RpcError(f"RPC server {endpoint} dropped the connection: {exc.strerror or exc}") from None
    if len(body) != HELLO_RSP_SIZE:
        raise RpcError(f"{endpoint} is not a llama.cpp RPC server (its answer to HELLO was not one)")
    major, minor, patch = body[0], body[1], body[2]
    if major != PROTO_MAJOR or minor > PROTO_MINOR:
        raise RpcError(f"RPC server {endpoint} speaks protocol {major}.{minor}.{patch}; this build speaks "
                       f"{PROTO_MAJOR}.{PROTO_MINOR}.x (use the same llama-cpp-python version on both machines)")
    return major, minor, patch


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


# -- the ggml side ------------------------------------------------------------------------------------------------


@cache
def _rpc() -> dict[str, Any] | None:
    """ggml's RPC functions, through the library llama-cpp-python loaded (one ggml in the process); None without."""
    from cascade_local.llama_log import quiet_llama

    quiet_llama()
    from cascade_local.devices import native as fn

    p, size = ctypes.c_void_p, ctypes.c_size_t
    try:
        add_server = fn("ggml_backend_rpc_add_server", p, ctypes.c_char_p)
        start_server = fn("ggml_backend_rpc_start_server", None, ctypes.c_char_p, ctypes.c_char_p, size, size,
                          ctypes.POINTER(p))
    except AttributeError:  # built without -DGGML_RPC=ON
        return None
    return {
        "add_server": add_server,
        "start_server": start_server,
        "reg_dev_count": fn("ggml_backend_reg_dev_count", size, p),
        "reg_dev_get": fn("ggml_backend_reg_dev_get", p, p, size),
    }


def rpc_supported() -> bool:
    """Whether this llama-cpp-python build has llama.cpp's RPC backend (built with -DGGML_RPC=ON)."""
    return _rpc() is not None


def _require() -> dict[str, Any]:
    funcs = _rpc()
    if funcs is None:
        raise RpcError("this llama-cpp-python build has no RPC backend; rebuild it with `make` (which builds with "
                       "-DGGML_RPC=ON) or CMAKE_ARGS=\"-DGGML_RPC=ON\" pip install --no-cache-dir --force-reinstall "
                       "llama-cpp-python==0.3.36")
    return funcs


ABORT_EXIT_CODE = 2
_abort_hook: Any = None  # the ctypes callback ggml holds: kept alive for the life of the process


def exit_cleanly_on_ggml_abort() -> None:
    """Makes ggml's aborts one line on stderr and exit 2, instead of SIGABRT and a backtrace.

    With a model on an RPC server, a server that dies or drops the connection mid-computation makes ggml's RPC
    client abort (RPC_STATUS_ASSERT, in its dispatcher thread). C cannot raise into Python and ggml's state is
    undefined after it, so the process must end: ggml_set_abort_callback lets it end as a command's error does.
    The callback only writes and exits (no Python that could raise inside C).
    """
    global _abort_hook
    if _abort_hook is not None:
        return
    from cascade_local.devices import native

    hook_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

    def on_abort(message: bytes | None) -> None:
        try:
            text = (message or b"").decode("utf-8", "replace").strip()
            what = text.split(": ", 1)[-1]  # ggml writes "file:line: message"
            # A newline first: the process may die in the middle of a line of streamed output.
            os.write(2, f"\nerror: llama.cpp stopped the process: {what} (is the RPC server still running and "
                        "reachable?)\n".encode())
        finally:
            os._exit(ABORT_EXIT_CODE)

    _abort_hook = hook_type(on_abort)
    native("ggml_set_abort_callback", ctypes.c_void_p, hook_type)(_abort_hook)


@dataclass(frozen=True)
class RpcDevice:
    """One device of an RPC server, as ggml registered it in this process."""

    endpoint: str
    name: str  # RPC0, RPC1...: what llama.cpp's --override-tensor calls it
    description: str
    free: int
    total: int
    handle: int  # ggml_backend_dev_t
    buffer_type: int  # ggml_backend_buffer_type_t, named RPC0[HOST:PORT]


def connect(endpoints: Sequence[str], timeout: float = 5.0) -> list[RpcDevice]:
    """Adds each server's devices to ggml (once per endpoint and process) and returns them, checked first.

    Every endpoint is checked with `hello` before ggml is asked, since ggml aborts the process on a failure.
    """
    funcs = _require()
    from cascade_local.devices import _ggml

    exit_cleanly_on_ggml_abort()
    g = _ggml()
    devices = []
    for endpoint in endpoints:
        hello(endpoint, timeout)
        reg = funcs["add_server"](endpoint.encode())
        if not reg:
            raise RpcError(f"llama.cpp could not add the RPC server {endpoint}")
        for i in range(funcs["reg_dev_count"](reg)):
            dev = funcs["reg_dev_get"](reg, i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            g["dev_memory"](dev, ctypes.byref(free), ctypes.byref(total))
            devices.append(RpcDevice(endpoint, (g["dev_name"](dev) or b"?").decode(),
                                     (g["dev_description"](dev) or b"").decode(), free.value, total.value, dev,
                                     g["dev_buffer_type"](dev)))
    return devices


def served_devices() -> list[int]:
    """What a server offers: this build's GPUs if it has any, else the CPU."""
    from cascade_local.devices import GPU_TYPES, _ggml

    g = _ggml()
    all_devices = [g["dev_get"](i) for i in range(g["dev_count"]())]
    gpus = [d for d in all_devices if d and g["dev_type"](d) in GPU_TYPES]
    return gpus or [g["dev_by_type"](0)]


def serve(host: str, port: int, *, threads: int, cache_dir: str | None = None) -> None:
    """Runs an RPC server on HOST:PORT until the process ends (ggml's call never returns while it serves).

    Returns only when ggml gave up: the port could not be bound (RpcError says so).
    """
    funcs = _require()
    devices = served_devices()
    array = (ctypes.c_void_p * len(devices))(*devices)
    endpoint = f"{host}:{port}"
    funcs["start_server"](endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, len(devices), array)
    raise RpcError(f"the RPC server could not listen on {endpoint} (is the port in use, or the address not this "
                   "machine's?)")


__all__ = [
    "DEFAULT_PORT", "RpcDevice", "RpcError", "check_override_devices", "connect", "exit_cleanly_on_ggml_abort",
    "free_port", "hello", "is_loopback", "parse_endpoints", "rpc_supported", "serve", "served_devices",
    "split_endpoint",
]
