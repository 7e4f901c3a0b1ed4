"""A short soak: benchmarks/soak.py at a small size, in its own process. Hundreds of concurrent async
requests with random valid parameters, 10 % aborted at random moments (abort, leaving a stream,
cancelling the task), invalid requests mixed in, three rounds on one engine: every request ends
right, the pool is full after each round, and threads and memory do not grow.

oneDNN (ideep's and its own primitive cache) keeps compiled kernels per matrix shape, up to 1,024
entries each: a few hundred MB that fill up over the first rounds and then stay. The child process
turns both caches off so that memory growth measures nbengine alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_short_soak_every_request_ends_right_and_nothing_leaks(llama3_tok_model, tmp_path):
    # the Llama-3-style tiny model: a 600-token vocabulary keeps sampling cheap, so the soak fits in CI
    out = tmp_path / "soak.json"
    env = {**os.environ, "LRU_CACHE_CAPACITY": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--model", str(llama3_tok_model),
                           "--requests", "250", "--rounds", "3", "--seed", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["problems"] == 0 and summary["pool_full_after_every_round"]
    assert summary["requests"] == 750 and summary["aborted"] > 0 and summary["invalid"] > 0
    finish = summary["finish"]
    assert finish.get("length", 0) > 0 and finish.get("stop", 0) > 0 and finish.get("abort", 0) > 0
    assert len(set(summary["threads_per_round"])) == 1, summary["threads_per_round"]
    assert len(set(summary["live_tensors_per_round"])) == 1, summary["live_tensors_per_round"]
    objects = summary["python_objects_per_round"]
    assert max(objects) - min(objects) < 0.02 * min(objects), objects  # nothing accumulates per request
    rss = summary["rss_mb_per_round"]
    assert max(rss) - min(rss) < 32, rss
