"""KV pool sizing (nbengine/memory.py) on faked machines: a GPU shared with another engine, a
container with a cgroup memory limit (v1 and v2), too little memory."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nbengine.engine import Engine
from nbengine.errors import InsufficientMemoryError, NBEngineError
from nbengine.memory import (GiB, MemoryReading, cgroup_memory, check_explicit_pool, kv_pool_tokens,
                             read_host_memory)

MiB = 1 << 20
PER_TOKEN = 128 * 1024  # e.g. Llama-3-8B in bf16: 2 * 32 layers * 8 heads * 128 dims * 2 bytes


def _gpu(free_gib: float, total_gib: float = 80.0) -> MemoryReading:
    return MemoryReading(total=int(total_gib * GiB), free=int(free_gib * GiB), where="cuda:0", kind="cuda")


def _size(reading: MemoryReading, weights_gib: float = 16.0, fraction: float | None = 0.85, **kw) -> int:
    return kv_pool_tokens(reading, bytes_per_token=PER_TOKEN, weights_bytes=int(weights_gib * GiB),
                          fraction=fraction, min_tokens=kw.pop("min_tokens", 2048), **kw)


# ------------------------------------------------------------------------------- CUDA
def test_fraction_counts_weights_plus_kv_pool_as_sglang_does():
    # an empty 80 GiB GPU after loading 16 GiB of weights (and ~1 GiB of CUDA context): 63 GiB free
    tokens = _size(_gpu(63.0))
    # SGLang: free - (1 - 0.85) * total = 63 - 12 = 51 GiB for the pool
    assert tokens == int(51 * GiB // PER_TOKEN)
    # with nothing else on the device the pool never exceeds 0.85 * total - weights
    assert _size(_gpu(64.0)) * PER_TOKEN <= 0.85 * 80 * GiB - 16 * GiB


def test_second_engine_on_a_busy_gpu_sizes_from_free_memory_with_one_warning(caplog):
    # the first engine holds 0.85 of the device; the second finds 11 GiB free: SGLang's formula is negative
    with caplog.at_level(logging.WARNING, logger="nbengine"):
        tokens = _size(_gpu(11.0), weights_gib=0.5)
    assert tokens == int(0.85 * 11 * GiB // PER_TOKEN)  # a fraction of what is free, not 2 pages
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "11.00 GiB free of 80.00 GiB on cuda:0" in warnings[0].getMessage()


def test_too_little_memory_raises_naming_the_memory_found():
    with pytest.raises(InsufficientMemoryError) as info:
        _size(_gpu(0.1), weights_gib=0.5)
    msg = str(info.value)
    assert "0.10 GiB free of 80.00 GiB on cuda:0" in msg and "2048 tokens" in msg
    assert "max_total_tokens" in msg and "context_length" in msg
    assert isinstance(info.value, NBEngineError) and isinstance(info.value, MemoryError)


def test_cap_limits_the_pool():
    assert _size(_gpu(63.0), cap_tokens=5000) == 5000


# -------------------------------------------------------------------------------- CPU
def _host(total_gib: float, free_gib: float, where: str = "host RAM") -> MemoryReading:
    return MemoryReading(total=int(total_gib * GiB), free=int(free_gib * GiB), where=where, kind="cpu")


def test_cpu_pool_is_fraction_of_free_memory_and_at_most_4_gib():
    per_token = 46080  # SmolLM2-135M in float32
    weights = 538 * MiB
    small = kv_pool_tokens(_host(8, 2), bytes_per_token=per_token, weights_bytes=weights, fraction=None,
                           min_tokens=2048)
    assert small == int(0.4 * 2 * GiB // per_token)
    big = kv_pool_tokens(_host(256, 200), bytes_per_token=per_token, weights_bytes=weights, fraction=None,
                         min_tokens=2048)
    assert big == 4 * GiB // per_token


def test_binder_sized_container_gets_a_pool_that_fits_its_limit():
    per_token, weights = 46080, 538 * MiB
    tokens = kv_pool_tokens(_host(2, 1.2, "the container's memory limit (cgroup v2)"), bytes_per_token=per_token,
                            weights_bytes=weights, fraction=None, min_tokens=2048)
    assert tokens * per_token + weights <= 0.4 * 2 * GiB  # weights + pool within the fraction of the 2 GB limit
    assert tokens >= 2048


def test_explicit_pool_larger_than_free_memory_is_refused():
    with pytest.raises(InsufficientMemoryError, match="max_total_tokens=1000000 needs 122.07 GiB"):
        check_explicit_pool(_host(64, 32), 1_000_000, PER_TOKEN)
    check_explicit_pool(_host(64, 32), 1000, PER_TOKEN)  # fits: no error


# ---------------------------------------------------------------------- cgroup readings
def _fake_root(tmp_path: Path, meminfo_total_kib: int, available_kib: int, cgroup_lines: str) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text(f"MemTotal:       {meminfo_total_kib} kB\n"
                                           f"MemFree:        1000 kB\nMemAvailable:   {available_kib} kB\n")
    (tmp_path / "proc/self/cgroup").write_text(cgroup_lines)
    return tmp_path


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_lowers_host_memory(tmp_path):
    root = _fake_root(tmp_path, 64 * 1024 * 1024, 60 * 1024 * 1024, "0::/user.slice/job\n")
    _write(root / "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    _write(root / "sys/fs/cgroup/user.slice/job/memory.max", f"{2 * GiB}\n")
    _write(root / "sys/fs/cgroup/user.slice/job/memory.current", f"{GiB // 2}\n")
    reading = read_host_memory(root)
    assert reading.total == 2 * GiB and reading.free == GiB + GiB // 2
    assert "cgroup v2" in reading.where


def test_cgroup_v2_without_a_limit_keeps_host_memory(tmp_path):
    root = _fake_root(tmp_path, 64 * 1024 * 1024, 60 * 1024 * 1024, "0::/\n")
    _write(root / "sys/fs/cgroup/cgroup.controllers", "memory\n")
    _write(root / "sys/fs/cgroup/memory.max", "max\n")
    reading = read_host_memory(root)
    assert reading.total == 64 * GiB and reading.free == 60 * GiB and reading.where == "host RAM"


def test_cgroup_v2_limit_on_a_parent_binds_the_child(tmp_path):
    root = _fake_root(tmp_path, 64 * 1024 * 1024, 60 * 1024 * 1024, "0::/a/b\n")
    _write(root / "sys/fs/cgroup/cgroup.controllers", "memory\n")
    _write(root / "sys/fs/cgroup/a/memory.max", f"{3 * GiB}\n")
    _write(root / "sys/fs/cgroup/a/memory.current", f"{GiB}\n")
    _write(root / "sys/fs/cgroup/a/b/memory.max", "max\n")
    assert cgroup_memory(root) == (3 * GiB, GiB, "v2")


def test_cgroup_v1_limit_lowers_host_memory(tmp_path):
    root = _fake_root(tmp_path, 64 * 1024 * 1024, 60 * 1024 * 1024, "4:memory:/docker/abc\n0::/\n")
    _write(root / "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", f"{2 * GiB}\n")
    _write(root / "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes", f"{GiB}\n")
    reading = read_host_memory(root)
    assert reading.total == 2 * GiB and reading.free == GiB and "cgroup v1" in reading.where


def test_cgroup_v1_unlimited_and_container_root_mount(tmp_path):
    # inside a container the cgroup's folder is not visible: its root is mounted, with "no limit"
    root = _fake_root(tmp_path, 64 * 1024 * 1024, 60 * 1024 * 1024, "4:memory:/process_api/xyz\n")
    _write(root / "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    _write(root / "sys/fs/cgroup/memory/memory.usage_in_bytes", f"{GiB}\n")
    assert cgroup_memory(root) == (None, None, "v1")
    assert read_host_memory(root).total == 64 * GiB


def test_no_cgroup_at_all(tmp_path):
    root = _fake_root(tmp_path, 8 * 1024 * 1024, 4 * 1024 * 1024, "")
    assert cgroup_memory(root) == (None, None, None)
    assert read_host_memory(root) == MemoryReading(total=8 * GiB, free=4 * GiB, where="host RAM", kind="cpu")


# ---------------------------------------------------------------------- through the engine
def test_engine_on_cpu_sizes_its_pool_from_the_container_limit(tiny_llama, monkeypatch):
    import nbengine.model_runner as model_runner

    container = MemoryReading(total=2 * GiB, free=GiB, where="the container's memory limit (cgroup v2)")
    monkeypatch.setattr(model_runner, "read_host_memory", lambda: container)
    with Engine(str(tiny_llama), random_seed=0) as llm:
        info = llm.get_server_info()
    per_token = 2 * 2 * 2 * 16 * 4  # layers * (K, V) * kv heads * head dim * float32
    # 0.4 of the 1 GiB free, capped by 64 running requests x 1024 tokens
    assert info["max_total_num_tokens"] == min(int(0.4 * GiB) // per_token, 64 * 1024) // 16 * 16


def test_engine_with_no_memory_left_raises_a_clear_error(tiny_llama, monkeypatch):
    import nbengine.model_runner as model_runner

    monkeypatch.setattr(model_runner, "read_host_memory",
                        lambda: MemoryReading(total=GiB, free=MiB, where="host RAM"))
    with pytest.raises(InsufficientMemoryError, match="free of 1.00 GiB on host RAM"):
        Engine(str(tiny_llama), random_seed=0)
