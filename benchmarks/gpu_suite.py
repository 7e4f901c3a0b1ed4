"""GPU suite: builds random-weight models from configs, checks correctness against transformers,
and times nbengine against transformers on the same card, in one run.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out "$OUT"          # everything
    python3 benchmarks/gpu_suite.py --models qwen2.5-0.5b --sections decode,ttft

Sections (each in its own try/except with a time limit, printed as it goes):
  env       device, versions, measured copy bandwidth
  correct   greedy tokens vs transformers (bf16; fp16 on the first model), graphs == eager,
            seeded sampling reproducible
  decode    (b) batch-1 decode tok/s after a 128-token prompt, host time per step; transformers peer
  ttft      (c) time to first token of a 1,024-token prompt; transformers peer
  ready     Engine() ready time (graph capture included), first in the process and again
  profile   launches per decode step, GPU-busy fraction, top kernels (graphs and eager)
Prints a table last and writes JSON (and the log, when --out is given) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = {
    "qwen2.5-0.5b": ("Qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "qwen3-0.6b": ("Qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                 tie_word_embeddings=True)),
    "llama-3.2-1b": ("Llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                   max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True,
                                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
}
TINY = False
GOALS = {"decode_tok_s": {"llama-3.2-1b": 1000, "qwen2.5-0.5b": 1500}, "ttft_ms": {"qwen2.5-0.5b": 8.0},
         "ready_s": {"llama-3.2-1b": 20.0}}
TIE_TOL = 0.1  # a greedy token may differ only where transformers' own top two logits are this close
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script itself (--tiny)


class SectionTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int):
    def fire(*_):
        raise SectionTimeout(f"over {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def log(*args) -> None:
    print(*args, flush=True)


# ------------------------------------------------------------------ models
def build_model(name: str, root: Path) -> Path:
    import transformers

    family, cfg = MODELS[name]
    out = root / name
    if TINY:
        cfg = {**cfg, "num_hidden_layers": 2, "vocab_size": 4096}
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**cfg, bos_token_id=1, eos_token_id=2)
    with torch.device(DEVICE):
        model = getattr(transformers, f"{family}ForCausalLM")(config).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def hf_model(folder: Path, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(DEVICE).eval()


def engine(folder: Path, **kw):
    from nbengine.engine import Engine

    kw.setdefault("max_total_tokens", 65536)
    if DEVICE == "cuda":
        kw.setdefault("cuda_graph_max_bs", 16)
    return Engine(str(folder), device=DEVICE, skip_tokenizer_init=True, random_seed=0, **kw)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def sync_time(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ sections
def section_env(res: dict) -> None:
    import transformers
    import triton

    if DEVICE == "cpu":
        res.update(device="cpu (dry run)", copy_tb_s=0.0, date=time.strftime("%Y-%m-%d %H:%M"))
        return
    p = torch.cuda.get_device_properties(0)
    res.update(device=torch.cuda.get_device_name(0), sms=p.multi_processor_count, torch=torch.__version__,
               triton=triton.__version__, transformers=transformers.__version__,
               date=time.strftime("%Y-%m-%d %H:%M"), commit=os.environ.get("NBENGINE_COMMIT", "?"))
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    t = min(sync_time(lambda: y.copy_(x)) for _ in range(10))
    res["copy_tb_s"] = 2 * x.numel() / t / 1e12
    del x, y
    log(f"env: {res}")


def first_divergence(ours, ref, hf, prompt) -> dict:
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            ids = torch.tensor([prompt + ref[:i]], device=DEVICE)
            with torch.inference_mode():
                top2 = hf(ids).logits[0, -1].float().topk(2).values
            margin = (top2[0] - top2[1]).item()
            return {"at": i, "hf_top2_margin": margin, "tie": margin < TIE_TOL}
    return {"at": None}


def section_correct(name: str, folder: Path, res: dict) -> None:
    vocab = 4096 if TINY else MODELS[name][1]["vocab_size"]
    ps = [p[: n] for p, n in zip(prompts(4, 250, vocab, 1), (7, 33, 100, 250))]
    sp = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    out = {}
    for dtype in (["bfloat16", "float16"] if name == "qwen2.5-0.5b" else ["bfloat16"]):
        tdt = getattr(torch, dtype)
        with engine(folder, dtype=dtype) as llm:
            ours = [o["output_ids"] for o in llm.generate(input_ids=ps, sampling_params=sp)]
        with engine(folder, dtype=dtype, disable_cuda_graph=True) as llm:
            eager = [o["output_ids"] for o in llm.generate(input_ids=ps, sampling_params=sp)]
        hf = hf_model(folder, tdt)
        divs = []
        for p, o in zip(ps, ours):
            with torch.inference_mode():
                ref = hf.generate(torch.tensor([p], device=DEVICE), do_sample=False, max_new_tokens=24,
                                  min_new_tokens=24)[0, len(p):].tolist()
            divs.append(first_divergence(o, ref, hf, p))
        del hf
        torch.cuda.empty_cache()
        ok = all(d["at"] is None or d["tie"] for d in divs)
        out[dtype] = {"agree_with_transformers": ok, "divergences": divs, "graphs_equal_eager": ours == eager}
        log(f"  {name} {dtype}: agree={ok} graphs==eager={ours == eager} {divs}")
    seeded = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 16, "seed": 11, "ignore_eos": True}
    with engine(folder) as llm:
        a = llm.generate(input_ids=ps[1], sampling_params=seeded)["output_ids"]
        b = llm.generate(input_ids=ps, sampling_params=[seeded if i == 1 else {**seeded, "seed": None}
                                                        for i in range(4)])[1]["output_ids"]
    out["seeded_reproducible"] = a == b
    log(f"  {name} seeded sampling reproducible: {a == b}")
    res[name] = out


def section_decode(name: str, folder: Path, res: dict, new_tokens: int = 256) -> None:
    vocab = 4096 if TINY else MODELS[name][1]["vocab_size"]
    prompt = prompts(1, 128, vocab, 2)[0]
    sp = {"temperature": 0, "ignore_eos": True}
    with engine(folder) as llm:
        runner = llm._thread.core.runner
        llm.generate(input_ids=prompt, sampling_params={**sp, "max_new_tokens": 16})  # warm
        t1 = statistics.median(sync_time(lambda: llm.generate(input_ids=prompt, sampling_params={
            **sp, "max_new_tokens": 1})) for _ in range(3))
        steps0, host0 = runner.times.steps, runner.times.host_s
        tn = statistics.median(sync_time(lambda: llm.generate(input_ids=prompt, sampling_params={
            **sp, "max_new_tokens": new_tokens + 1})) for _ in range(3))
        host_ms = 1e3 * (runner.times.host_s - host0) / max(1, runner.times.steps - steps0)
    ours = new_tokens / (tn - t1)
    # the peer: transformers' generate, batch 1, default (dynamic) cache, sdpa
    hf = hf_model(folder)
    ids = torch.tensor([prompt], device=DEVICE)
    n_hf = 48
    with torch.inference_mode():
        hf.generate(ids, do_sample=False, max_new_tokens=4, min_new_tokens=4)
        h1 = sync_time(lambda: hf.generate(ids, do_sample=False, max_new_tokens=1, min_new_tokens=1))
        hn = sync_time(lambda: hf.generate(ids, do_sample=False, max_new_tokens=n_hf + 1, min_new_tokens=n_hf + 1))
    del hf
    torch.cuda.empty_cache()
    peer = n_hf / (hn - h1)
    res[name] = {"tok_s": ours, "ms_per_token": 1e3 / ours, "host_ms_per_step": host_ms, "hf_tok_s": peer,
                 "ratio": ours / peer}
    log(f"  {name} decode: {ours:.0f} tok/s ({1e3 / ours:.3f} ms/token, host {host_ms:.3f} ms/step); "
        f"transformers {peer:.1f} tok/s")


def section_ttft(name: str, folder: Path, res: dict) -> None:
    vocab = 4096 if TINY else MODELS[name][1]["vocab_size"]
    ps = prompts(6, 1024, vocab, 3)
    sp = {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True}
    with engine(folder) as llm:
        llm.generate(input_ids=ps[0], sampling_params=sp)
        ours = statistics.median(sync_time(lambda p=p: llm.generate(input_ids=p, sampling_params=sp)) for p in ps[1:])
    hf = hf_model(folder)
    with torch.inference_mode():
        hf(torch.tensor([ps[0]], device=DEVICE), logits_to_keep=1).logits[0, -1].argmax().item()
        peer = statistics.median(sync_time(lambda p=p: hf(torch.tensor([p], device=DEVICE), logits_to_keep=1)
                                           .logits[0, -1].argmax().item()) for p in ps[1:])
    del hf
    torch.cuda.empty_cache()
    res[name] = {"ms": 1e3 * ours, "hf_ms": 1e3 * peer, "ratio": peer / ours}
    log(f"  {name} TTFT(1024): {1e3 * ours:.2f} ms; transformers {1e3 * peer:.2f} ms")


def section_ready(name: str, folder: Path, res: dict) -> None:
    from nbengine.engine import Engine

    out = {}
    for label in ("first", "again"):
        t0 = time.perf_counter()
        llm = Engine(str(folder), device=DEVICE, skip_tokenizer_init=True)  # defaults: pool from free memory
        ready = time.perf_counter() - t0
        info = llm.get_server_info()
        llm.shutdown()
        torch.cuda.empty_cache()
        out[label] = {"ready_s": ready, "warmup_s": info.get("warmup_s"),
                      "capture_s": info.get("cuda_graph_capture_s"), "graphs": len(info["cuda_graph_batch_sizes"]),
                      "kv_tokens": info["max_total_num_tokens"]}
        log(f"  {name} Engine() {label}: {out[label]}")
    res[name] = out


def section_profile(name: str, folder: Path, res: dict, steps: int = 32) -> None:
    from torch.profiler import ProfilerActivity, profile

    vocab = 4096 if TINY else MODELS[name][1]["vocab_size"]
    prompt = prompts(1, 128, vocab, 4)[0]
    sp = {"temperature": 0, "ignore_eos": True}
    out = {}
    for mode, kw in (("graphs", {}), ("eager", {"disable_cuda_graph": True})):
        with engine(folder, **kw) as llm:
            llm.generate(input_ids=prompt, sampling_params={**sp, "max_new_tokens": 8})
            sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                llm.generate(input_ids=prompt, sampling_params={**sp, "max_new_tokens": steps + 1})
                sync()
                wall = time.perf_counter() - t0
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy = sum(e.device_time for e in kernels) / 1e6  # us -> s
        by_name: dict[str, float] = {}
        for e in kernels:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
        out[mode] = {"kernels_per_step": len(kernels) / (steps + 1), "gpu_busy_fraction": busy / wall,
                     "wall_ms_per_step": 1e3 * wall / (steps + 1), "gpu_ms_per_step": 1e3 * busy / (steps + 1),
                     "top_kernels_us_per_step": [(n[:80], t / (steps + 1)) for n, t in top]}
        log(f"  {name} profile {mode}: {json.dumps(out[mode], indent=1)}")
    res[name] = out


SECTIONS = {"correct": (section_correct, 240), "decode": (section_decode, 150), "ttft": (section_ttft, 90),
            "ready": (section_ready, 120), "profile": (section_profile, 120)}
PER_MODEL = {"correct": None, "decode": None, "ttft": None, "ready": ["llama-3.2-1b"], "profile": ["llama-3.2-1b"]}


def table(results: dict) -> str:
    lines = [f"device: {results.get('env', {}).get('device', '?')}   "
             f"copy {results.get('env', {}).get('copy_tb_s', 0):.2f} TB/s   date {results.get('env', {}).get('date')}",
             f"{'model':14} | {'decode tok/s':>12} | {'ms/tok':>7} | {'host ms':>7} | {'HF tok/s':>8} | "
             f"{'TTFT ms':>8} | {'HF TTFT':>8} | agree"]
    for name in MODELS:
        d = results.get("decode", {}).get(name, {})
        t = results.get("ttft", {}).get(name, {})
        c = results.get("correct", {}).get(name, {})
        agree = ",".join(f"{k[:4]}={'y' if v['agree_with_transformers'] else 'N'}" for k, v in c.items()
                         if isinstance(v, dict))
        lines.append(f"{name:14} | {d.get('tok_s', 0):12.0f} | {d.get('ms_per_token', 0):7.3f} | "
                     f"{d.get('host_ms_per_step', 0):7.3f} | {d.get('hf_tok_s', 0):8.1f} | {t.get('ms', 0):8.2f} | "
                     f"{t.get('hf_ms', 0):8.2f} | {agree}")
    for name, r in results.get("ready", {}).items():
        f, a = r.get("first", {}), r.get("again", {})
        lines.append(f"Engine() ready {name}: first {f.get('ready_s')}s (warm-up {f.get('warmup_s')}s, capture "
                     f"{f.get('capture_s')}s), again {a.get('ready_s')}s")
    for name, r in results.get("profile", {}).items():
        for mode, p in r.items():
            lines.append(f"profile {name} {mode}: {p['kernels_per_step']:.0f} kernels/step, GPU busy "
                         f"{100 * p['gpu_busy_fraction']:.0f}%, {p['gpu_ms_per_step']:.3f} GPU ms of "
                         f"{p['wall_ms_per_step']:.3f} ms/step")
    lines.append(f"errors: {list(results.get('errors', {}))}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sections", default="env," + ",".join(SECTIONS))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model-dir", default="/tmp/nbengine-gpu-suite")
    ap.add_argument("--tiny", action="store_true", help="2-layer models with a 4k vocabulary: a dry run of the script")
    args = ap.parse_args()
    global TINY
    TINY = args.tiny
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models, sections = args.models.split(","), args.sections.split(",")
    results: dict = {"errors": {}, "command": " ".join(sys.argv)}

    def attempt(key: str, fn, limit: int) -> None:
        t0 = time.perf_counter()
        try:
            with time_limit(limit):
                fn()
        except BaseException as e:  # noqa: BLE001 - one failing section must not lose the run
            if isinstance(e, KeyboardInterrupt):
                raise
            results["errors"][key] = f"{type(e).__name__}: {e}"
            log(f"!! {key} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        log(f"-- {key} took {time.perf_counter() - t0:.1f}s")
        (out / "gpu_suite.json").write_text(json.dumps(results, indent=1, default=str))

    if "env" in sections:
        results["env"] = {}
        attempt("env", lambda: section_env(results["env"]), 60)
    folders: dict[str, Path] = {}
    for name in models:
        def build(name=name):
            folders[name] = build_model(name, Path(args.model_dir))
        attempt(f"build/{name}", build, 120)
    for sec in sections:
        if sec not in SECTIONS:
            continue
        fn, limit = SECTIONS[sec]
        results.setdefault(sec, {})
        for name in models:
            if name not in folders or (PER_MODEL[sec] and name not in PER_MODEL[sec]):
                continue
            attempt(f"{sec}/{name}", lambda fn=fn, name=name: fn(name, folders[name], results[sec]), limit)
    results["goals"] = GOALS
    (out / "gpu_suite.json").write_text(json.dumps(results, indent=1, default=str))
    log("\n" + table(results))


if __name__ == "__main__":
    main()
