"""Where the host time of an engine step goes at a large batch (CPU, a tiny random model).

    PYTHONPATH=$PWD python3 benchmarks/host_profile.py --batch 256 --steps 20 [--overlap 0|1]

The model is tiny (2 layers, hidden 64), so nearly all of a step is the engine's own Python:
scheduling, the batch plan, metadata, sampling, appending tokens, detokenizing and emitting.
Prints the wall time per decode step and the top functions by own time (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import tempfile
import time
from pathlib import Path


def tiny_model(out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def profile_core(folder: Path, batch: int, steps: int, prompt_len: int, overlap: bool, temperature: float = 0.6,
                 top: int = 25, **config) -> tuple[float, str]:
    """Step an EngineCore on this thread (as the engine thread would): ``batch`` requests prefilled, then
    ``steps`` decode steps under cProfile. Returns (ms per step, the profile's top functions by own time)."""
    import io

    import torch

    from nbengine.config import EngineConfig
    from nbengine.engine_core import EngineCore
    from nbengine.sampling_params import SamplingParams
    from nbengine.sequence import Sequence
    from nbengine.tokenizer import Tokenizer

    tok = Tokenizer(folder) if (folder / "tokenizer.json").exists() else None
    cfg = EngineConfig(random_seed=0, max_running_requests=batch, disable_overlap_schedule=not overlap, **config)
    core = EngineCore(cfg, folder, tok)
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        ids = torch.randint(100, 4000, (prompt_len,), generator=g).tolist()
        core.add([Sequence(rid=f"r{i}", prompt_ids=ids, emit=lambda _out: None, stream=True, params=SamplingParams(
            temperature=temperature, max_new_tokens=steps + 50, ignore_eos=True))])
    while any(s.num_computed < len(s.prompt_ids) for s in core.seqs.values()):
        core.step()
    for _ in range(3):
        core.step()
    if core.runner.device.type == "cuda":
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        core.step()
    if core.runner.device.type == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    wall = (time.perf_counter() - t0) / steps
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    core.release()
    return 1e3 * wall, text.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--overlap", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--engine-args", default="{}", help='JSON of extra engine arguments, e.g. \'{"disable_radix_cache": true}\'')
    args = ap.parse_args()

    import torch

    from nbengine.loader.default_model import default_model_path

    torch.set_num_threads(1)
    folder = tiny_model(Path(tempfile.gettempdir()) / "nbengine-host-profile-llama", default_model_path(progress=False))
    ms, text = profile_core(folder, args.batch, args.steps, args.prompt_len, bool(args.overlap), args.temperature,
                            args.top, dtype="float32", quantization=None, max_total_tokens=args.batch * 1024,
                            **json.loads(args.engine_args))
    print(f"batch {args.batch}, overlap {bool(args.overlap)}: {ms:.2f} ms per decode step under cProfile")
    print(text)


if __name__ == "__main__":
    main()
