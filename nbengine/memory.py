"""How many tokens the KV pool holds: the one sizing rule, for CUDA and for CPU.

``mem_fraction_static`` keeps SGLang's meaning: the fraction of the device's memory for the
static allocations, i.e. the weights plus the KV pool; the rest stays free for activations,
CUDA graphs and everything else. On CPU "the device's memory" is host RAM, or the container's
cgroup memory limit when that is lower (Binder gives 2 GB on a host with far more).

:func:`kv_pool_tokens` takes the readings as numbers, so a runner can call it whenever it likes
(the CUDA runner after its warm-up) and tests can fake any machine. The rule:

1. ``wanted = fraction * total - weights`` — what the fraction promises the KV pool;
2. ``fits`` — what is free now once the non-static share is set aside: on CUDA
   ``free - (1 - fraction) * total`` (SGLang's formula); on CPU, whose RAM is always shared with
   the rest of the machine, ``fraction * free``;
3. the pool takes ``min(wanted, fits)`` (and at most ``cap_tokens``);
4. when memory already in use elsewhere (another engine in this process, another process)
   leaves less than ``min_tokens`` that way, the pool is sized from what is free,
   ``fraction * free``, with one warning;
5. when even that is below ``min_tokens``, :class:`InsufficientMemoryError` names the memory found.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InsufficientMemoryError

logger = logging.getLogger("nbengine")

GiB = 1 << 30
DEFAULT_FRACTION = {"cuda": 0.85, "cpu": 0.4}
CPU_KV_CAP_BYTES = 4 * GiB  # a CPU pool beyond this only costs memory: batches that large are compute-bound
_CGROUP_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge page-rounded number


@dataclass(frozen=True)
class MemoryReading:
    """What one device offers: ``total`` bytes the engine may count on, ``free`` bytes free now."""

    total: int
    free: int
    where: str  # said in messages: "cuda:0", "host RAM", "the container's memory limit (cgroup v2)"
    kind: str = "cpu"  # "cuda" or "cpu": which share of free memory step 2 sets aside


def kv_pool_tokens(reading: MemoryReading, *, bytes_per_token: int, weights_bytes: int, fraction: float | None,
                   min_tokens: int, cap_tokens: int | None = None) -> int:
    """Tokens the KV pool should hold on this device (see the module docstring for the rule)."""
    frac = fraction if fraction is not None else DEFAULT_FRACTION[reading.kind]
    wanted = frac * reading.total - weights_bytes
    if reading.kind == "cuda":
        fits = reading.free - (1 - frac) * reading.total
    else:
        fits = frac * reading.free
    budget = min(wanted, fits)
    if reading.kind == "cpu":
        budget = min(budget, CPU_KV_CAP_BYTES)
    tokens = _tokens(budget, bytes_per_token, cap_tokens)
    if tokens >= min_tokens:
        return tokens
    from_free = _tokens(frac * reading.free, bytes_per_token, cap_tokens)
    found = (f"{_gib(reading.free)} free of {_gib(reading.total)} on {reading.where} "
             f"(this engine's weights: {_gib(weights_bytes)})")
    if from_free < min_tokens:
        raise InsufficientMemoryError(
            f"Not enough memory for the KV pool: found {found}; the pool needs at least {min_tokens} tokens "
            f"({_gib(min_tokens * bytes_per_token)}) and mem_fraction_static={frac} of what is free gives "
            f"{max(from_free, 0)}. Free memory (shut down other engines or processes), pass a smaller "
            "context_length, or set max_total_tokens explicitly.")
    logger.warning("mem_fraction_static=%s of %s is %s for weights + KV pool, but memory in use elsewhere leaves "
                   "only %s; sizing the KV pool from free memory instead: %d tokens (%s). Set max_total_tokens "
                   "or mem_fraction_static to choose.", frac, reading.where, _gib(frac * reading.total), found,
                   from_free, _gib(from_free * bytes_per_token))
    return from_free


def check_explicit_pool(reading: MemoryReading, tokens: int, bytes_per_token: int) -> None:
    """``max_total_tokens`` given by the user: refuse a pool that cannot fit in what is free."""
    need = tokens * bytes_per_token
    if need > reading.free:
        raise InsufficientMemoryError(
            f"max_total_tokens={tokens} needs {_gib(need)} for the KV pool, but only {_gib(reading.free)} of "
            f"{_gib(reading.total)} is free on {reading.where}. Pass a smaller max_total_tokens.")


def _tokens(budget_bytes: float, bytes_per_token: int, cap_tokens: int | None) -> int:
    tokens = int(max(budget_bytes, 0) // bytes_per_token)
    return min(tokens, cap_tokens) if cap_tokens is not None else tokens


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# ---------------------------------------------------------------------------- readings
def share_of(reading: MemoryReading, ranks: int) -> MemoryReading:
    """One of ``ranks`` processes' share of a device they all use (tensor-parallel ranks on one host's RAM)."""
    return MemoryReading(total=reading.total // ranks, free=reading.free // ranks,
                         where=f"{reading.where} (1/{ranks}: one tensor-parallel rank's share)", kind=reading.kind)


def read_cuda_memory(device) -> MemoryReading:
    """Free and total memory of a CUDA device, as the driver reports them (other processes included)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return MemoryReading(total=total, free=free, where=str(device), kind="cuda")


