"""GPU throughput (issue 8): the offline workload, a fixed large batch, overlap parity, and where host time goes.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_throughput.py --out "$OUT"
    python3 benchmarks/gpu_throughput.py --tiny --models qwen2.5-0.5b     # a CPU dry run of the script

Sections (each with a time limit; results printed as they come, a table last, JSON in --out):
  parity   greedy tokens identical with and without overlap and with and without CUDA graphs
  offline  256 requests, input and output lengths uniform in [100, 1024], random ids, ignore_eos,
           temperature 0.6: output tok/s over the whole batch (nano-vllm's / vLLM's bench); steps, host time
  nooverlap the same workload with disable_overlap_schedule=True (first model only)
  fixed    64 prompts x 512 tokens x 256 new tokens vs transformers' batched generate, same run
  hfcb     transformers' continuous batching (generate_batch) on the first 32 requests of the workload
  busy     GPU-busy fraction of the steps of a shorter offline run, overlap on and off (torch.profiler, kernels)
  host     where the host time of a 256-row decode step goes (cProfile of the engine core, overlap on)
  batch1   batch-1 decode tok/s after a 128-token prompt, overlap on and off (issue 7's goal (b))
Builds the random-weight models with benchmarks/gpu_suite.py's helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_suite as gs  # noqa: E402
from host_profile import profile_core  # noqa: E402

GOALS = {"offline_tok_s": {"qwen2.5-0.5b": 40000, "qwen3-0.6b": 20000, "llama-3.2-1b": 20000},
         "fixed_ratio_vs_transformers": 10.0}


def workload(n: int, vocab: int, seed: int = 0, lo: int = 100, hi: int = 1024) -> tuple[list, list[int]]:
    rng = random.Random(seed)
    ins = [rng.randint(lo, hi) for _ in range(n)]
    outs = [rng.randint(lo, hi) for _ in range(n)]
    return [[rng.randint(0, vocab - 1) for _ in range(k)] for k in ins], outs


ENGINE_ARGS: dict = {}  # --engine-args: extra Engine(...) arguments for every engine of the run


def make_engine(folder: Path, **kw):
    from nbengine.engine import Engine

    return Engine(str(folder), device=gs.DEVICE, skip_tokenizer_init=True, random_seed=0, **{**ENGINE_ARGS, **kw})


def _vocab(name: str) -> int:
    return 4096 if gs.TINY else gs.MODELS[name][1]["vocab_size"]


def _n(full: int) -> int:
    return max(4, full // 16) if gs.TINY else full


def _lengths() -> tuple[int, int]:
    return (20, 60) if gs.TINY else (100, 1024)


def section_parity(name: str, folder: Path, res: dict) -> None:
    """bf16 with every request admitted at once (the same batches with and without overlap), and float32 with
    four running at a time (overlap admits one step later; float32 keeps the sums batch-size independent)."""
    ps = [p[:n] for p, n in zip(gs.prompts(8, 300, _vocab(name), 7), (3, 17, 40, 64, 100, 180, 250, 300))]
    sp = [{"temperature": 0, "max_new_tokens": m, "ignore_eos": True} for m in (5, 48, 20, 33, 48, 9, 40, 48)]
    out = {}
    for dtype, extra in (("bfloat16", {}), ("float32", {"max_running_requests": 4})):
        runs = {}
        for overlap in (True, False):
            for graphs in (True, False):
                with make_engine(folder, dtype=dtype, disable_overlap_schedule=not overlap,
                                 disable_cuda_graph=not graphs, max_total_tokens=65536, cuda_graph_max_bs=8,
                                 **extra) as llm:
                    runs[f"overlap={overlap},graphs={graphs}"] = [
                        o["output_ids"] for o in llm.generate(input_ids=ps, sampling_params=sp)]
        ref = runs["overlap=False,graphs=False"]
        out[dtype] = {k: v == ref for k, v in runs.items()}
        gs.log(f"  {name} parity {dtype}: {out[dtype]}")
    res[name] = out


def _offline(folder: Path, name: str, **kw) -> dict:
    ps, outs = workload(_n(256), _vocab(name), lo=_lengths()[0], hi=_lengths()[1])
    sp = [{"temperature": 0.6, "max_new_tokens": m, "ignore_eos": True} for m in outs]
    with make_engine(folder, **kw) as llm:
        core = llm._thread.core
        overlap = core.overlap
        llm.generate(input_ids=ps[:8], sampling_params=[{**s, "max_new_tokens": 16} for s in sp[:8]])  # warm
        t0, steps0, graph0 = core.runner.times.host_s, core.runner.times.steps, core.runner.times.graph_steps
        gs.sync()
        t = time.perf_counter()
        res = llm.generate(input_ids=ps, sampling_params=sp)
        gs.sync()
        wall = time.perf_counter() - t
        info = llm.get_server_info()
        times = core.runner.times
        steps = times.steps - steps0
    made = sum(len(o["output_ids"]) for o in res)
    assert made == sum(outs), (made, sum(outs))
    return {"tok_s": made / wall, "wall_s": wall, "output_tokens": made, "input_tokens": sum(map(len, ps)),
            "steps": steps, "graph_steps": times.graph_steps - graph0, "ms_per_step": 1e3 * wall / max(1, steps),
            "runner_host_ms_per_step": 1e3 * (times.host_s - t0) / max(1, steps),
            "kv_tokens": info["max_total_num_tokens"], "graphs": len(info["cuda_graph_batch_sizes"]),
            "preemptions": info["num_preemptions"], "overlap": overlap}


def section_offline(name: str, folder: Path, res: dict) -> None:
    res[name] = r = _offline(folder, name)
    gs.log(f"  {name} offline: {json.dumps(r)}")


def section_nooverlap(name: str, folder: Path, res: dict) -> None:
    res[name] = r = _offline(folder, name, disable_overlap_schedule=True)
    gs.log(f"  {name} offline, overlap off: {json.dumps(r)}")


def section_fixed(name: str, folder: Path, res: dict, n: int = 64, prompt_len: int = 512, new: int = 256) -> None:
    n, prompt_len, new = (_n(n), 32, 16) if gs.TINY else (n, prompt_len, new)
    ps = gs.prompts(n, prompt_len, _vocab(name), 9)
    sp = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}
    with make_engine(folder) as llm:
        llm.generate(input_ids=ps[:4], sampling_params={**sp, "max_new_tokens": 8})
        ours = gs.sync_time(lambda: llm.generate(input_ids=ps, sampling_params=sp))
    torch.cuda.empty_cache() if gs.DEVICE == "cuda" else None
    hf = gs.hf_model(folder)
    ids = torch.tensor(ps, device=gs.DEVICE)
    with torch.inference_mode():
        kw = dict(do_sample=False, pad_token_id=0)
        hf.generate(ids[:4], attention_mask=torch.ones_like(ids[:4]), max_new_tokens=4, min_new_tokens=4, **kw)
        peer = gs.sync_time(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                                min_new_tokens=new, **kw))
    del hf
    torch.cuda.empty_cache() if gs.DEVICE == "cuda" else None
    res[name] = {"tok_s": n * new / ours, "hf_tok_s": n * new / peer, "ratio": peer / ours}
    gs.log(f"  {name} fixed {n}x{prompt_len}x{new}: {json.dumps(res[name])}")


def section_hfcb(name: str, folder: Path, res: dict, n: int = 32) -> None:
    from transformers import GenerationConfig

    ps, outs = workload(_n(256), _vocab(name), lo=_lengths()[0], hi=_lengths()[1])
    ps, outs = ps[:n], outs[:n]
    hf = gs.hf_model(folder)
    # one max_new_tokens for the batch: the mean of the subset, so the token count matches on average
    mean_out = round(sum(outs) / len(outs))
    cfg = GenerationConfig(max_new_tokens=mean_out, do_sample=True, temperature=0.6, eos_token_id=-1)
    t = time.perf_counter()
    out = hf.generate_batch(ps, generation_config=cfg, progress_bar=False)
    gs.sync()
    wall = time.perf_counter() - t
    made = sum(len(o.generated_tokens) for o in out.values())
    del hf
    torch.cuda.empty_cache() if gs.DEVICE == "cuda" else None
    res[name] = {"tok_s": made / wall, "requests": n, "output_tokens": made, "wall_s": wall}
    gs.log(f"  {name} transformers generate_batch ({n} requests): {json.dumps(res[name])}")


def section_busy(name: str, folder: Path, res: dict, n: int = 256, new: int = 256) -> None:
    """The offline workload's 256 prompts with 256 new tokens each (the full workload would give the profiler
    ~300k kernel events): its prefill steps and its large-batch decode steps."""
    from torch.profiler import ProfilerActivity, profile

    ps, _ = workload(_n(n), _vocab(name), seed=3, lo=_lengths()[0], hi=_lengths()[1])
    sp = {"temperature": 0.6, "max_new_tokens": 16 if gs.TINY else new, "ignore_eos": True}
    out = {}
    for overlap in (True, False):
        with make_engine(folder, disable_overlap_schedule=not overlap) as llm:
            core = llm._thread.core
            llm.generate(input_ids=ps[:4], sampling_params={**sp, "max_new_tokens": 8})
            steps0 = core.runner.times.steps
            gs.sync()
            acts = [ProfilerActivity.CUDA] if gs.DEVICE == "cuda" else [ProfilerActivity.CPU]
            with profile(activities=acts) as prof:
                t = time.perf_counter()
                llm.generate(input_ids=ps, sampling_params=sp)
                gs.sync()
                wall = time.perf_counter() - t
            steps = core.runner.times.steps - steps0
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy = sum(e.device_time for e in kernels) / 1e6
        out[f"overlap={overlap}"] = {"gpu_busy_fraction": busy / wall, "steps": steps,
                                     "wall_ms_per_step": 1e3 * wall / max(1, steps),
                                     "gpu_ms_per_step": 1e3 * busy / max(1, steps),
                                     "kernels_per_step": len(kernels) / max(1, steps)}
    res[name] = out
    gs.log(f"  {name} busy ({n} requests x {new}): {json.dumps(out)}")


def section_batch1(name: str, folder: Path, res: dict, new: int = 256) -> None:
    """Issue 7's (b): batch-1 decode after a 128-token prompt, overlap on and off (median of 3)."""
    import statistics

    prompt = gs.prompts(1, 128, _vocab(name), 2)[0]
    new = 16 if gs.TINY else new
    sp = {"temperature": 0, "ignore_eos": True}
    out = {}
    for overlap in (True, False):
        with make_engine(folder, disable_overlap_schedule=not overlap, cuda_graph_max_bs=16,
                         max_total_tokens=65536) as llm:
            llm.generate(input_ids=prompt, sampling_params={**sp, "max_new_tokens": 16})
            t1 = statistics.median(gs.sync_time(lambda: llm.generate(input_ids=prompt, sampling_params={
                **sp, "max_new_tokens": 1})) for _ in range(3))
            tn = statistics.median(gs.sync_time(lambda: llm.generate(input_ids=prompt, sampling_params={
                **sp, "max_new_tokens": new + 1})) for _ in range(3))
        out[f"overlap={overlap}"] = {"tok_s": new / (tn - t1), "ms_per_token": 1e3 * (tn - t1) / new}
    res[name] = out
    gs.log(f"  {name} batch-1 decode: {json.dumps(out)}")


