"""Runs llama.cpp's own convert_hf_to_gguf.py as the converter benchmark's baseline.

llama.cpp picks a BPE pre-tokenizer by hashing sample tokenizations and refuses any tokenizer it
has not seen, the fixture's included, so this wrapper answers that one question ("tekken", which is
what the fixture's split regex is) and leaves everything else untouched. Needs a Python with torch
and transformers, and a llama.cpp source tree (llama-cpp-python's sdist carries one under vendor/):

    LLAMA_CPP_DIR=/path/to/llama.cpp LLAMA_CPP_CONVERT=bench/llama_cpp_convert.py \\
    LLAMA_CPP_PYTHON=/path/to/python-with-torch .venv/bin/python bench/convert_bench.py
"""

import os
import runpy
import sys

root = os.environ["LLAMA_CPP_DIR"]
sys.path[:0] = [root, os.path.join(root, "gguf-py")]

import conversion.base as base  # noqa: E402 - importable only once the llama.cpp tree is on the path

for cls in vars(base).values():
    if isinstance(cls, type) and hasattr(cls, "get_vocab_base_pre"):
        cls.get_vocab_base_pre = lambda self, tokenizer: "tekken"

sys.argv[0] = os.path.join(root, "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
