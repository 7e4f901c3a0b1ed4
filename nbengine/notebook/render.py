"""Final renderings of a finished sample (markdown, text, code, json), its metadata, the stats line."""

from __future__ import annotations

import json
import re
from typing import Any

FORMATS = ("markdown", "text", "code", "json")
_FENCE = re.compile(r"^\s*```[\w+-]*[ \t]*\n(.*?)\n?```\s*$", re.S)


def strip_fences(text: str) -> str:
    """The body of a reply that is one fenced block (```python ... ```), else the text itself."""
    m = _FENCE.match(text)
    if m:
        return m.group(1)
    inner = re.search(r"```[\w+-]*[ \t]*\n(.*?)\n?```", text, re.S)  # prose around one block: keep the code
    return inner.group(1) if inner else text.strip()


def was_stopped(out: dict) -> bool:
    reason = out.get("meta_info", {}).get("finish_reason")
    return bool(reason) and reason.get("type") == "abort"


def stopped_note(out: dict) -> str:
    return f"stopped after {out.get('meta_info', {}).get('completion_tokens', 0)} tokens"


def bundle(out: dict, fmt: str) -> dict[str, Any]:
    """The mime bundle shown (and saved in the notebook) for one finished sample."""
    text = out.get("text", "")
    stopped = was_stopped(out)
    if fmt == "text":
        return {"text/plain": text + (f"\n[{stopped_note(out)}]" if stopped else "")}
    if fmt == "code":
        code = strip_fences(text)
        note = f"*{stopped_note(out)}; the partial code was not inserted*" if stopped else \
            "*inserted in a new cell below*"
        return {"text/markdown": f"```python\n{code}\n```\n{note}", "text/plain": code}
    if fmt == "json":
        body = strip_fences(text)
        try:
            value = json.loads(body)
        except ValueError as e:
            why = stopped_note(out) if stopped else f"not valid JSON: {e}"
            return {"text/plain": f"{text}\n[{why}]"}
        return {"application/json": value if isinstance(value, (dict, list)) else {"value": value},
                "text/plain": json.dumps(value, indent=2, ensure_ascii=False)}
    md = text + (f"\n\n*[{stopped_note(out)}]*" if stopped else "")
    return {"text/markdown": md, "text/plain": text + (f"\n[{stopped_note(out)}]" if stopped else "")}


def metadata(out: dict, run_stats: dict, model: str, params: dict, extra: dict | None = None) -> dict[str, Any]:
    """What reproduces and explains a sample; stored under ``metadata["nbengine"]`` of its output."""
    m = out.get("meta_info", {})
    md = {
        "model": model,
        "params": {k: v for k, v in params.items() if v is not None},
        "seed": params.get("seed"),
        "prompt_tokens": m.get("prompt_tokens"),
        "completion_tokens": m.get("completion_tokens"),
        "finish_reason": m.get("finish_reason"),
        "e2e_latency_s": m.get("e2e_latency"),
        "ttft_s": run_stats.get("ttft_s"),
        "elapsed_s": run_stats.get("elapsed_s"),
        "tok_per_s": run_stats.get("tok_per_s"),
    }
    if run_stats.get("stopped"):
        md["stopped"] = run_stats["stopped"]  # "stop" (button) or "interrupt" (kernel interrupt)
        md["stop_to_abort_s"] = run_stats.get("stop_to_abort_s")
    if extra:
        md.update(extra)
    return {"nbengine": md}


def stats_line(stats: dict, model: str | None = None, final: bool = False) -> str:
    parts = []
    if final and stats.get("stopped"):
        parts.append("stopped" if stats["stopped"] == "stop" else "interrupted")
    elif not final:
        parts.append("generating")
    if stats["samples"] > 1:
        parts.append(f"{stats['samples_done']}/{stats['samples']} done")
    parts.append(f"{stats['completion_tokens']} tokens")
    if stats.get("tok_per_s"):
        parts.append(f"{stats['tok_per_s']:.1f} tok/s")
    if stats.get("ttft_s") is not None:
        parts.append(f"TTFT {stats['ttft_s']:.2f} s")
    parts.append(f"{stats['elapsed_s']:.1f} s")
    if model:
        parts.append(model)
    return " · ".join(parts)