def section_host(name: str, folder: Path, res: dict) -> None:
    batch = 32 if gs.TINY else 256
    ms, text = profile_core(folder, batch, 30, 256 if not gs.TINY else 32, overlap=True, top=22,
                            device=gs.DEVICE, max_total_tokens=batch * 1024)
    res[name] = {"ms_per_step_profiled": ms, "profile": text}
    gs.log(f"  {name} host profile, {batch} rows, overlap on: {ms:.2f} ms/step under cProfile\n{text}")


# in order of value: a run that hits --deadline skips the rest
SECTIONS = {"offline": (section_offline, 90, 3), "fixed": (section_fixed, 60, 1), "nooverlap": (section_nooverlap, 60, 1),
            "busy": (section_busy, 60, 1), "host": (section_host, 45, 1), "batch1": (section_batch1, 60, 3),
            "parity": (section_parity, 120, 1),
            "hfcb": (section_hfcb, 90, 1)}


def table(results: dict) -> str:
    env = results.get("env", {})
    lines = [f"device: {env.get('device', '?')}  date {env.get('date')}  commit {env.get('commit')}",
             f"{'model':14} | {'offline tok/s':>13} | {'goal':>6} | {'ms/step':>7} | {'runner host':>11} | "
             f"{'steps':>5} | {'no-overlap tok/s':>16} | {'fixed tok/s':>11} | {'HF fixed':>8} | ratio"]
    for name in gs.MODELS:
        o = results.get("offline", {}).get(name, {})
        f = results.get("fixed", {}).get(name, {})
        no = results.get("nooverlap", {}).get(name, {})
        lines.append(f"{name:14} | {o.get('tok_s', 0):13.0f} | {GOALS['offline_tok_s'][name]:6d} | "
                     f"{o.get('ms_per_step', 0):7.2f} | {o.get('runner_host_ms_per_step', 0):11.3f} | "
                     f"{o.get('steps', 0):5d} | {no.get('tok_s', 0):16.0f} | {f.get('tok_s', 0):11.0f} | "
                     f"{f.get('hf_tok_s', 0):8.0f} | {f.get('ratio', 0):.1f}x")
    for name, r in results.get("hfcb", {}).items():
        lines.append(f"transformers generate_batch {name} ({r['requests']} requests): {r['tok_s']:.0f} tok/s")
    for name, r in results.get("busy", {}).items():
        for k, v in r.items():
            lines.append(f"busy {name} {k}: GPU busy {100 * v['gpu_busy_fraction']:.0f}%, {v['gpu_ms_per_step']:.2f} of "
                         f"{v['wall_ms_per_step']:.2f} ms/step, {v['kernels_per_step']:.0f} kernels/step")
    for name, r in results.get("batch1", {}).items():
        lines.append(f"batch-1 decode {name}: " + ", ".join(f"{k} {v['tok_s']:.0f} tok/s" for k, v in r.items()))
    for name, r in results.get("parity", {}).items():
        lines.append(f"parity {name}: {r}")
    lines.append(f"errors: {list(results.get('errors', {}))}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(gs.MODELS))
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model-dir", default="/tmp/nbengine-gpu-suite")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds: later sections are skipped or cut short")
    ap.add_argument("--engine-args", default="{}", help='JSON of extra Engine() arguments, e.g. \'{"disable_radix_cache": true}\'')
    args = ap.parse_args()
    ENGINE_ARGS.update(json.loads(args.engine_args))
    start = time.perf_counter()
    gs.TINY = args.tiny
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models, sections = args.models.split(","), args.sections.split(",")
    results: dict = {"errors": {}, "command": " ".join(sys.argv), "goals": GOALS, "env": {}}

    def attempt(key: str, fn, limit: int) -> None:
        t0 = time.perf_counter()
        limit = int(min(limit, args.deadline - (t0 - start)))
        if limit < 10:
            results["errors"][key] = "skipped: past the deadline"
            return
        try:
            with gs.time_limit(limit):
                fn()
        except BaseException as e:  # noqa: BLE001 - one failing section must not lose the run
            if isinstance(e, KeyboardInterrupt):
                raise
            results["errors"][key] = f"{type(e).__name__}: {e}"
            gs.log(f"!! {key} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        if gs.DEVICE == "cuda":
            torch.cuda.empty_cache()
        gs.log(f"-- {key} took {time.perf_counter() - t0:.1f}s")
        (out / "gpu_throughput.json").write_text(json.dumps(results, indent=1, default=str))

    attempt("env", lambda: gs.section_env(results["env"]), 30)
    folders: dict[str, Path] = {}
    for name in models:
        def build(name=name):
            folders[name] = gs.build_model(name, Path(args.model_dir))
        attempt(f"build/{name}", build, 120)
    for sec in sections:
        fn, limit, n_models = SECTIONS[sec]
        results.setdefault(sec, {})
        for name in [m for m in models if m in folders][:n_models]:
            attempt(f"{sec}/{name}", lambda fn=fn, name=name: fn(name, folders[name], results[sec]), limit)
    (out / "gpu_throughput.json").write_text(json.dumps(results, indent=1, default=str))
    gs.log("\n" + table(results))
    (out / "gpu_throughput_table.txt").write_text(table(results))


if __name__ == "__main__":
    main()
