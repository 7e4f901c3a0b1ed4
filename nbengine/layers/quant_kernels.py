"""CPU kernels for block-quantized linear layers (numba; compiled once, cached on disk).

Weights use llama.cpp's block formats (one block per 32 inputs of an output row): ``q4_1``
(``w = d * q + m``, ``q`` in 0..15) and ``q8_0`` (``w = d * q``, ``q`` int8), repacked for the
kernels by ``quant_linear.pack_for_kernels`` into *column groups*: 8 output rows side by side,
so one broadcast of a few activation values multiplies all 8 at once (the layout VNNI kernels
use). Scales are ``[N/8, K/32, 8]``.

Activations are quantized per row and block of 32 to ~16 bits: ``x ~ xd * (2**8 * q1 + q2)``, where
``q1`` is llama.cpp's int8 rounding (steps of amax / 127) and ``q2`` (int8) rounds what ``q1`` left
over, in steps 2**8 times finer; ``xs = xd * sum(2**8 * q1 + q2)``. int8 activations alone flip
near-tied greedy tokens of the default model (top-1 agreement with float32 96.5 %); with the second
part it is 100 % (see docs/NOTES.md). q4_1 multiplies each part with ``vpmaddubsw`` (two int8 passes
over weights loaded once); q8_0 multiplies the combined int16 values with ``vpmaddwd``, which costs
about what one int8 pass with llama.cpp's sign trick did. Elsewhere LLVM lowers a portable vector
form of the same arithmetic. A tile is one column group against up to four activation rows;
threads (numba ``prange``) take column groups.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

try:
    import llvmlite.binding as _llvm

    AVX2 = bool(_llvm.get_host_cpu_features().get("avx2", False))
except Exception:  # noqa: BLE001 - feature probing is best effort; the portable path is always right
    AVX2 = False

QK = 32  # features per block
PARALLEL_QUANT_ROWS = 64  # activations of at least this many rows are quantized by all threads
RESIDUAL_BITS = 8  # the activations' second int8 part counts in steps 2**-8 of the first's
RESIDUAL_SCALE = 1 << RESIDUAL_BITS
ACT_BYTES = 2 * QK  # bytes per row and block of quantized activations: two int8 parts, or one int16
GROUP_CHUNK = 4  # column groups (of 8 outputs) per parallel work item: 4 rows x 32 outputs per inner tile sweep

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V = ir.VectorType
_FAST = ("fast",)


def _data(context, builder, arrty, arr, elt):
    ptr = cgutils.create_struct_proxy(arrty)(context, builder, value=arr).data
    return builder.bitcast(ptr, elt.as_pointer())


def _call(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _splat(builder, val, n):
    vt = _V(val.type, n)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), val, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(_V(_I32, n), [0] * n))


def _load(builder, base, offset, vt):
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vt.as_pointer()), align=1)


def _maddubs(builder, u8, s8):
    """``vpmaddubsw``: unsigned x signed bytes, adjacent products summed -> ``<16 x i16>``."""
    if AVX2:
        return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V(_I16, 16), [u8, s8])
    p = builder.mul(builder.zext(u8, _V(_I16, 32)), builder.sext(s8, _V(_I16, 32)))
    even = builder.shuffle_vector(p, p, ir.Constant(_V(_I32, 16), list(range(0, 32, 2))))
    odd = builder.shuffle_vector(p, p, ir.Constant(_V(_I32, 16), list(range(1, 32, 2))))
    return builder.add(even, odd)  # no saturation needed: our operands never reach it


def _madd_ones(builder, v16):
    """``vpmaddwd`` with ones: adjacent i16 lanes summed -> ``<8 x i32>``."""
    if AVX2:
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V(_I32, 8), [v16, ir.Constant(_V(_I16, 16), [1] * 16)])
    w = builder.sext(v16, _V(_I32, 16))
    even = builder.shuffle_vector(w, w, ir.Constant(_V(_I32, 8), list(range(0, 16, 2))))
    odd = builder.shuffle_vector(w, w, ir.Constant(_V(_I32, 8), list(range(1, 16, 2))))
    return builder.add(even, odd)


def _madd(builder, a16, b16):
    """``vpmaddwd``: int16 x int16, adjacent products summed -> ``<8 x i32>``."""
    if AVX2:
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V(_I32, 8), [a16, b16])
    p = builder.mul(builder.sext(a16, _V(_I32, 16)), builder.sext(b16, _V(_I32, 16)))
    even = builder.shuffle_vector(p, p, ir.Constant(_V(_I32, 8), list(range(0, 16, 2))))
    odd = builder.shuffle_vector(p, p, ir.Constant(_V(_I32, 8), list(range(1, 16, 2))))
    return builder.add(even, odd)


def _splat4(builder, base, offset):
    """Four bytes at ``base[offset]`` repeated across 32 lanes (``vpbroadcastd``)."""
    word = builder.load(builder.bitcast(builder.gep(base, [offset]), _I32.as_pointer()), align=1)
    return builder.bitcast(_splat(builder, word, 8), _V(_I8, 32))


def _offset(builder, off, delta):
    return builder.add(off, ir.Constant(off.type, delta))


class _Q4:
    """q4_1 column groups: 128 bytes per block of 32 inputs x 8 outputs; each 32-byte vector holds
    8 inputs of the 8 outputs (low nibbles: inputs 0-3, high nibbles: 4-7, 4 bytes per output).
    Activations: per row and block, the 32 bytes of ``q1`` then the 32 of ``q2``."""

    group_block_bytes = 128
    has_min = True

    @staticmethod
    def load_block(builder, wq, off):
        parts = []
        for j in range(4):
            v = _load(builder, wq, _offset(builder, off, 32 * j), _V(_I8, 32))
            parts.append((builder.and_(v, ir.Constant(_V(_I8, 32), [15] * 32)),
                          builder.lshr(v, ir.Constant(_V(_I8, 32), [4] * 32))))
        return parts

    @staticmethod
    def _dot8(builder, parts, xq, xoff):
        acc16 = None  # |sum| <= 8 * 2 * 15 * 127 < 2**15: the whole block fits in i16 lanes
        for j, (lo, hi) in enumerate(parts):
            o = _offset(builder, xoff, 8 * j)
            p = builder.add(_maddubs(builder, lo, _splat4(builder, xq, o)),
                            _maddubs(builder, hi, _splat4(builder, xq, _offset(builder, o, 4))))
            acc16 = p if acc16 is None else builder.add(acc16, p)
        return _madd_ones(builder, acc16)

    @classmethod
    def dot(cls, builder, parts, xq, xoff):
        coarse = cls._dot8(builder, parts, xq, xoff)
        fine = cls._dot8(builder, parts, xq, _offset(builder, xoff, QK))
        return builder.add(builder.shl(coarse, ir.Constant(_V(_I32, 8), [RESIDUAL_BITS] * 8)), fine)


class _Q8:
    """q8_0 column groups: 256 bytes per block; each 16-byte piece holds 2 inputs of the 8 outputs and
    widens to int16 lanes. Activations: per row and block, 32 int16 values ``2**8 * q1 + q2``."""

    group_block_bytes = 256
    has_min = False

    @staticmethod
    def load_block(builder, wq, off):
        return [builder.sext(_load(builder, wq, _offset(builder, off, 16 * j), _V(_I8, 16)), _V(_I16, 16))
                for j in range(16)]

    @staticmethod
    def dot(builder, parts, xq, xoff):
        acc = None  # |sum| <= 32 * 127 * 2**15 < 2**31
        for j, w in enumerate(parts):
            x = builder.bitcast(_splat4(builder, xq, _offset(builder, xoff, 4 * j)), _V(_I16, 16))
            p = _madd(builder, w, x)
            acc = p if acc is None else builder.add(acc, p)
        return acc


def _make_tile(fmt, rows: int):
    """An intrinsic computing ``out[r0 + i, 8g : 8g + 8]`` for ``i < rows``: one column group of the
    packed weight (``pack_for_kernels``) against ``rows`` quantized activation rows."""

    @intrinsic
    def tile(typingctx, wq, wd, wm, xq, xd, xs, out, g, r0, nb, nout):
        sig = types.void(wq, wd, wm, xq, xd, xs, out, types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            wq_v, wd_v, wm_v, xq_v, xd_v, xs_v, out_v, g_v, r0_v, nb_v, nout_v = args
            t = signature.args
            wq_p, xq_p = _data(context, builder, t[0], wq_v, _I8), _data(context, builder, t[3], xq_v, _I8)
            wd_p, wm_p = _data(context, builder, t[1], wd_v, _F32), _data(context, builder, t[2], wm_v, _F32)
            xd_p, xs_p = _data(context, builder, t[4], xd_v, _F32), _data(context, builder, t[5], xs_v, _F32)
            out_p = _data(context, builder, t[6], out_v, _F32)
            i64 = g_v.type
            c = lambda v: ir.Constant(i64, v)  # noqa: E731
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_V(_F32, 8), [0.0] * 8)) for _ in range(rows)]
            row_ids = [builder.add(r0_v, c(i)) for i in range(rows)]
            with cgutils.for_range(builder, nb_v) as loop:
                b = loop.index
                gb = builder.add(builder.mul(g_v, nb_v), b)  # (group, block)
                parts = fmt.load_block(builder, wq_p, builder.mul(gb, c(fmt.group_block_bytes)))
                dvec = _load(builder, wd_p, builder.mul(gb, c(8)), _V(_F32, 8))
                mvec = _load(builder, wm_p, builder.mul(gb, c(8)), _V(_F32, 8)) if fmt.has_min else None
                for i in range(rows):
                    xb = builder.add(builder.mul(row_ids[i], nb_v), b)
                    isum = builder.sitofp(fmt.dot(builder, parts, xq_p, builder.mul(xb, c(ACT_BYTES))), _V(_F32, 8))
                    scale = builder.fmul(dvec, _splat(builder, builder.load(builder.gep(xd_p, [xb])), 8), flags=_FAST)
                    acc = builder.fadd(builder.load(accs[i]), builder.fmul(isum, scale, flags=_FAST), flags=_FAST)
                    if mvec is not None:
                        xsum = _splat(builder, builder.load(builder.gep(xs_p, [xb])), 8)
                        acc = builder.fadd(acc, builder.fmul(mvec, xsum, flags=_FAST), flags=_FAST)
                    builder.store(acc, accs[i])
            for i in range(rows):
                dst = builder.add(builder.mul(row_ids[i], nout_v), builder.mul(g_v, c(8)))
                ptr = builder.bitcast(builder.gep(out_p, [dst]), _V(_F32, 8).as_pointer())
                builder.store(builder.load(accs[i]), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_q4_t1, _q4_t2, _q4_t3, _q4_t4 = (_make_tile(_Q4, r) for r in (1, 2, 3, 4))
_q8_t1, _q8_t2, _q8_t3, _q8_t4 = (_make_tile(_Q8, r) for r in (1, 2, 3, 4))


@njit(fastmath=True, nogil=True, cache=True)
def quantize_row(x, r, wide, xq, xd, xs):
    """Quantize float32 row ``x[r]`` per block of 32 (see the module's docstring): into ``xq`` (int8,
    ``ACT_BYTES`` per block) as the parts ``q1`` then ``q2`` (``wide=False``, for q4_1) or as int16
    ``2**8 * q1 + q2`` (``wide=True``, for q8_0); scales into ``xd``, scaled sums into ``xs``."""
    k = x.shape[1]
    nb = k // QK
    x16 = xq.view(np.int16)
    for b in range(nb):
        base = b * QK
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[r, base + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if amax > 0 else np.float32(0.0)
        total = 0
        dst = (r * nb + b) * ACT_BYTES
        for j in range(QK):
            v = x[r, base + j] * inv
            q1 = np.rint(v)
            q2 = min(max(np.int32(np.rint((v - q1) * np.float32(RESIDUAL_SCALE))), -127), 127)
            q = np.int32(q1) * RESIDUAL_SCALE + q2
            if wide:
                x16[dst // 2 + j] = q
            else:
                xq[dst + j] = np.int32(q1)
                xq[dst + QK + j] = q2
            total += q
        d = d / np.float32(RESIDUAL_SCALE)
        xd[r * nb + b] = d
        xs[r * nb + b] = d * np.float32(total)


@njit(fastmath=True, nogil=True, cache=True, inline="always")
def _tile(q4, rows, wq, wd, wm, xq, xd, xs, out, g, r, nb, n_out):
    if q4:
        if rows == 4:
            _q4_t4(wq, wd, wm, xq, xd, xs, out, g, r, nb, n_out)
        elif rows == 3:
            _q4_t3(wq, wd, wm, xq, xd, xs, out, g, r, nb, n_out)
        elif rows == 2:
            _q4_t2(wq, wd, wm, xq, xd, xs, out, g, r, nb, n_out)
        elif rows == 1:
            _q4_t1(wq, wd, wm, xq, xd, xs, out, g, r, nb, n_out)
    elif rows == 4:
        _q8_t4(wq, wd, wm, xq, xd, xs, out, g, r, nb, n_out)
    elif rows == 3:
        _q8_t3(wq, wd, wm, xq, xd, xs, out, g, r, nb, n_out)
    elif rows == 2:
        _q8_t2(wq, wd, wm, xq, xd, xs, out, g, r, nb, n_out)
    elif rows == 1:
        _q8_t1(wq, wd, wm, xq, xd, xs, out, g, r, nb, n_out)


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def matmul(q4, xq, xd, xs, m, wq, wd, wm, out):
    """``out[m, N] = dequant(xq) @ dequant(w).T`` for packed weights (``wd``, ``wm``: ``[N/8, K/32, 8]``;
    ``q4``: q4_1 with minima ``wm``, else q8_0 and ``wm`` is ignored)."""
    groups, nb = wd.shape[0], wd.shape[1]
    n_out = groups * 8
    wq1, wd1, wm1 = wq.reshape(-1), wd.reshape(-1), wm.reshape(-1)
    for chunk in prange((groups + GROUP_CHUNK - 1) // GROUP_CHUNK):
        g0, g1 = chunk * GROUP_CHUNK, min(groups, chunk * GROUP_CHUNK + GROUP_CHUNK)
        for r in range(0, m - 3, 4):
            for g in range(g0, g1):
                _tile(q4, 4, wq1, wd1, wm1, xq, xd, xs, out, g, r, nb, n_out)
        for g in range(g0, g1):
            _tile(q4, m % 4, wq1, wd1, wm1, xq, xd, xs, out, g, m - m % 4, nb, n_out)


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def quantize_activations(x, wide):
    """``x[M, K]`` float32 -> (``xq``: ``M * K/32 * ACT_BYTES`` bytes, scales ``xd[M*K/32]``, scaled sums ``xs``)."""
    m, k = x.shape
    nb = k // QK
    xq = np.empty(m * nb * ACT_BYTES, dtype=np.int8)
    xd = np.empty(m * nb, dtype=np.float32)
    xs = np.empty(m * nb, dtype=np.float32)
    if m >= PARALLEL_QUANT_ROWS:
        for r in prange(m):
            quantize_row(x, r, wide, xq, xd, xs)
    else:  # a parallel region costs more than quantizing a few rows
        for r in range(m):
            quantize_row(x, r, wide, xq, xd, xs)
    return xq, xd, xs


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def linear_q4_1(x, wq, wd, wm, out):
    """``out[M, N] = x @ W.T`` for float32 ``x[M, K]`` and packed q4_1 ``W``: one call per layer."""
    xq, xd, xs = quantize_activations(x, False)
    matmul(True, xq, xd, xs, x.shape[0], wq, wd, wm, out.reshape(-1))


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def linear_q8_0(x, wq, wd, out):
    """``out[M, N] = x @ W.T`` for float32 ``x[M, K]`` and packed q8_0 ``W``."""
    xq, xd, xs = quantize_activations(x, True)
    matmul(False, xq, xd, xs, x.shape[0], wq, wd, wd, out.reshape(-1))


def warm_up() -> None:
    """Load (or, the first time on this machine, compile) every kernel, so no request pays for it."""
    x = np.zeros((1, QK), dtype=np.float32)
    out = np.zeros((1, 8), np.float32)
    scales = np.zeros((1, 1, 8), np.float32)
    linear_q4_1(x, np.zeros((1, 128), np.uint8), scales, scales, out)
    linear_q8_0(x, np.zeros((1, 256), np.int8), scales, out)
