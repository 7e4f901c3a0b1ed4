"""A/B of the engine thread's OpenMP team sizing (nbengine/layers/cpu_threads.py).

    python benchmarks/omp_team_ab.py --batch 64 --output-len 48 --pairs 4

Runs the same greedy batch through the Engine API with the sizing on and off (off: the engine
thread keeps torch's full OpenMP team for every op), in alternating fresh processes, and prints
each run's best-of-2 output tok/s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def one(mode: str, batch: int, out_len: int) -> float:
    import nbengine.layers.cpu_threads as ct

    if mode == "off":
        ct.omp_team.manage_this_thread = lambda: None
    from nbengine.engine import Engine

    with Engine(random_seed=0, max_running_requests=max(batch, 1)) as llm:
        tok = llm.tokenizer
        ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
        sp = {"temperature": 0, "max_new_tokens": out_len, "ignore_eos": True}
        llm.generate(input_ids=[ids] * batch, sampling_params=sp)
        best = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            llm.generate(input_ids=[ids] * batch, sampling_params=sp)
            best = max(best, batch * out_len / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(one(args.child, args.batch, args.output_len))
        return
    runs: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(args.pairs):
        for mode in ("on", "off"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(args.batch),
                                  "--output-len", str(args.output_len)], capture_output=True, text=True, check=True)
            runs[mode].append(float(out.stdout.strip().splitlines()[-1]))
    for mode, vals in runs.items():
        print(f"{mode:3s}: " + ", ".join(f"{v:.1f}" for v in sorted(vals)) + " tok/s")


if __name__ == "__main__":
    main()
