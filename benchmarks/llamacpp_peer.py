"""llama.cpp (llama-cpp-python) as a benchmark peer, on the same GGUF file as nbengine's default model.

llama-cpp-python ships as a source distribution; building it takes ~15 minutes on a 2-core machine.
:func:`ensure_llama_cpp` imports it, or installs a wheel cached in ``~/.cache/nbengine/wheels``, or
builds that wheel once (``nice``-d, for this CPU) and installs it:

    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \\
        nice -n 19 pip wheel --no-deps llama_cpp_python==0.3.36 -w ~/.cache/nbengine/wheels
    pip install ~/.cache/nbengine/wheels/llama_cpp_python-0.3.36-*.whl

``GGML_NATIVE`` compiles ggml's CPU kernels for the building machine (AVX2 / AVX-512 / VNNI as
present), so the cached wheel is for this CPU only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

VERSION = "0.3.36"
WHEEL_DIR = Path(os.environ.get("NBENGINE_CACHE", Path.home() / ".cache" / "nbengine")).expanduser() / "wheels"
CMAKE_ARGS = "-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_CURL=OFF"


def ensure_llama_cpp():
    try:
        import llama_cpp

        return llama_cpp
    except ImportError:
        pass
    wheels = sorted(WHEEL_DIR.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    if not wheels:
        print(f"building llama-cpp-python {VERSION} (~15 min on 2 cores; once: the wheel is cached in {WHEEL_DIR})",
              file=sys.stderr)
        WHEEL_DIR.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        subprocess.run(["nice", "-n", "19", sys.executable, "-m", "pip", "wheel", "--no-deps",
                        f"llama_cpp_python=={VERSION}", "-w", str(WHEEL_DIR)], check=True, env=env)
        wheels = sorted(WHEEL_DIR.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(wheels[-1])], check=True)
    import llama_cpp

    return llama_cpp


def load(gguf: str, n_ctx: int, threads: int):
    llama_cpp = ensure_llama_cpp()
    return llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                           seed=0, verbose=False)


def greedy(llm, prompt: list[int], n: int) -> tuple[int, float]:
    """Generate exactly ``n`` tokens greedily (EOS ignored); returns (tokens, seconds to the first)."""
    llm.reset()  # else generate() reuses the KV of a common prefix (nbengine has no prefix cache yet)
    t0 = time.perf_counter()
    first = 0.0
    count = 0
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        count += 1
        if count == 1:
            first = time.perf_counter() - t0
        if count >= n:
            break
    return count, first


def run(gguf: str, prompts: list[list[int]], output_len: int, threads: int) -> dict:
    """One prompt at a time (llama-cpp-python has no batched generate), like a notebook user would."""
    t0 = time.perf_counter()
    llm = load(gguf, n_ctx=max(len(p) for p in prompts) + output_len + 8, threads=threads)
    start_s = time.perf_counter() - t0
    greedy(llm, prompts[0], 4)  # warm-up
    t0 = time.perf_counter()
    n_out = sum(greedy(llm, p, output_len)[0] for p in prompts)
    wall = time.perf_counter() - t0
    del llm
    return {"backend": "llamacpp", "output_tokens": n_out, "seconds": wall, "tok_s": n_out / wall,
            "engine_start_s": start_s}


def first_token_s(gguf: str, prompt: list[int], threads: int, tries: int = 3) -> float:
    llm = load(gguf, n_ctx=len(prompt) + 16, threads=threads)
    greedy(llm, prompt, 1)
    best = min(greedy(llm, prompt, 1)[1] for _ in range(tries))
    del llm
    return best
