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
    sp = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
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
                ref = hf.generate(torch.tensor([p], device=DEVICE), do_sample=False, max_new_tokens=16,
                                  min_new_tokens=16)[0, len(p):].tolist()
            divs.append(first_divergence(o, ref, hf, p))
        del hf
        torch.cuda.empty_cache()
        ok = all(d["at"] is None or d["tie"] for d in divs)
        out[dtype] = {"agree_with_transformers": ok, "divergences": divs, "graphs_equal_eager": ours == eager}
        log(f"  {name} {dtype}: agree={ok} graphs==eager={ours == eager} {divs}")
    seeded = {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 16, "seed": 11, "ignore_eos": True}
    batch_sp = [seeded if i == 1 else {**seeded, "seed": 100 + i} for i in range(4)]
    with engine(folder) as llm:
        alone = [llm.generate(input_ids=ps[1], sampling_params=seeded)["output_ids"] for _ in range(2)]
        batch = [llm.generate(input_ids=ps, sampling_params=batch_sp) for _ in range(2)]
    out["seeded_reproducible"] = alone[0] == alone[1] and [o["output_ids"] for o in batch[0]] == [
        o["output_ids"] for o in batch[1]]
    # informational: bf16 GEMMs differ by batch size, so a seeded request in a batch may sample differently
    out["seeded_same_alone_and_in_batch"] = alone[0] == batch[0][1]["output_ids"]
    log(f"  {name} seeded sampling reproducible: {out['seeded_reproducible']}, "
        f"same alone and in a batch: {out['seeded_same_alone_and_in_batch']}")
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
    with engine(folder, disable_cuda_graph=True) as llm:
        llm.generate(input_ids=prompt, sampling_params={**sp, "max_new_tokens": 8})
        e1 = sync_time(lambda: llm.generate(input_ids=prompt, sampling_params={**sp, "max_new_tokens": 1}))
        en = sync_time(lambda: llm.generate(input_ids=prompt, sampling_params={**sp, "max_new_tokens": 65}))
    eager = 64 / (en - e1)
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
                 "ratio": ours / peer, "eager_tok_s": eager}
    log(f"  {name} decode: {ours:.0f} tok/s ({1e3 / ours:.3f} ms/token, host {host_ms:.3f} ms/step); "
        f"transformers {peer:.1f} tok/s; eager (no graphs) {eager:.0f} tok/s")


def section_ttft(name: str, folder: Path, res: dict) -> None:
    vocab = 4096 if TINY else MODELS[name][1]["vocab_size"]
    ps = prompts(6, 1024, vocab, 3)
    sp = {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True}
    with engine(folder) as llm:
        runner = llm._thread.core.runner
        llm.generate(input_ids=ps[0], sampling_params=sp)
        steps0, host0 = runner.times.steps, runner.times.host_s
        ours = statistics.median(sync_time(lambda p=p: llm.generate(input_ids=p, sampling_params=sp)) for p in ps[1:])
        host_ms = 1e3 * (runner.times.host_s - host0) / max(1, runner.times.steps - steps0)
    hf = hf_model(folder)
    with torch.inference_mode():
        hf(torch.tensor([ps[0]], device=DEVICE), logits_to_keep=1).logits[0, -1].argmax().item()
        peer = statistics.median(sync_time(lambda p=p: hf(torch.tensor([p], device=DEVICE), logits_to_keep=1)
                                           .logits[0, -1].argmax().item()) for p in ps[1:])
    del hf
    torch.cuda.empty_cache()
    res[name] = {"ms": 1e3 * ours, "host_ms_of_step": host_ms, "hf_ms": 1e3 * peer, "ratio": peer / ours}
    log(f"  {name} TTFT(1024): {1e3 * ours:.2f} ms (host {host_ms:.2f} ms in the step); "
        f"transformers {1e3 * peer:.2f} ms")


READY_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
from nbengine.engine import Engine
t1 = time.perf_counter()
llm = Engine(sys.argv[1], device="cuda", skip_tokenizer_init=True)
t2 = time.perf_counter()
out = llm.generate(input_ids=list(range(100, 228)), sampling_params={"max_new_tokens": 8, "temperature": 0})
t3 = time.perf_counter()
info = llm.get_server_info()
print(json.dumps({"import_s": t1 - t0, "ready_s": t2 - t1, "first_request_s": t3 - t2, "warmup_s": info.get("warmup_s"),
                  "capture_s": info.get("cuda_graph_capture_s"), "graphs": len(info["cuda_graph_batch_sizes"]),
                  "kv_tokens": info["max_total_num_tokens"]}))
