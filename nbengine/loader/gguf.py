"""Convert a GGUF checkpoint into a Hugging Face style model folder.

The folder holds ``config.json``, ``model.safetensors`` (float32, dequantized),
``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` so
that both nbengine and ``transformers`` can load it like any HF checkpoint, plus
``gguf_tensor_types.json`` (each weight matrix's GGUF type, e.g. ``Q4_1``), from which
the CPU path picks the block format that reproduces the checkpoint's own weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from nbengine.errors import UnsupportedModelError

__all__ = ["CONVERTER_VERSION", "SUPPORTED_ARCHS", "TENSOR_TYPES_FILE", "convert_gguf_to_hf"]

logger = logging.getLogger("nbengine")

#: Bump when the output of the converter changes, so cached folders are rebuilt.
CONVERTER_VERSION = 2

#: Names the GGUF type of each converted weight matrix (HF tensor name -> type name).
TENSOR_TYPES_FILE = "gguf_tensor_types.json"

#: GGUF ``general.architecture`` -> (HF architecture, HF model_type).
SUPPORTED_ARCHS: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# llama.cpp permutes q/k rows of these archs only (Qwen GGUFs are stored as in HF).
_PERMUTED_ARCHS = {"llama"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# Pre-tokenizer split regexes of the BPE vocabularies we know (tokenizer.ggml.pre).
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEXES = {"qwen2": _QWEN2_REGEX, "llama-bpe": _LLAMA3_REGEX}

# gguf.constants.TokenType values.
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

_MISSING: Any = object()


class _Meta:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, reader: Any) -> None:
        self._reader = reader
        self.arch: str = self.get("general.architecture")

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self._reader.get_field(key.replace("{arch}", getattr(self, "arch", "")))
        if field is None:
            if default is _MISSING:
                raise UnsupportedModelError(f"GGUF metadata lacks the required key {key!r}")
            return default
        return field.contents()


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp's convert_hf_to_gguf does, per head, ``w.reshape(n_head, 2, d // 2, ...)
    .swapaxes(1, 2)``: HF's "rotate-half" layout (first half / second half of each
    head) becomes GGML's interleaved pairs. The inverse reads the rows back as
    ``(n_head, d // 2, 2, ...)`` and swaps the same two axes.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise UnsupportedModelError(f"cannot un-permute {rows} rows over {n_head} heads")
    w = w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2)).reshape(rows, *w.shape[3:])


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise UnsupportedModelError(f"unsupported GGUF tensor {gguf_name!r}")


def _f32(value: float) -> float:
    """Shortest decimal of a GGUF float32 (9.999999747378752e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _build_config(meta: _Meta, tensor_names: set[str], embed_shape: tuple[int, ...]) -> dict:
    arch = meta.arch
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    hf_arch, model_type = SUPPORTED_ARCHS[arch]
    hidden = int(meta.get("{arch}.embedding_length"))
    n_heads = int(meta.get("{arch}.attention.head_count"))
    head_dim = int(meta.get("{arch}.attention.key_length", hidden // n_heads))
    rope_dim = meta.get("{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedModelError(
            f"partial rotary ({rope_dim} of {head_dim} dims) is not supported")
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta.get("{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.get("{arch}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta.get("{arch}.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta.get("{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get("{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("{arch}.context_length")),
        "vocab_size": int(embed_shape[0]),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "torch_dtype": "float32",
    }
    for key in ("bos", "eos", "padding"):
        tok_id = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        if tok_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(tok_id)
    scaling = meta.get("{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        if scaling != "linear":
            # nbengine's rotary implements default, linear and llama3 scaling; converting a YaRN model
            # would only fail later, at load, with a less helpful message
            raise UnsupportedModelError(
                f"GGUF rope scaling type {scaling!r} is not supported (only 'linear'; YaRN is not implemented), "
                "so this model would compute wrong positions. Use a model without YaRN rope scaling.")
        rope_scaling: dict[str, Any] = {
            "rope_type": scaling,
            "factor": _f32(meta.get("{arch}.rope.scaling.factor")),
        }
        orig = meta.get("{arch}.rope.scaling.original_context_length", None)
        if orig is not None:
            rope_scaling["original_max_position_embeddings"] = int(orig)
        config["rope_scaling"] = rope_scaling
    return config


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for the tensors every model of ``config`` must have."""
    h, d, ffn = config["hidden_size"], config["head_dim"], config["intermediate_size"]
    q_rows, kv_rows = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    per_layer = {
        "self_attn.q_proj.weight": (q_rows, h),
        "self_attn.k_proj.weight": (kv_rows, h),
        "self_attn.v_proj.weight": (kv_rows, h),
        "self_attn.o_proj.weight": (h, q_rows),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    for i in range(config["num_hidden_layers"]):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{i}.{name}"] = shape
    return shapes


def _convert_tensors(reader: Any, config: dict, arch: str, pbar: Any) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = _hf_tensor_name(t.name)
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"tensor {t.name!r} uses unsupported GGUF type {t.tensor_type.name}"
            ) from e
        want = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims as ne[0..n]
        if w.shape != want:
            w = w.reshape(want)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if arch in _PERMUTED_ARCHS and kind in heads:
            w = _unpermute_rows(w, heads[kind])
        tensors[name] = np.ascontiguousarray(w, dtype=np.float32)
        pbar.update(1)
    for name, shape in _expected_shapes(config).items():
        if name not in tensors:
            raise UnsupportedModelError(f"GGUF file lacks the tensor for {name}")
        if tensors[name].shape != shape:
            raise UnsupportedModelError(f"{name} has shape {tensors[name].shape}, expected {shape}")
    return tensors


def _build_tokenizer(meta: _Meta) -> tuple[Any, dict, dict]:
    """Return (tokenizers.Tokenizer, tokenizer_config, generation_config)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
    from tokenizers import pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' BPE)")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise UnsupportedModelError("malformed BPE merges in GGUF tokenizer")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre in _SPLIT_REGEXES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_REGEXES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        if pre not in ("default", "gpt2"):
            logger.warning("Unknown GGUF pre-tokenizer %r; using GPT-2 byte-level splitting", pre)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # llama.cpp stores HF special added tokens as CONTROL and the other added tokens as
    # USER_DEFINED; mirror that so decode(skip_special_tokens=True) drops only the former.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])

    def token(key: str) -> str | None:
        tok_id = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        return tokens[tok_id] if tok_id is not None and 0 <= tok_id < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, vocab[bos])])
    else:
        add_bos = False
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("{arch}.context_length")),
    }
    chat_template = meta.get("tokenizer.chat_template", None)
    if chat_template:
        tok_config["chat_template"] = chat_template
    tok_config = {k: v for k, v in tok_config.items() if v is not None}
    gen_config = {k: meta.get(f"tokenizer.ggml.{k.split('_')[0]}_token_id", None)
                  for k in ("bos_token_id", "eos_token_id")}
    return tok, tok_config, {k: int(v) for k, v in gen_config.items() if v is not None}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                       progress: bool = True, desc: str | None = None) -> Path:
    """Convert ``gguf_path`` into an HF-style float32 model folder at ``out_dir``.

    The folder is built in a temporary sibling directory and renamed into place, so
    ``out_dir`` either does not exist or is complete. Raises ``FileExistsError`` if
    ``out_dir`` already exists and is not empty (e.g. another process won a race),
    ``UnsupportedModelError`` for architectures, tensors or quant types we can't convert.
    """
    from gguf import GGUFReader
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output folder {out_dir} already exists and is not empty")
    start = time.perf_counter()
    reader = GGUFReader(gguf_path)
    meta = _Meta(reader)
    names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise UnsupportedModelError(f"{gguf_path.name} has no token_embd.weight tensor")
    config = _build_config(meta, names, tuple(int(n) for n in reversed(embed.shape)))
    tokenizer, tok_config, gen_config = _build_tokenizer(meta)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with tqdm(total=len(reader.tensors) + 1, desc=desc or f"Converting {gguf_path.stem}",
                  unit="tensor", file=sys.stderr, disable=not progress, leave=False) as pbar:
            tensors = _convert_tensors(reader, config, meta.arch, pbar)
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            pbar.update(1)
        del tensors
        _write_json(tmp / "config.json", config)
        _write_json(tmp / TENSOR_TYPES_FILE, {_hf_tensor_name(t.name): t.tensor_type.name
                                              for t in reader.tensors if len(t.shape) == 2})
        _write_json(tmp / "generation_config.json", gen_config)
        _write_json(tmp / "tokenizer_config.json", tok_config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        try:
            os.replace(tmp, out_dir)
        except OSError as e:
            if out_dir.exists() and any(out_dir.iterdir()):
                raise FileExistsError(f"output folder {out_dir} appeared during conversion") from e
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted %s to %s in %.1f s",
                gguf_path.name, out_dir, time.perf_counter() - start)
    return out_dir