def read_host_memory(root: str | os.PathLike = "/") -> MemoryReading:
    """Host RAM, lowered to the cgroup (v2 or v1) memory limit of this process when there is one."""
    root = Path(root)
    total, free = _meminfo(root)
    where = "host RAM"
    limit, usage, version = cgroup_memory(root)
    if limit is not None and limit < total:
        total = limit
        where = f"the container's memory limit (cgroup {version})"
        if usage is not None:
            free = min(free, max(limit - usage, 0))
        else:
            free = min(free, limit)
    return MemoryReading(total=total, free=free, where=where, kind="cpu")


def _meminfo(root: Path) -> tuple[int, int]:
    fields: dict[str, int] = {}
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[name] = int(parts[0]) * 1024
    except OSError:
        pass
    total = fields.get("MemTotal")
    if total is None:  # not Linux: ask the OS for physical pages
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 * GiB
    return total, fields.get("MemAvailable", fields.get("MemFree", total // 2))


def cgroup_memory(root: str | os.PathLike = "/") -> tuple[int | None, int | None, str | None]:
    """``(limit, usage, "v2" | "v1")`` of this process's memory cgroup; ``None`` where there is none.

    The limit is the lowest one on the way from the process's cgroup up to the root (a parent's
    limit binds its children); paths come from ``/proc/self/cgroup``.
    """
    root = Path(root)
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    v2_path = v1_path = None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and line.startswith("0::"):
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    base = root / "sys/fs/cgroup"
    if (base / "cgroup.controllers").exists():  # the unified (v2) hierarchy is mounted here
        return (*_walk(base, v2_path or "/", "memory.max", "memory.current"), "v2")
    if (base / "memory").is_dir():
        return (*_walk(base / "memory", v1_path or "/", "memory.limit_in_bytes", "memory.usage_in_bytes"), "v1")
    return None, None, None


def _walk(mount: Path, path: str, limit_file: str, usage_file: str) -> tuple[int | None, int | None]:
    """The lowest limit from the cgroup at ``path`` up to ``mount``, and the usage of the cgroup that sets it.

    Inside a container the cgroup's own folder may not be visible (its root is mounted instead),
    so folders that don't exist are skipped.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    limit = usage = None
    for depth in range(len(parts), -1, -1):
        folder = mount.joinpath(*parts[:depth])
        value = _read_int(folder / limit_file)
        if value is not None and value < _CGROUP_UNLIMITED and (limit is None or value < limit):
            limit, usage = value, _read_int(folder / usage_file)
    return limit, usage


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2 writes "max" for no limit
