"""llama.cpp's log callback is installed once per process, whichever threads ask for it first.

Each check runs in a fresh interpreter: the callback is process state, installed at most once.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Eight threads ask for the callback at the same moment. llama_log_set is the real one, slowed (a sleep before
# the call) so that the window in which a second install could start is wide open, not a matter of luck.
RACE = textwrap.dedent("""
    import ctypes, threading, time
    import llama_cpp
    from cascade_local import llama_log

    installs = []
    real_set = llama_cpp.llama_log_set

    def slowed_set(callback, user_data):
        installs.append(callback)
        time.sleep(0.05)
        real_set(callback, user_data)

    llama_cpp.llama_log_set = slowed_set
    start = threading.Barrier(8)

    def ask():
        start.wait()
        llama_log.quiet_llama()

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = llama_cpp.llama_log_callback()
    llama_cpp.llama_log_get(ctypes.byref(held), ctypes.byref(ctypes.c_void_p()))
    same = ctypes.cast(held, ctypes.c_void_p).value == ctypes.cast(llama_log._callback, ctypes.c_void_p).value
    print(len(installs), same)
""")


def test_threads_asking_together_install_one_callback_that_stays_alive():
    result = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # Before the fix: 8 installs, and llama.cpp was often left holding a callback Python had collected.
    assert result.stdout.split() == ["1", "True"]