"""


def section_ready(name: str, folder: Path, res: dict) -> None:
    """Engine() with its defaults in a fresh process: first with an empty Triton cache (every kernel
    compiles), then again (kernels from the disk cache), as a new notebook session would see it."""
    import subprocess
    import tempfile

    cache = tempfile.mkdtemp(prefix="triton-cache-")
    out = {}
    for label in ("cold_triton_cache", "warm_triton_cache"):
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        r = subprocess.run([sys.executable, "-c", READY_SNIPPET, str(folder)], env=env, capture_output=True,
                           text=True, timeout=100)
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        out[label] = json.loads(lines[-1]) if lines else {"error": r.stderr[-2000:]}
        log(f"  {name} Engine() {label}: {out[label]}")
    res[name] = out


def _kernel_summary(prof, wall: float, steps: int) -> dict:
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time for e in kernels) / 1e6  # us -> s
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"kernels_per_step": len(kernels) / steps, "gpu_busy_fraction": busy / wall,
            "wall_ms_per_step": 1e3 * wall / steps, "gpu_ms_per_step": 1e3 * busy / steps,
            "top_kernels_us_per_step": [(n[:70], round(t / steps, 2)) for n, t in top]}


def section_profile(name: str, folder: Path, res: dict, steps: int = 32) -> None:
    from torch.profiler import ProfilerActivity, profile

    vocab = 4096 if TINY else MODELS[name][1]["vocab_size"]
    prompt = prompts(1, 128, vocab, 4)[0]
    long_prompt = prompts(2, 1024, vocab, 5)
    sp = {"temperature": 0, "ignore_eos": True}
    out = {}
    modes = [("graphs", {})] + ([("eager", {"disable_cuda_graph": True})] if name == "llama-3.2-1b" else [])
    for mode, kw in modes:
        with engine(folder, **kw) as llm:
            llm.generate(input_ids=prompt, sampling_params={**sp, "max_new_tokens": 8})
            llm.generate(input_ids=long_prompt[0], sampling_params={**sp, "max_new_tokens": 1})
            sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                llm.generate(input_ids=prompt, sampling_params={**sp, "max_new_tokens": steps + 1})
                sync()
                wall = time.perf_counter() - t0
            out[f"decode_{mode}"] = _kernel_summary(prof, wall, steps + 1)
            if mode == "graphs":  # one 1024-token prefill (an eager step)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    t0 = time.perf_counter()
                    llm.generate(input_ids=long_prompt[1], sampling_params={**sp, "max_new_tokens": 1})
                    sync()
                    wall = time.perf_counter() - t0
                out["prefill_1024"] = _kernel_summary(prof, wall, 1)
        for k in out:
            log(f"  {name} profile {k}: {json.dumps(out[k])}")
    res[name] = out


def section_launch(name: str, folder: Path, res: dict, n: int = 300) -> None:
    """Host cost of one launch (a torch op, a Triton kernel), of writing a decode step's metadata,
    and the GPU time of one batch-1 decode graph replay."""
    from nbengine.batch_plan import BatchPlan
    from nbengine.kernels.norm import add_rms_norm

    def host_us(fn) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        sync()
        return 1e6 * t / n

    x = torch.randn(1, 2048, device=DEVICE, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.ones(2048, device=DEVICE, dtype=torch.bfloat16)
    out = {"torch_add_us": host_us(lambda: torch.add(x, r)),
           "triton_rms_norm_us": host_us(lambda: add_rms_norm(x, r, w, 1e-6))}
    with engine(folder, cuda_graph_max_bs=1) as llm:
        runner = llm._thread.core.runner
        plan = BatchPlan(16, ids=[5], positions=[130], slots=[16 * 9 + 2], seq_lens=[131], q_lens=[1],
                         q_starts=[0, 1], tables=[list(range(1, 10))], logits_rows=[0], sample_rows=[0],
                         num_decodes=1)
        out["write_metadata_us"] = llm._thread.call(lambda: host_us(lambda: runner.buffers.write(plan, pad_to=1)))
        out["graph_replay_gpu_us"] = llm._thread.call(
            lambda: 1e6 * sync_time(lambda: [runner.graphs.replay(plan) for _ in range(30)]) / 30)
    res[name] = out
    log(f"  {name} launch costs: {out}")


SECTIONS = {"correct": (section_correct, 150), "decode": (section_decode, 90), "ttft": (section_ttft, 60),
            "profile": (section_profile, 90), "launch": (section_launch, 60), "ready": (section_ready, 200)}
PER_MODEL = {"correct": None, "decode": None, "ttft": None, "ready": ["llama-3.2-1b"], "launch": None,
             "profile": None}


def table(results: dict) -> str:
    env = results.get("env", {})
    lines = [f"device: {env.get('device', '?')}   copy {env.get('copy_tb_s', 0):.2f} TB/s   date {env.get('date')}   "
             f"commit {env.get('commit')}",
             f"{'model':14} | {'decode tok/s':>12} | {'ms/tok':>7} | {'host ms':>7} | {'eager':>6} | {'HF tok/s':>8} | "
             f"{'TTFT ms':>8} | {'HF TTFT':>8} | agree"]
    for name in MODELS:
        d = results.get("decode", {}).get(name, {})
        t = results.get("ttft", {}).get(name, {})
        c = results.get("correct", {}).get(name, {})
        agree = ",".join(f"{k[:4]}={'y' if v['agree_with_transformers'] else 'N'}" for k, v in c.items()
                         if isinstance(v, dict))
        if "seeded_reproducible" in c:
            agree += f",seed={'y' if c['seeded_reproducible'] else 'N'}"
        lines.append(f"{name:14} | {d.get('tok_s', 0):12.0f} | {d.get('ms_per_token', 0):7.3f} | "
                     f"{d.get('host_ms_per_step', 0):7.3f} | {d.get('eager_tok_s', 0):6.0f} | {d.get('hf_tok_s', 0):8.1f} | "
                     f"{t.get('ms', 0):8.2f} | {t.get('hf_ms', 0):8.2f} | {agree}")
    for name, r in results.get("ready", {}).items():
        for label, v in r.items():
            lines.append(f"Engine() {name} {label}: ready {v.get('ready_s', 0):.1f}s (warm-up {v.get('warmup_s')}, "
                         f"capture {v.get('capture_s')}), import {v.get('import_s', 0):.1f}s")
    for name, r in results.get("profile", {}).items():
        for mode, p in r.items():
            lines.append(f"profile {name} {mode}: {p['kernels_per_step']:.0f} kernels/step, GPU busy "
                         f"{100 * p['gpu_busy_fraction']:.0f}%, {p['gpu_ms_per_step']:.3f} GPU ms of "
                         f"{p['wall_ms_per_step']:.3f} ms/step")
    for name, r in results.get("launch", {}).items():
        lines.append(f"launch {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
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
