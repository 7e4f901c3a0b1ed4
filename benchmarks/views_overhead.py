"""What the issue-14 views cost: the dashboard's overhead on engine throughput, and the message rate
of a streaming probability view.

1. Throughput of a batch (default: 8 prompts x 64 tokens, greedy, the default model) with and
   without a live ``Dashboard`` refreshing every 0.5 s (its widget's comm is ipywidgets' dummy
   outside a kernel: the cost measured is the snapshot, the render and the GIL they take — the
   comm send of one ~3 KB message is the kernel's, off the engine thread). Runs alternate
   (off, on, off, on, ...), best of ``--repeat`` (5) each; on a busy machine that A/B is
   noisier than 2 %, so the refresh thread's own CPU time over the time it ran is reported too
   (an upper bound of what it can take from the engine), and what one ``info()`` costs the
   engine thread.
2. ``%%generate --show probs`` (200 tokens) on an in-process IPython shell: display refreshes per
   second (all of them, and the most in any 1-second window) and mime messages sent.

    PYTHONPATH=$PWD python3 benchmarks/views_overhead.py [--repeat 5] [--prompts 8] [--tokens 64]

Prints a table and writes benchmarks/results/views_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from nbengine import Engine

ROOT = Path(__file__).resolve().parents[1]


def throughput(llm: Engine, prompts: list[str], tokens: int) -> float:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True})
    return sum(o["meta_info"]["completion_tokens"] for o in outs) / (time.perf_counter() - t0)


def dashboard_overhead(llm: Engine, args: argparse.Namespace) -> dict:
    from nbengine.notebook.dashboard import Dashboard

    prompts = [f"Write a story about robot number {i}." for i in range(args.prompts)]
    throughput(llm, prompts, 8)  # warm up
    runs: dict[str, list[float]] = {"off": [], "on": []}
    refreshes, cpu_s, wall_on = 0, 0.0, 0.0
    for _ in range(args.repeat):
        runs["off"].append(throughput(llm, prompts, args.tokens))
        dash = Dashboard(llm, interval=0.5)
        dash.start()  # refreshing, not displayed (no kernel here)
        t0 = time.perf_counter()
        try:
            runs["on"].append(throughput(llm, prompts, args.tokens))
        finally:
            wall_on += time.perf_counter() - t0
            dash.close()
        refreshes += dash.num_refreshes
        cpu_s += dash.cpu_s
    # what the engine thread itself does for a refresh: one info() between two steps
    core = llm._thread.live_core()
    t0 = time.perf_counter()
    for _ in range(1000):
        core.info()
    info_us = 1e6 * (time.perf_counter() - t0) / 1000
    best_off, best_on = max(runs["off"]), max(runs["on"])
    return {"runs_tok_per_s": runs, "best_off": best_off, "best_on": best_on,
            "overhead_pct": 100 * (best_off - best_on) / best_off, "dashboard_refreshes_sent": refreshes,
            "dashboard_cpu_s": cpu_s, "wall_s_with_dashboard": wall_on,
            # upper bound of the cost: the refresh thread's CPU time as a share of the time it ran
            "cpu_share_pct": 100 * cpu_s / wall_on, "engine_thread_info_us": info_us}


def probs_message_rate(tokens: int) -> dict:
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from nbengine.notebook import api

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbengine")
    llm = ip.magics_manager.registry["NBEngineMagics"].registry.get(None)[1]
    with capture_output() as cap:
        run = api.execute(api.prepare_run(llm, ["1, 2, 3, 4, 5,"], {"max_new_tokens": tokens, "temperature": 0},
                                          chat=False, trace=True, show="probs", ui="text"))
    times = [t for t, _ in run.trace["refreshes"]]
    elapsed = run.t_end - run.t_start
    peak = max(sum(1 for u in times if t <= u < t + 1.0) for t in times) if times else 0
    messages = len(cap.outputs)
    ip.run_line_magic("unload_ext", "nbengine")
    return {"tokens": run.tokens, "elapsed_s": elapsed, "refreshes": len(times),
            "refreshes_per_s": len(times) / elapsed, "peak_refreshes_in_1s": peak,
            "mime_messages": messages, "mime_messages_per_s": messages / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    llm = Engine()
    try:
        dash = dashboard_overhead(llm, args)
    finally:
        llm.shutdown()
    rate = probs_message_rate(200)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args),
              "dashboard": dash, "probs_view": rate}
    print(f"dashboard: best off {dash['best_off']:.1f} tok/s, best on {dash['best_on']:.1f} tok/s, "
          f"overhead {dash['overhead_pct']:+.2f} % (runs {dash['runs_tok_per_s']}); "
          f"{dash['dashboard_refreshes_sent']} refreshes sent; dashboard thread CPU {dash['dashboard_cpu_s']:.3f} s "
          f"over {dash['wall_s_with_dashboard']:.1f} s = {dash['cpu_share_pct']:.3f} %; "
          f"info() on the engine thread {dash['engine_thread_info_us']:.1f} us")
    print(f"--show probs: {rate['tokens']} tokens in {rate['elapsed_s']:.1f} s, {rate['refreshes']} refreshes "
          f"({rate['refreshes_per_s']:.1f}/s, peak {rate['peak_refreshes_in_1s']} in 1 s), "
          f"{rate['mime_messages']} mime messages ({rate['mime_messages_per_s']:.1f}/s)")
    out = ROOT / "benchmarks" / "results" / "views_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
