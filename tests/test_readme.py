"""The README's command examples are real: each marked block is run and must print what the README shows.

A block is marked with `<!-- example -->` on the line before its ```console fence. Its first line is
`$ cascade-local ARGS` (append `2>&1` to include stderr); the rest is the expected output, compared after
normalising what legitimately varies (trailing spaces, timings, free memory). A last line of `...` means
"the output starts with these lines". Commands run in a folder holding the tiny checkpoint as `tiny/`,
its q4-moe conversion as `tiny-q4.gguf`, and an empty `home/` as CASCADE_LOCAL_HOME.

To refresh the README after a deliberate change of output: python tests/test_readme.py --write
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = Path(__file__).resolve().parent / "fixtures" / "tiny"
MARK = "<!-- example -->"
VOLATILE = [
    (re.compile(r"[\d.]+ [KMGT]?B read in [\d.]+ s \([\d.]+ [KMGT]?B/s\)"), "<size> read in <time> (<rate>)"),
    (re.compile(r"[\d.]+ [KMG]iB available"), "<free> available"),
    # The RAM headroom (and so the RAM total) is a share of the memory free when the plan is made.
    (re.compile(r"^(\s*(headroom|total)\s.*)$"), r"<\2: depends on free memory>"),
    (re.compile(r"[\d.]+ [KMG]iB with headroom"), "<total> with headroom"),
    (re.compile(r"\b\d+ days ago\b|\btoday\b"), "<age>"),
    (re.compile(r'("(?:prompt|generation)_(?:tokens_per_second|seconds)": )[\d.e-]+'), r"\1<t>"),
    (re.compile(r"in [\d.]+ s \([\d.]+ tokens/s, [\d.]+ items/s\)"), "in <t> (<rate>)"),
]


def normalise(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        original = line
        for pattern, placeholder in VOLATILE:
            line = pattern.sub(placeholder, line)
        # A centred line (a table caption) moves when its numbers change length.
        line = line.strip() if line != original else line.rstrip()
        # A table's columns, and its rules, widen with its widest value (the headroom grows with free memory).
        lines.append(re.sub(r"─+", "─", re.sub(r" {2,}", "  ", line)))
    while lines and not lines[-1]:
        lines.pop()
    return lines


def examples(text: str) -> list[tuple[int, str, list[str]]]:
    """(line index of the fence, command, expected lines) for each marked block."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() == MARK:
            fence = i + 1
            end = next(j for j in range(fence + 1, len(lines)) if lines[j].startswith("```"))
            command = lines[fence + 1].removeprefix("$ ")
            found.append((fence, command, lines[fence + 2 : end]))
    return found


def workdir(base: Path) -> Path:
    shutil.copytree(TINY, base / "tiny")
    (base / "home").mkdir()
    (base / "prompts.txt").write_text("What is 2+2?\nName a colour.\n\nSay hi.\n")
    run(base, "cascade-local convert tiny -o tiny-q4.gguf")
    return base


def run(cwd: Path, command: str) -> str:
    args = shlex.split(command)
    merge = args[-1] == "2>&1"
    args = [a for a in args if a != "2>&1"]
    assert args[0] == "cascade-local", command
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "100", "CASCADE_LOCAL_HOME": "home", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "cascade_local", *args[1:]], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else subprocess.PIPE)
    return result.stdout


def test_readme_examples_print_what_they_show(tmp_path):
    cwd = workdir(tmp_path)
    blocks = examples(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    for _, command, expected in blocks:
        got = normalise(run(cwd, command))
        want = normalise("\n".join(expected))
        if want and want[-1] == "...":
            want, got = want[:-1], got[: len(want) - 1]
        assert got == want, f"README example `{command}` is out of date; run: python tests/test_readme.py --write"


def write(base: Path) -> None:
    cwd = workdir(base)
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks = examples("\n".join(lines))
    outputs = [run(cwd, command).splitlines() for _, command, _ in blocks]  # in README order: they build on each other
    for (fence, _, expected), output in reversed(list(zip(blocks, outputs, strict=True))):
        if expected and expected[-1].strip() == "...":
            output = [*output[: len(expected) - 1], "..."]
        lines[fence + 2 : fence + 2 + len(expected)] = [line.rstrip() for line in output]
    README.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        raise SystemExit(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
