"""A stateful Python kernel for the model's `stateful_python_code_exec` tool.

A real IPython kernel (ipykernel, driven through jupyter_client), so variables, imports and
definitions persist from one call to the next, as in the notebook the model was trained with.

Isolation, such as it is (this is a convenience sandbox, not a security boundary: the code runs as
the user, with the user's file permissions and network):

- the kernel starts in a fresh temporary directory, which is also its HOME, removed on close;
- its environment is built from scratch (PATH, HOME, LANG and a few IPython settings): nothing of
  the parent's is inherited, so no API token or key reaches the model's code;
- resource limits are set with `resource.setrlimit` in the child between fork and exec (Popen's
  `preexec_fn`, passed through jupyter_client's launcher): address space (memory) and CPU seconds.
  The CPU limit counts the kernel's whole life; when it or a crash kills the kernel, the next call
  starts a fresh one and says the state was lost;
- each execution has a wall-clock timeout: the kernel is interrupted (SIGINT, as Jupyter's stop
  button) and stays usable, with its state; if it does not answer the interrupt it is restarted.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from cascade_local.errors import CascadeError

DEFAULT_TIMEOUT = 120.0
DEFAULT_OUTPUT_LIMIT = 4000
DEFAULT_MEMORY_BYTES = 8 * 1024**3  # address space, not resident memory: numpy and friends reserve plenty
DEFAULT_CPU_SECONDS = 3600

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")


class KernelError(CascadeError):
    """The Python tool is unavailable (jupyter_client/ipykernel missing) or its kernel failed to start."""

    exit_code = 2


@dataclass(frozen=True)
class Execution:
    """What one piece of code printed, as the model will read it."""

    output: str
    timed_out: bool = False
    error: bool = False  # the code raised (traceback in `output`)
    truncated: bool = False
    restarted: bool = False  # the kernel died or hung, and a fresh one (without the old state) took over


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def truncate(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to `limit` characters, with a note saying how much was left out."""
    if len(text) <= limit:
        return text, False
    return text[:limit] + f"\n[output truncated: {len(text) - limit} more characters not shown]", True


def _limits(memory_bytes: int | None, cpu_seconds: int | None):
    def apply() -> None:  # runs in the child, after fork and before exec
        import resource

        if memory_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        if cpu_seconds:
            # soft: SIGXCPU (kills the kernel); hard a little later: SIGKILL if it ignored that
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))

    return apply


