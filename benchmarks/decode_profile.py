"""Where one decode step's time goes: linear layers (GEMM), LM head, attention, element-wise kernels
(add+RMSNorm, rotary+KV store, SiLU-mul), the Python and torch glue around them in the model, batch
preparation, sampling, and the engine's own bookkeeping.

    python benchmarks/decode_profile.py --batch 1 --steps 64
    python benchmarks/decode_profile.py --batch 1 --no-fast-step      # through the modules
    python benchmarks/decode_profile.py --batch 64 --quantization none

Steps the engine core directly on this thread (set up like the engine thread), with timers
wrapped around the pieces; prints milliseconds per decode step (mean of ``--steps``, after
warm-up). The wrappers cost about a microsecond per call (~300 calls a step at batch 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--quantization", default="auto", help="auto / none / q8_0 / q4_1")
    ap.add_argument("--model", default=None)
    ap.add_argument("--no-fast-step", action="store_true", help="decode through the modules (no CpuDecodeStep)")
    args = ap.parse_args()

    from nbengine.config import EngineConfig
    from nbengine.engine_core import EngineCore
    from nbengine.layers.attention import TorchPagedAttention
    from nbengine.layers.cpu_attention import CpuPagedAttention
    from nbengine.layers.cpu_threads import omp_team
    from nbengine.layers.linear import Linear
    from nbengine.layers.quant_linear import QuantLinear
    from nbengine.loader.resolve import resolve_model_path
    from nbengine.model_runner import ModelRunner
    from nbengine.models.llama import LlamaForCausalLM
    from nbengine.sampler import Sampler
    from nbengine.sampling_params import SamplingParams
    from nbengine.sequence import Sequence
    from nbengine.tokenizer import Tokenizer

    from nbengine.layers import cpu_attention, cpu_elementwise

    spent: dict[str, float] = defaultdict(float)
    inside = {"part": False}  # the model's parts are exclusive: a part called inside another counts there

    def wrap(inner, bucket: str, part: bool = True):
        def wrapper(*a, **k):
            if part and inside["part"]:
                return inner(*a, **k)
            inside["part"] = inside["part"] or part
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[bucket] += time.perf_counter() - t0
                if part:
                    inside["part"] = False

        return wrapper

    def timed(owner, name: str, bucket: str, part: bool = True) -> None:
        setattr(owner, name, wrap(getattr(owner, name), bucket, part))

    # the module path (prefill, float32, models without the fast decode step) and the fast decode step
    timed(LlamaForCausalLM, "compute_logits", "LM head")
    for owner, name in ((QuantLinear, "forward"), (QuantLinear, "matmul_numpy"), (Linear, "forward")):
        timed(owner, name, "linear layers")
    for owner, name in ((CpuPagedAttention, "forward"), (TorchPagedAttention, "forward"),
                        (cpu_attention, "paged_decode_attention"), (cpu_attention, "paged_decode_attention_serial")):
        timed(owner, name, "attention")
    for name in ("_add_rms_norm", "_rms_norm", "_silu_and_mul", "_rope_store"):
        timed(cpu_elementwise, name, "element-wise")
    timed(ModelRunner, "prepare", "batch preparation", part=False)
    timed(ModelRunner, "run", "runner total", part=False)
    timed(Sampler, "__call__", "sampling", part=False)
    timed(EngineCore, "step", "step", part=False)

    omp_team.manage_this_thread()  # as the engine thread does
    model_dir = resolve_model_path(args.model)
    tok = Tokenizer(model_dir)
    quant = None if args.quantization == "none" else args.quantization
    core = EngineCore(EngineConfig(quantization=quant, random_seed=0, max_running_requests=max(args.batch, 1)),
                      model_dir, tok)
    runner = core.runner
    if args.no_fast_step:
        runner.model.decode_step = None
    fns = {field: wrap(getattr(runner.ops, field), "element-wise")
           for field in ("add_rms_norm", "silu_and_mul", "rope_store")}
    runner.model.bind(dataclasses.replace(runner.ops, **fns))
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a short poem about autumn."}]))

    def run(steps: int) -> float:
        for i in range(args.batch):
            core.add([Sequence(rid=f"r{time.perf_counter()}-{i}", prompt_ids=ids, emit=lambda _: None,
                               params=SamplingParams(temperature=0, max_new_tokens=steps + 2, ignore_eos=True))])
        while any(s.num_computed < len(s.prompt_ids) for s in core.seqs.values()):
            core.step()  # prefill
        spent.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            core.step()
        wall = time.perf_counter() - t0
        while core.has_work():
            core.step()
        return wall

    run(4)
    wall = run(args.steps)
    per = {k: v / args.steps * 1e3 for k, v in spent.items()}
    step = per["step"]
    model_rest = per["runner total"] - per.get("linear layers", 0) - per.get("LM head", 0) \
        - per.get("attention", 0) - per.get("batch preparation", 0) - per.get("element-wise", 0)
    rows = [("linear layers (GEMM)", per.get("linear layers", 0)), ("LM head (GEMM)", per.get("LM head", 0)),
            ("attention", per.get("attention", 0)),
            ("element-wise: add+RMSNorm, rotary+KV store, SiLU-mul", per.get("element-wise", 0)),
            ("Python and torch glue in the model (embedding, calls, views)", model_rest),
            ("batch preparation", per.get("batch preparation", 0)), ("sampling", per.get("sampling", 0)),
            ("scheduler, outputs, detokenizer", step - per["runner total"] - per.get("sampling", 0))]
    info = core.info()
    print(f"batch {args.batch}, quantization {info['quantization']}, attention {info['attention_backend']}: "
          f"{step:.2f} ms per decode step ({args.batch / step * 1e3:.1f} tok/s; "
          f"{wall / args.steps * 1e3:.2f} ms between steps)")
    for name, ms in rows:
        print(f"  {name:62s} {ms:7.2f} ms  {ms / step:5.1%}")
    core.release()


if __name__ == "__main__":
    main()
