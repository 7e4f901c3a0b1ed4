"""CPU kernels for block-quantized linear layers (numba; compiled once, cached on disk).

Weights are stored in llama.cpp's block formats, one block per 32 input features of an output row:

- ``q4_1``: ``qs[N, K/2]`` uint8 (byte ``j`` of a block holds feature ``j`` in its low nibble and
  ``j + 16`` in its high nibble), scale ``d[N, K/32]`` and minimum ``m[N, K/32]`` (float32):
  ``w = d * q + m``, ``q`` in 0..15.
- ``q8_0``: ``qs[N, K]`` int8 and scale ``d[N, K/32]``: ``w = d * q``.

Activations are quantized per row and block of 32 to int8 (``x = xd * xq``, ``xs = xd * sum(xq)``),
so a block's dot product is one integer dot of 32 pairs: on AVX2 one ``vpmaddubsw`` + ``vpmaddwd``
(llama.cpp's own scheme); elsewhere LLVM lowers a portable vector form. Scales are applied per
block in float32. One weight row is unpacked once and multiplied with up to four activation rows.
Threads: numba's ``prange`` over chunks of output rows.
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
TILE_ROWS = 4  # activation rows that share one unpacked weight block
CHUNK = 8  # output rows per parallel work item

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


def _sum_pairs_portable(builder, a16, b16):
    """``<32 x i16>`` a, b -> ``<8 x i32>`` lanes, each the sum of four products."""
    p = builder.sext(builder.mul(a16, b16), _V(_I32, 32))
    parts = [builder.shuffle_vector(p, p, ir.Constant(_V(_I32, 8), list(range(8 * k, 8 * k + 8)))) for k in range(4)]
    return builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))


def _madd_avx2(builder, u8, s8):
    p16 = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V(_I16, 16), [u8, s8])
    return _call(builder, "llvm.x86.avx2.pmadd.wd", _V(_I32, 8), [p16, ir.Constant(_V(_I16, 16), [1] * 16)])


class _Q4:
    """Unpack a q4_1 block once; dot it with an int8 activation block."""

    block_bytes = 16

    @staticmethod
    def unpack(builder, wq, off):
        wv = _load(builder, wq, off, _V(_I8, 16))
        lo = builder.and_(wv, ir.Constant(_V(_I8, 16), [15] * 16))
        hi = builder.lshr(wv, ir.Constant(_V(_I8, 16), [4] * 16))
        w32 = builder.shuffle_vector(lo, hi, ir.Constant(_V(_I32, 32), list(range(32))))
        return w32 if AVX2 else builder.zext(w32, _V(_I16, 32))

    @staticmethod
    def dot(builder, w, xv):
        if AVX2:
            return _madd_avx2(builder, w, xv)
        return _sum_pairs_portable(builder, w, builder.sext(xv, _V(_I16, 32)))


class _Q8:
    block_bytes = 32

    @staticmethod
    def unpack(builder, wq, off):
        wv = _load(builder, wq, off, _V(_I8, 32))
        if AVX2:  # |w| as unsigned, and the sign moved onto the activation (llama.cpp's trick)
            return (_call(builder, "llvm.x86.avx2.psign.b", _V(_I8, 32), [wv, wv]), wv)
        return builder.sext(wv, _V(_I16, 32))

    @staticmethod
    def dot(builder, w, xv):
        if AVX2:
            aw, wv = w
            return _madd_avx2(builder, aw, _call(builder, "llvm.x86.avx2.psign.b", _V(_I8, 32), [xv, wv]))
        return _sum_pairs_portable(builder, w, builder.sext(xv, _V(_I16, 32)))


def _hsum(builder, v):
    total = builder.extract_element(v, ir.Constant(_I32, 0))
    for i in range(1, 8):
        total = builder.fadd(total, builder.extract_element(v, ir.Constant(_I32, i)), flags=_FAST)
    return total


def _make_tile(fmt, rows: int, with_min: bool):
    """An intrinsic: ``out[(r0+i)*N + n] = sum_b wd[n,b] xd[r0+i,b] (wq[n,b] . xq[r0+i,b]) (+ wm xs)``."""

    @intrinsic
    def tile(typingctx, wq, wd, wm, xq, xd, xs, out, n, r0, nb, nout):
        sig = types.void(wq, wd, wm, xq, xd, xs, out, types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            wq_v, wd_v, wm_v, xq_v, xd_v, xs_v, out_v, n_v, r0_v, nb_v, nout_v = args
            t = signature.args
            wq_p, xq_p = _data(context, builder, t[0], wq_v, _I8), _data(context, builder, t[3], xq_v, _I8)
            wd_p, wm_p = _data(context, builder, t[1], wd_v, _F32), _data(context, builder, t[2], wm_v, _F32)
            xd_p, xs_p = _data(context, builder, t[4], xd_v, _F32), _data(context, builder, t[5], xs_v, _F32)
            out_p = _data(context, builder, t[6], out_v, _F32)
            i64 = n_v.type
            zero_v = ir.Constant(_V(_F32, 8), [0.0] * 8)
            accs = [cgutils.alloca_once_value(builder, zero_v) for _ in range(rows)]
            mins = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(rows)]
            wrow = builder.mul(n_v, nb_v)
            xrows = [builder.mul(builder.add(r0_v, ir.Constant(i64, i)), nb_v) for i in range(rows)]
            with cgutils.for_range(builder, nb_v) as loop:
                wb = builder.add(wrow, loop.index)
                w = fmt.unpack(builder, wq_p, builder.mul(wb, ir.Constant(i64, fmt.block_bytes)))
                dw = builder.load(builder.gep(wd_p, [wb]))
                mw = builder.load(builder.gep(wm_p, [wb])) if with_min else None
                for i in range(rows):
                    xb = builder.add(xrows[i], loop.index)
                    xv = _load(builder, xq_p, builder.mul(xb, ir.Constant(i64, QK)), _V(_I8, 32))
                    isum = builder.sitofp(fmt.dot(builder, w, xv), _V(_F32, 8))
                    s = builder.fmul(dw, builder.load(builder.gep(xd_p, [xb])), flags=_FAST)
                    acc = builder.fadd(builder.load(accs[i]), builder.fmul(isum, _splat(builder, s, 8), flags=_FAST),
                                       flags=_FAST)
                    builder.store(acc, accs[i])
                    if with_min:
                        xsum = builder.load(builder.gep(xs_p, [xb]))
                        builder.store(builder.fadd(builder.load(mins[i]), builder.fmul(mw, xsum, flags=_FAST),
                                                   flags=_FAST), mins[i])
            for i in range(rows):
                total = _hsum(builder, builder.load(accs[i]))
                if with_min:
                    total = builder.fadd(total, builder.load(mins[i]), flags=_FAST)
                dst = builder.add(builder.mul(builder.add(r0_v, ir.Constant(i64, i)), nout_v), n_v)
                builder.store(total, builder.gep(out_p, [dst]))
            return context.get_dummy_value()

        return sig, codegen

    return tile


_q4_tile4, _q4_tile1 = _make_tile(_Q4, TILE_ROWS, True), _make_tile(_Q4, 1, True)
_q8_tile4, _q8_tile1 = _make_tile(_Q8, TILE_ROWS, False), _make_tile(_Q8, 1, False)


@njit(fastmath=True, nogil=True, cache=True)
def quantize_row(x, r, xq, xd, xs):
    """Quantize float32 row ``x[r]`` per block of 32 to int8 ``xq`` with scales ``xd`` and sums ``xs``."""
    k = x.shape[1]
    nb = k // QK
    for b in range(nb):
        base = b * QK
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[r, base + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if amax > 0 else np.float32(0.0)
        total = 0
        for j in range(QK):
            q = np.int32(np.rint(x[r, base + j] * inv))
            xq[r * k + base + j] = q
            total += q
        xd[r * nb + b] = d
        xs[r * nb + b] = d * np.float32(total)


@njit(fastmath=True, nogil=True, cache=True)
def quantize_rows(x, xq, xd, xs):
    """:func:`quantize_row` for every row of ``x[M, K]`` (one thread: cheaper than a parallel region)."""
    for r in range(x.shape[0]):
        quantize_row(x, r, xq, xd, xs)


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def quantize_rows_parallel(x, xq, xd, xs):
    for r in prange(x.shape[0]):
        quantize_row(x, r, xq, xd, xs)


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def matmul_q4_1(xq, xd, xs, m, wq, wd, wm, out):
    """``out[m, N] = dequant(xq) @ dequant(w).T`` for q4_1 weights (flat arrays)."""
    n_out = wd.shape[0]
    nb = wd.shape[1]
    wq1, wd1, wm1 = wq.reshape(-1), wd.reshape(-1), wm.reshape(-1)
    for c in prange((n_out + CHUNK - 1) // CHUNK):
        for n in range(c * CHUNK, min(n_out, c * CHUNK + CHUNK)):
            r = 0
            while r + TILE_ROWS <= m:
                _q4_tile4(wq1, wd1, wm1, xq, xd, xs, out, n, r, nb, n_out)
                r += TILE_ROWS
            while r < m:
                _q4_tile1(wq1, wd1, wm1, xq, xd, xs, out, n, r, nb, n_out)
                r += 1


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def matmul_q8_0(xq, xd, xs, m, wq, wd, out):
    """``out[m, N] = dequant(xq) @ dequant(w).T`` for q8_0 weights (flat arrays)."""
    n_out = wd.shape[0]
    nb = wd.shape[1]
    wq1, wd1 = wq.reshape(-1), wd.reshape(-1)
    for c in prange((n_out + CHUNK - 1) // CHUNK):
        for n in range(c * CHUNK, min(n_out, c * CHUNK + CHUNK)):
            r = 0
            while r + TILE_ROWS <= m:
                _q8_tile4(wq1, wd1, wd1, xq, xd, xs, out, n, r, nb, n_out)
                r += TILE_ROWS
            while r < m:
                _q8_tile1(wq1, wd1, wd1, xq, xd, xs, out, n, r, nb, n_out)
                r += 1