class PythonKernel:
    """One stateful IPython kernel; use as a context manager (or call close()) so it never outlives its chat."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, output_limit: int = DEFAULT_OUTPUT_LIMIT,
                 memory_bytes: int | None = DEFAULT_MEMORY_BYTES, cpu_seconds: int | None = DEFAULT_CPU_SECONDS,
                 startup_timeout: float = 60.0):
        self.timeout = timeout
        self.output_limit = output_limit
        self.memory_bytes = memory_bytes
        self.cpu_seconds = cpu_seconds
        self.startup_timeout = startup_timeout
        self.workdir = tempfile.mkdtemp(prefix="cascade-python-")
        self._km: Any = None
        self._kc: Any = None
        self._start()

    # -- lifecycle -------------------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The kernel's whole environment: built, not inherited, so the parent's secrets stay out."""
        bin_dir = os.path.dirname(sys.executable)
        return {
            "PATH": os.pathsep.join([bin_dir, os.defpath.lstrip(os.pathsep) or "/usr/bin:/bin"]),
            "HOME": self.workdir,
            "LANG": "C.UTF-8",
            "IPYTHONDIR": os.path.join(self.workdir, ".ipython"),
            "MPLBACKEND": "Agg",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }

    def _start(self) -> None:
        try:
            from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
            from jupyter_client.manager import KernelManager
        except ImportError:
            raise KernelError("the Python tool needs jupyter_client and ipykernel: "
                              "pip install 'cascade-local[tools]'") from None

        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]

        class _OwnSpec(KernelSpecManager):  # this interpreter's ipykernel, never a user-installed kernelspec
            def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
                return KernelSpec(argv=argv, display_name="Python", language="python")

        km = KernelManager(kernel_name="python3", kernel_spec_manager=_OwnSpec())
        try:
            km.start_kernel(cwd=self.workdir, env=self.environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=_limits(self.memory_bytes, self.cpu_seconds))
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=self.startup_timeout)
        except Exception as exc:
            if km.has_kernel:
                km.shutdown_kernel(now=True)
            raise KernelError(f"the Python kernel did not start: {exc}") from None
        self._km, self._kc = km, kc

    @property
    def pid(self) -> int | None:
        """The kernel process's id (None once closed)."""
        provisioner = getattr(self._km, "provisioner", None)
        return getattr(provisioner, "pid", None)

    def _stop(self) -> None:
        if self._kc is not None:
            self._kc.stop_channels()
            self._kc = None
        if self._km is not None:
            if self._km.has_kernel:
                self._km.shutdown_kernel(now=True)
            self._km = None

    def restart(self) -> None:
        """A fresh kernel in the same directory: every variable is lost."""
        self._stop()
        self._start()

    def close(self) -> None:
        """Shuts the kernel down (no process left behind) and removes its directory."""
        self._stop()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""

    def __enter__(self) -> PythonKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: best effort
            self.close()

    # -- running code ----------------------------------------------------------------------------------

    def execute(self, code: str, *, timeout: float | None = None) -> Execution:
        """Runs `code` in the kernel; returns everything it printed, its value and any traceback.

        Ctrl-C while waiting interrupts the kernel too (as Jupyter's stop button), then propagates:
        the user's stop must stop the code, not only our waiting for it.
        """
        return self._execute(code, timeout=timeout)

    def _drain(self, msg_id: str, seconds: float) -> None:
        """Reads the kernel's messages until the execution `msg_id` reports idle (or time runs out)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                msg = self._kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            if (msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"].get("execution_state") == "idle"):
                return

    def _execute(self, code: str, *, timeout: float | None = None) -> Execution:
        if self._km is None:
            raise KernelError("the Python kernel is closed")
        restarted = False
        if not self._km.is_alive():
            self.restart()
            restarted = True
        limit = self.timeout if timeout is None else timeout
        parts: list[str] = []
        error = timed_out = False
        msg_id = self._kc.execute(code, store_history=True, allow_stdin=False)
        deadline = time.monotonic() + limit
        interrupted_at: float | None = None
        try:
            while True:
                now = time.monotonic()
                if interrupted_at is None and now >= deadline:
                    timed_out = True
                    interrupted_at = now
                    self._km.interrupt_kernel()
                if interrupted_at is not None and now - interrupted_at > 5.0:
                    self.restart()  # it ignored the interrupt (a C extension loop): start over
                    restarted = True
                    break
                if not self._km.is_alive():
                    self.restart()
                    restarted = True
                    break
                wait = 0.2 if interrupted_at is not None else max(0.01, min(0.5, deadline - now))
                try:
                    msg = self._kc.get_iopub_msg(timeout=wait)
                except queue.Empty:
                    continue
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    parts.append(content.get("text", ""))
                elif kind in ("execute_result", "display_data"):
                    data = content.get("data", {})
                    if "text/plain" in data:
                        parts.append(data["text/plain"] + "\n")
                    else:
                        parts.append(f"[{', '.join(sorted(data))} output not shown]\n")
                elif kind == "error":
                    if not timed_out:  # the KeyboardInterrupt of our own interrupt is reported below instead
                        error = True
                        parts.append("\n".join(content.get("traceback", [])) + "\n")
                elif kind == "status" and content.get("execution_state") == "idle":
                    break
        except KeyboardInterrupt:
            # The user's Ctrl-C: stop the code too, and let the kernel settle before the next call.
            self._km.interrupt_kernel()
            self._drain(msg_id, 5.0)
            raise
        text = strip_ansi("".join(parts)).rstrip("\n")
        if timed_out:
            text += (("\n" if text else "") + f"[execution timed out after {limit:g} seconds and was interrupted]")
        if restarted:
            text += (("\n" if text else "") + "[the Python kernel died or hung and was restarted: "
                     "every variable and import is lost]")
        text, cut = truncate(text, self.output_limit)
        return Execution(text, timed_out=timed_out, error=error, truncated=cut, restarted=restarted)
