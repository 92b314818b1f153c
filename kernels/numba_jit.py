"""The ``numba`` backend: compiled, multi-threaded CPU kernels.

Each public function validates its input and allocates its outputs (the checks in ``_contract``),
then calls a private ``@njit`` kernel. Parallel kernels split the work with ``prange`` so that
every thread writes its own disjoint slice of the output (an output plane, a filter's weights):
no two threads ever write the same element, so there are no races and no atomics.
The contract (shapes, dtypes, argmax format, tie rule) is in ``_contract.py``.
"""

from __future__ import annotations

import platform
from types import FunctionType

import numpy as np
from numba import config, get_num_threads, literally, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _contract as c

# The optional kernel groups of the contract that this backend has (_contract.OPTIONAL_KERNELS).
OPTIONAL = frozenset({"conv2d_saved_layout", "conv2d_relu"})

# NOTE: every jit flag lives here. fastmath allows reassociating sums (so reductions vectorize)
# but not 'nnan'/'ninf': a NaN must still propagate so that a diverging loss is detected.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_parallel = njit(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)
_serial = njit(cache=True, fastmath=FASTMATH, nogil=True)
# Inlined into its caller's code before compiling: a real call inside a hot loop cost ~40%.
_inlined = njit(inline="always", fastmath=FASTMATH)
# Elementwise work on fewer values than this runs on one thread: waking the thread pool costs
# more than the loop (the simple model at batch 10 is dominated by such per-call costs).
_PARALLEL_MIN = 1 << 17
# Likewise a convolution or dense layer under this many FLOPs per thread runs on the calling
# thread (its serial twin): a parallel region costs a wake-up of every thread, and one whose
# threads wait for a busy core costs a time slice. Measured on 2 Zen 4 cores (conv2d_forward,
# batch 1): 2 threads ran 0.92x / 0.96-1.00x / 1.07-1.09x / 1.22x one thread's speed at
# 0.11 / 0.23-0.45 / 0.9 / 3.6 MFLOP idle, and 0.46x at 0.11 MFLOP beside a busy core.
# Per thread, because waking more threads costs more (a model: not measured beyond 2 cores).
_SERIAL_FLOPS_PER_THREAD = 250_000
# Max pooling does more per value than the elementwise kernels: parallel from 32k values on
# (2x2, 2 threads: 7.6 us either way at 25k values, 14 vs 19 us at 63k; serial 2.3 vs 3.2 us
# at 6k).
_POOL_PARALLEL_MIN = 1 << 15


def _twin(kernel):
    """The serial twin of a parallel kernel: the same Python function compiled without
    threads (prange runs as range), under a name of its own, since Numba's on-disk cache is
    keyed by the function's name, not its flags."""
    fn = getattr(kernel, "py_func", kernel)  # (NUMBA_DISABLE_JIT=1: the function itself)
    copy = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                        fn.__closure__)
    copy.__qualname__, copy.__doc__ = fn.__qualname__ + "_serial", fn.__doc__
    copy.__module__ = fn.__module__
    return _serial(copy)


_TWINS = {}


def _serially(flops):
    """Whether work of ``flops`` is too little to pay for waking the threads."""
    return flops < _SERIAL_FLOPS_PER_THREAD * get_num_threads()


def _run(kernel, serial, *args):
    """kernel(*args), or, if ``serial``, its serial twin's."""
    if serial:
        twin = _TWINS.get(kernel)
        if twin is None:
            twin = _TWINS[kernel] = _twin(kernel)
        kernel = twin
    return kernel(*args)


# -- two low-level helpers for the register-tiled convolution ---------------------------------
# NOTE: Numba adds a negative-index check to every array load whose index is not a plain range
# variable, and in a vectorized loop that check turns contiguous loads into gathers. The tiled
# kernel reads x at (tile start + tap offset + v), so it reads through the array's data pointer,
# which has no such check: the kernel itself keeps every index inside the array (see
# _channel_planes' slack). Its accumulators live in a fixed-size stack buffer that LLVM keeps in
# vector registers; a heap array (np.empty) is a call the compiler cannot see through.
# With NUMBA_DISABLE_JIT=1 both are plain NumPy, so the kernel bodies still run as Python, and
# there every read through _flat is bounds-checked: the conformance tests run in that mode too
# (test_numba_kernel_bodies_also_pass_as_plain_python), so a read past the slack fails there.
if config.DISABLE_JIT:
    def _flat(a):
        return a.reshape(-1)

    def _stack_buffer(count, dtype):
        return np.empty(count, dtype)
else:  # pragma: no cover - compiled code only: the plain-Python run takes the branch above
    @intrinsic
    def _flat(typingctx, a):
        """The data pointer of a C-contiguous array: a[i] reads the i-th value, unchecked."""
        if not (isinstance(a, types.Array) and a.layout == "C"):
            return None

        def codegen(context, builder, signature, args):
            return context.make_array(signature.args[0])(context, builder, args[0]).data

        return types.CPointer(a.dtype)(a), codegen

    @intrinsic
    def _stack_buffer(typingctx, count, dtype):
        """Room for `count` (a compile-time constant) values of `dtype` on the stack."""
        if not isinstance(count, types.IntegerLiteral):
            return None
        element = dtype.dtype

        def codegen(context, builder, signature, args):
            llvm_type = context.get_data_type(element)
            return cgutils.alloca_once(builder, llvm_type, size=count.literal_value)

        return types.CPointer(element)(count, dtype), codegen


def _padded(x, ph, pw):
    """x zero-padded by ph rows and pw columns on each side, C-contiguous."""
    if ph == 0 and pw == 0:
        return np.ascontiguousarray(x)
    n, ch, h, w = x.shape
    xp = np.zeros((n, ch, h + 2 * ph, w + 2 * pw), x.dtype)
    xp[:, :, ph : ph + h, pw : pw + w] = x
    return xp


# -- convolution ------------------------------------------------------------------------------


@_parallel
def _conv_forward(xp, w, b, stride, y):
    N, C = xp.shape[0], xp.shape[1]
    F, _, KH, KW = w.shape
    OH, OW = y.shape[2], y.shape[3]
    for t in prange(N * F):  # one output plane per task
        n, f = t // F, t % F
        out = y[n, f]
        out[:, :] = b[f]
        for ch in range(C):
            for p in range(KH):
                for q in range(KW):
                    wv = w[f, ch, p, q]
                    for i in range(OH):
                        row = xp[n, ch, i * stride + p]
                        orow = out[i]
                        for j in range(OW):
                            orow[j] += wv * row[j * stride + q]


# -- 3x3, stride 1: every layer of the seed's models ------------------------------------------
# NOTE: the planes of a whole batch are read as one flat row per channel (see _channel_planes),
# and output (n, i, j) lives at k = n*Hp*Wp + i*Wp + j of a "wide" output: tap (p, q) reads
# x_flat[k + p*Wp + q], so every tap is one contiguous run the compiler vectorizes; the junk
# columns and rows in between are computed and thrown away.
#
# The forward kernel is register-tiled, like the inner kernel of a matrix multiply: a tile of
# fb filters x v consecutive outputs stays in vector registers while the loop runs over every
# input channel and tap; each tap loads v inputs once, broadcasts the fb weights, and does
# fb * v multiply-adds. The outputs are written once, at the end. (Accumulating a whole row of
# outputs in memory instead is bound by loads and stores: ~50 GFLOP/s against ~100 for the tile
# on AVX2.) A task is a run of tiles for one group of fb filters; consecutive tasks take the same
# run with the next group, so the run's inputs are still in cache. The tile's shape depends on
# the CPU and the row length: see conv_tile.
_FB, _V = 4, 16  # the weight gradient's filters per task, and the dense layers' matmul tile
_RUN = 4  # output rows per task


def _host_vector_bits():
    """The widest float vectors this CPU has: 512 (AVX-512), 256 (AVX, AVX2) or 128."""
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
    except Exception:  # noqa: BLE001 - no feature list: assume the narrowest
        return 128
    if features.get("avx512f"):
        return 512
    return 256 if features.get("avx2") or features.get("avx") else 128


VECTOR_BITS = _host_vector_bits()
# Vector registers: x86 has 32 with AVX-512, else 16; 64-bit Arm (NEON) has 32 of 128 bits.
VECTOR_REGISTERS = 32 if VECTOR_BITS >= 512 or platform.machine().lower() in (
    "arm64", "aarch64") else 16


def conv_tile(ow, itemsize, bits=VECTOR_BITS, registers=VECTOR_REGISTERS):
    """(fb, v): filters x outputs of the forward kernel's register tile for rows of ``ow``
    outputs of ``itemsize``-byte values. Half the vector registers hold accumulators (the rest
    take the loaded inputs and broadcast weights); a tile spans two vectors of outputs where rows
    are long enough not to waste most of the second, else one; and as many filters as the
    accumulators allow, at most 8. AVX2, float32: 4 x 16 (8 ymm accumulators); AVX-512: 8 x 32
    for 28-wide rows, 8 x 16 for 14-wide ones (16 and 8 zmm)."""
    lanes = max(bits // (8 * itemsize), 1)
    vectors = 2 if ow >= lanes + lanes // 2 or registers >= 32 else 1
    fb = min(8, (registers // 2) // vectors)
    return fb, vectors * lanes


def _channel_planes(x, top, left, hp, wp, slack=0, channels=None, relu_output=None,
                    serial=False):
    """x (N, C, H, W) laid out channel-major, (C, N*hp*wp + slack): every image's plane of one
    channel after the other, so one flat loop runs across the whole batch. Each H x W plane sits
    at (top, left) of an hp x wp plane of zeros; `slack` more zeros end every channel's row, and
    `channels` (>= C) rows of zeros in all. With `relu_output` (x's shape), x is a gradient
    arriving at a ReLU, laid out as relu_backward(x, relu_output) would give it: the ReLU's
    backward pass fused into the layout (one pass over dy instead of two). serial: on the
    calling thread (a small convolution's)."""
    n, ch = x.shape[:2]
    out = np.empty((channels or ch, n * hp * wp + slack), x.dtype)
    x = np.ascontiguousarray(x)
    masked = relu_output is not None
    mask = np.ascontiguousarray(relu_output) if masked else x
    _run(_lay_out_planes, serial, x, top, left, hp, wp, out, mask, masked)
    return out


@_parallel
def _lay_out_planes(x, top, left, hp, wp, out, mask, masked):
    N, C, H, W = x.shape
    S, plane = out.shape[1], hp * wp
    for ch in prange(out.shape[0]):  # one channel's row per task; every value written once
        dst = out[ch]
        end = 0  # everything before `end` is written
        if ch < C:
            for n in range(N):
                for i in range(H):
                    at = n * plane + (top + i) * wp + left
                    for k in range(end, at):
                        dst[k] = 0
                    src, row = x[n, ch, i], dst[at : at + W]
                    if masked:  # relu_backward's rule: dy * 0 keeps a NaN dy NaN
                        m = mask[n, ch, i]
                        for j in range(W):
                            row[j] = src[j] * 0 if m[j] <= 0 else src[j]
                    else:
                        for j in range(W):
                            row[j] = src[j]
                    end = at + W
        for k in range(end, S):
            dst[k] = 0


def _tile_slack(wp, v):
    """Zeros a channel's flat row needs past its last plane: a row's last tile runs up to v
    outputs past the row's end, and its taps read 2*wp + 2 further."""
    return v + 2 * wp + 2


@_serial
def _filter_groups(w, fb):
    """w (F, C, 3, 3) -> (ceil(F/fb), C, 9, fb): a group's fb weights of one tap side by side,
    F padded with zero filters to a multiple of fb."""
    F, C = w.shape[0], w.shape[1]
    wg = np.zeros(((F + fb - 1) // fb, C, 9, fb), w.dtype)
    for f in range(F):
        for ch in range(C):
            for p in range(3):
                for q in range(3):
                    wg[f // fb, ch, 3 * p + q, f % fb] = w[f, ch, p, q]
    return wg


@_inlined
def _tile_step(a0, a1, a2, a3, w0, w1, w2, w3, src, at):
    """One step of the register tile: a_r[v] += w_r * src[at + v] for the _V values v, four
    rows r sharing each loaded value (4 broadcasts and _V/8 vector loads per 4*_V/8 FMAs)."""
    for v in range(_V):
        value = src[at + v]
        a0[v] += w0 * value
        a1[v] += w1 * value
        a2[v] += w2 * value
        a3[v] += w3 * value


@_inlined
def _tile_taps(a, taps, src, at, fb, v):
    """One tap of the register tile: a[r*v + u] += taps[r] * src[at + u] for the tile's v
    outputs u and fb filters r, every loaded input shared by the fb filters."""
    for u in range(v):
        value = src[at + u]
        for r in range(fb):
            a[r * v + u] += taps[r] * value


@_inlined
def _tile_at(a, wg, g, x, k0, S, wp, fb, v, size):
    """a = the tile of filter group g at wide position k0 of the flat layout (channel rows of
    S values): every input channel's nine taps, tap (p, q) reading x_flat[c, k + p*Wp + q]."""
    for k in range(size):
        a[k] = 0
    for ch in range(wg.shape[1]):
        taps = wg[g, ch]
        for p in range(3):
            for q in range(3):
                _tile_taps(a, taps[3 * p + q], x, ch * S + k0 + p * wp + q, fb, v)


@_inlined
def _store(out, j, value, relu):
    """out[j] = value; with relu, relu_forward's rule: 0 where value <= 0 (a NaN is kept)."""
    if relu and value <= 0:
        out[j] = 0
    else:
        out[j] = value


@_parallel
def _conv3x3_forward_s1(xf, wg, b, hp, wp, y, relu, fb, v, size):
    """The register-tiled forward kernel; fb, v and size = fb * v are compile-time constants
    (one compiled version per tile shape in use). relu: store max(value, 0) (NaN kept), the
    ReLU that follows the convolution fused into its store."""
    literally(fb)
    literally(v)
    literally(size)
    S = xf.shape[1]
    groups = wg.shape[0]
    N, F, OH, OW = y.shape
    per_row = (OW + v - 1) // v  # tiles per output row; the last may overhang into junk
    runs = (N * OH + _RUN - 1) // _RUN
    x = _flat(xf)
    for t in prange(runs * groups):
        run, g = t // groups, t % groups
        f0 = g * fb
        a = _stack_buffer(size, xf.dtype)
        for row in range(run * _RUN, min(run * _RUN + _RUN, N * OH)):
            n, i = row // OH, row % OH
            for jt in range(per_row):
                j0 = jt * v
                _tile_at(a, wg, g, x, n * hp * wp + i * wp + j0, S, wp, fb, v, size)
                for r in range(min(fb, F - f0)):  # the real filters and outputs only
                    out, bias = y[n, f0 + r, i], b[f0 + r]
                    for u in range(min(v, OW - j0)):
                        _store(out, j0 + u, a[r * v + u] + bias, relu)


@_parallel
def _conv3x3_forward_across(xf, wg, b, hp, wp, y, relu, fb, v, size):
    """The forward kernel for rows shorter than half a tile (2 * wp <= v): a tile is v
    consecutive wide positions of one image, across rows (14-wide rows, 32-wide tiles: 87.5% of
    a tile is real outputs, where a tile per row would waste half). On AVX-512 this took the
    14x14 layers' forward pass from ~280-310 to ~330-390 GFLOP/s. (Long rows keep a tile per
    row: one kernel doing both ran those 1.2-2x slower.)"""
    literally(fb)
    literally(v)
    literally(size)
    S = xf.shape[1]
    groups = wg.shape[0]
    N, F, OH, OW = y.shape
    per_image = ((OH - 1) * wp + OW + v - 1) // v
    tiles = N * per_image
    x = _flat(xf)
    for t in prange(((tiles + _RUN - 1) // _RUN) * groups):
        run, g = t // groups, t % groups
        f0 = g * fb
        a = _stack_buffer(size, xf.dtype)
        for tile in range(run * _RUN, min(run * _RUN + _RUN, tiles)):
            n, at = tile // per_image, tile % per_image
            k0 = at * v
            _tile_at(a, wg, g, x, n * hp * wp + k0, S, wp, fb, v, size)
            # the real outputs (i < OH, j < OW) among the tile's wide positions, a row at a time
            i, j, u = k0 // wp, k0 % wp, 0
            while u < v and i < OH:
                count = min(v - u, wp - j)
                for r in range(min(fb, F - f0)):
                    out, bias = y[n, f0 + r, i], b[f0 + r]
                    for m in range(max(min(count, OW - j), 0)):
                        _store(out, j + m, a[r * v + u + m] + bias, relu)
                u += count
                i += 1
                j = 0


# The weight gradient is a long reduction over every wide position k of the batch:
# dw[f, c, p, q] = sum_k dy_flat[f, k] * x_flat[c, k + p*Wp + q] (dy's junk positions are zero).
# A task owns _FB filters and one channel and sums one kernel row p at a time: 12 running sums
# (the compiler keeps each as a vector of partial sums in a register), and each step loads _FB
# values of dy and 3 of x for 12 multiply-adds. (One filter's nine taps at a time loaded 10
# values for 9: ~60 GFLOP/s against ~100.) Consecutive tasks share the filters' dy rows.


@_parallel
def _conv3x3_grad_weight_s1(xf, dyf, wp, dw, db, L, doff, n):
    """L: the output positions summed over (every one of the batch, junk ones included); dy's
    value of position k sits at dyf[f, doff + k], its n positions from doff on (doff > 0 when
    dyf is laid out for the input gradient, shifted by a row and a column)."""
    C, F = xf.shape[0], dw.shape[0]  # F: a multiple of _FB
    for t in prange((F // _FB) * C):
        f0, ch = (t // C) * _FB, t % C
        e = doff + L
        d0, d1 = dyf[f0, doff:e], dyf[f0 + 1, doff:e]
        d2, d3 = dyf[f0 + 2, doff:e], dyf[f0 + 3, doff:e]
        zero = dw[f0, ch, 0, 0]  # dw starts zeroed: a zero in the arrays' dtype
        for p in range(3):
            row = xf[ch, p * wp : p * wp + L + 2]  # the taps (p, 0), (p, 1), (p, 2) read it
            x0, x1, x2 = row[0:L], row[1 : 1 + L], row[2 : 2 + L]
            s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = s30 = s31 = s32 = zero
            for k in range(L):
                s00 += d0[k] * x0[k]
                s01 += d0[k] * x1[k]
                s02 += d0[k] * x2[k]
                s10 += d1[k] * x0[k]
                s11 += d1[k] * x1[k]
                s12 += d1[k] * x2[k]
                s20 += d2[k] * x0[k]
                s21 += d2[k] * x1[k]
                s22 += d2[k] * x2[k]
                s30 += d3[k] * x0[k]
                s31 += d3[k] * x1[k]
                s32 += d3[k] * x2[k]
            dw[f0, ch, p, 0], dw[f0, ch, p, 1], dw[f0, ch, p, 2] = s00, s01, s02
            dw[f0 + 1, ch, p, 0], dw[f0 + 1, ch, p, 1], dw[f0 + 1, ch, p, 2] = s10, s11, s12
            dw[f0 + 2, ch, p, 0], dw[f0 + 2, ch, p, 1], dw[f0 + 2, ch, p, 2] = s20, s21, s22
            dw[f0 + 3, ch, p, 0], dw[f0 + 3, ch, p, 1], dw[f0 + 3, ch, p, 2] = s30, s31, s32
        if ch == 0:  # the bias gradients of the task's filters; one parallel loop compiles faster
            for f in range(f0, f0 + _FB):
                acc = zero
                row = dyf[f, doff : doff + n]
                for k in range(n):
                    acc += row[k]
                db[f] = acc


_TILED = {}
_conv3x3_forward_s1_serial = _twin(_conv3x3_forward_s1)
_conv3x3_forward_across_serial = _twin(_conv3x3_forward_across)


def _tiled_forward(fb, v, across, serial=False):
    """The forward kernel for one tile shape, as a compiled function whose fb and v are
    constants. (Calling _conv3x3_forward_s1 with literal arguments from Python would go
    through Numba's literal dispatch on every call: ~30 ms. From compiled code they are resolved
    once; Numba caches the closure with its constants.) serial: the kernel's serial twin."""
    kernel = _TILED.get((fb, v, across, serial))
    if kernel is None:
        size = fb * v
        # NOTE: four closures, each naming its kernel: a closure that captured the kernel as a
        # variable would miss Numba's cache on every run (it can't hash a captured dispatcher).
        if across and serial:
            @_serial
            def kernel(xf, wg, b, hp, wp, y, relu):
                _conv3x3_forward_across_serial(xf, wg, b, hp, wp, y, relu, fb, v, size)
        elif across:
            @_serial
            def kernel(xf, wg, b, hp, wp, y, relu):
                _conv3x3_forward_across(xf, wg, b, hp, wp, y, relu, fb, v, size)
        elif serial:
            @_serial
            def kernel(xf, wg, b, hp, wp, y, relu):
                _conv3x3_forward_s1_serial(xf, wg, b, hp, wp, y, relu, fb, v, size)
        else:
            @_serial
            def kernel(xf, wg, b, hp, wp, y, relu):
                _conv3x3_forward_s1(xf, wg, b, hp, wp, y, relu, fb, v, size)

        _TILED[fb, v, across, serial] = kernel
    return kernel


def _across(ow, wp, v):
    """Whether the forward kernel's tiles run across rows (_conv3x3_forward_across): where rows
    are shorter than half a tile, or a tile per row would leave more than 30% of its outputs
    unused (16-wide rows in 32-wide tiles: half), while a tile across rows of wp wide positions
    uses ow / wp of them (16 of 18). Measured on AVX-512, batch 64, 32->32 channels at 16x16:
    2.68 ms a tile per row, 1.65 ms across; at 24 and 28 wide the two were within noise."""
    return 2 * wp <= v or ow < 0.7 * (-(-ow // v) * v)


def _forward(x, w, b, stride, ph, pw, shape, tile=None, keep=False, xf=None, relu=False):
    """y; with keep, (y, the flat layout of x) for 3x3 stride-1 kernels (else (y, None)). xf:
    x already laid out so (conv2d_backward's dy, for the input gradient). relu: y is the ReLU
    of the convolution, applied as each output is stored."""
    w = np.ascontiguousarray(w)
    if stride > 1 and w.shape[2:] == (3, 3):  # on the fast stride-1 kernel, then every s-th
        n, f = shape[:2]
        y1 = _forward(x, w, b, 1, ph, pw, (n, f, x.shape[2] + 2 * ph - 2,
                                           x.shape[3] + 2 * pw - 2), tile, False, None, relu)
        y = np.ascontiguousarray(_every(y1, stride, shape))
        return (y, None) if keep else y
    if w.shape[2:] == (1, 1) and ph == pw == 0:  # a matrix product, on every s-th input
        y = _conv1x1_forward(x[:, :, ::stride, ::stride], w, b, relu)
        return (y, None) if keep else y
    y = np.empty(shape, x.dtype)
    serial = _serially(2 * y.size * w[0].size)
    if stride == 1 and w.shape[2:] == (3, 3):
        hp, wp = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
        fb, v = tile or conv_tile(shape[3], x.dtype.itemsize)
        if xf is None:
            xf = _channel_planes(x, ph, pw, hp, wp, _tile_slack(wp, v), serial=serial)
        kernel = _tiled_forward(fb, v, _across(shape[3], wp, v), serial)
        kernel(xf, _filter_groups(w, fb), b, hp, wp, y, relu)
    else:  # other kernel sizes and strides: the plain direct convolution
        _run(_conv_forward, serial, _padded(x, ph, pw), w, b, stride, y)
        xf = None
        if relu:  # in place, after it
            flat = y.reshape(-1)
            (_relu_forward if y.size >= _PARALLEL_MIN else _relu_forward_serial)(flat, flat)
    return (y, xf) if keep else y


def conv2d_forward(x, w, b, stride, pad):
    """y[n, f, i, j] = b[f] + sum_{c,p,q} w[f, c, p, q] * xpad[n, c, i*stride + p, j*stride + q].

    x (N, C, H, W), w (F, C, KH, KW), b (F,), one float dtype -> y (N, F, OH, OW).
    """
    stride, pad, shape = c.check_conv_forward(x, w, b, stride, pad)
    return _forward(x, w, b, stride, pad, pad, shape)


def conv2d_forward_saving(x, w, b, stride, pad):
    """conv2d_forward for training: (y, saved), saved being what conv2d_backward can reuse (the
    flat layout of x the forward kernel built), so that x is laid out once per layer and step.
    An optional extension of the kernel contract: the layers use it where a backend has it."""
    stride, pad, shape = c.check_conv_forward(x, w, b, stride, pad)
    return _forward(x, w, b, stride, pad, pad, shape, keep=True)


def conv2d_relu_forward(x, w, b, stride, pad):
    """(relu_forward(conv2d_forward(x, w, b, stride, pad)), saved), bit for bit, saved as
    conv2d_forward_saving's: a convolution and the ReLU after it in one pass over y (the ReLU
    applied as each output is stored). Optional kernel group "conv2d_relu"."""
    stride, pad, shape = c.check_conv_forward(x, w, b, stride, pad)
    return _forward(x, w, b, stride, pad, pad, shape, keep=True, relu=True)


def conv2d_relu_backward(x, dy, y, w, stride, pad, need_dx=True, saved=None):
    """conv2d_backward(x, relu_backward(dy, y), w, ...), bit for bit: dy arrives at the ReLU
    whose output is y, and the ReLU's mask is applied where dy is laid out for the
    convolution's two gradients instead of in a pass of its own."""
    c.check_relu_backward(dy, y)
    return _backward(x, dy, w, stride, pad, need_dx, saved, y)


def conv2d_backward(x, dy, w, stride, pad, need_dx=True, saved=None):
    """(dw, db, dx or None): conv2d_grad_weight and conv2d_grad_input in one call, the same
    numbers bit for bit. For 3x3 stride-1 'same' convolutions dy is laid out once for both (the
    input gradient's layout, shifted by a row and a column, is the weight gradient's), and x's
    layout comes from the forward pass (``saved``) instead of being built again."""
    return _backward(x, dy, w, stride, pad, need_dx, saved, None)


def _backward(x, dy, w, stride, pad, need_dx, saved, relu_output):
    kernel_size = w.shape[2:]
    (kh, kw), stride, pad = c.check_conv_grad_weight(x, dy, kernel_size, stride, pad)
    if need_dx:
        c.check_conv_grad_input(dy, w, x.shape, stride, pad)
    if stride > 1 and (kh, kw) == (3, 3):  # im2col and the tiled matmul
        if relu_output is not None:
            dy = relu_backward(dy, relu_output)
        cols = _strided_columns(x, 3, 3, stride, pad, dy.shape[2:])
        dy_cols = _columns(dy)  # laid out once for both gradients
        dw, db = _strided_grad_weight(cols, dy_cols, w.shape)
        if not need_dx:
            return dw, db, None
        return dw, db, _strided_grad_input(dy_cols, w, x.shape, stride, pad, dy.shape[2:])
    if not (stride == 1 and (kh, kw) == (3, 3) and pad == 1):
        if relu_output is not None:
            dy = relu_backward(dy, relu_output)
        dw, db = conv2d_grad_weight(x, dy, kernel_size, stride, pad)
        dx = conv2d_grad_input(dy, w, x.shape, stride, pad) if need_dx else None
        return dw, db, dx
    n, ch, h, wd = x.shape
    f = dy.shape[1]
    hp, wp = h + 2, wd + 2
    fb = grad_weight_filters(ch)
    groups = -(-f // (fb or _FB)) * (fb or _FB)
    v = conv_tile(wd, x.dtype.itemsize)[1]  # the input gradient's tile (its outputs: wd wide)
    dyf = _channel_planes(dy, 1, 1, hp, wp, _tile_slack(wp, v), channels=groups,
                          relu_output=relu_output)
    if saved is not None and (saved.dtype != x.dtype or saved.shape[0] != ch
                              or saved.shape[1] < n * hp * wp):
        raise ValueError(f"saved holds the layout of another input ({saved.dtype} "
                         f"{saved.shape}), not of x {x.dtype} {x.shape}")
    dw, db = _grad_weight_3x3(x, dy, 1, fb, xf=saved, dyf=dyf, doff=wp + 1)
    dx = None
    if need_dx:  # the transposed convolution of dy: a convolution with flipped, swapped kernels
        w_t = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        dx = _forward(dy, w_t, np.zeros(ch, dy.dtype), 1, 1, 1, x.shape, xf=dyf)
    return dw, db, dx


@_parallel
def _conv_grad_weight(xp, dy, stride, dw, db):
    N, C = xp.shape[0], xp.shape[1]
    F, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    KH, KW = dw.shape[2], dw.shape[3]
    for t in prange(F * C):  # one (filter, channel) slice of dw per task
        f, ch = t // C, t % C
        for p in range(KH):
            for q in range(KW):
                acc = dw[f, ch, p, q]  # zero, in the arrays' dtype
                for n in range(N):
                    for i in range(OH):
                        row = xp[n, ch, i * stride + p]
                        g = dy[n, f, i]
                        for j in range(OW):
                            acc += g[j] * row[j * stride + q]
                dw[f, ch, p, q] = acc
    for f in prange(F):
        acc = db[f]
        for n in range(N):
            for i in range(OH):
                for j in range(OW):
                    acc += dy[n, f, i, j]
        db[f] = acc


# With 32 vector registers (AVX-512) the weight gradient takes 8 filters at a time (24 running
# sums) and cuts the batch's positions into parts of at most _WG_PART, summed in chunks of
# _WG_CHUNK (a chunk's rows of dy and x stay in L2 while every channel passes over them). A task
# is one part for one group of filters, writing its own partial dw; the parts are added at the
# end in a fixed order. The parts depend on the data's size only, never on the thread count, so
# every thread count gives the same numbers. On AVX-512 this took conv2's weight gradient at
# batch 64 from ~200 to ~285 GFLOP/s. With 16 registers (AVX2) the kernel above stays: it was
# tuned there, and chunking was slower there.
_WG_CHUNK, _WG_PART = 1024, 4096


def grad_weight_filters(channels, registers=VECTOR_REGISTERS):
    """Filters per pass of the chunked weight gradient, or 0 for the AVX2 kernel: also on
    AVX-512 for fewer than 8 input channels, where a chunk of dy is reused too little (the first
    layer, one channel: ~85 GFLOP/s with the AVX2 kernel, ~33 chunked)."""
    return 8 if registers >= 32 and channels >= 8 else 0


# Tasks the chunked weight gradient aims to offer (4 for each of 64 threads), by splitting the
# channels into blocks of at least _WG_MIN_CHANNELS: the parts of the positions alone gave 12
# tasks for conv2 at batch 10 and 8 for conv4, fewer than many cores need.
_WG_TASKS, _WG_MIN_CHANNELS = 256, 4


def grad_weight_channel_block(channels, tasks):
    """Channels per task of the chunked weight gradient, given the ``tasks`` that its parts
    and filter groups make: blocks enough for _WG_TASKS tasks, none under _WG_MIN_CHANNELS
    channels (the blocks change no sum, only how the work is cut)."""
    blocks = min(-(-_WG_TASKS // tasks), max(1, channels // _WG_MIN_CHANNELS))
    return -(-channels // blocks)


@_parallel
def _conv3x3_grad_weight_chunked(xf, dyf, wp, parts, L, doff, cb, fb, size):
    """parts[i, f] = part i's share of dw[f] (fb and size = 3 * fb: compile-time constants);
    L and doff as in _conv3x3_grad_weight_s1. A task owns one part's tile of fb filters x cb
    channels: the tiles are disjoint, and every value of dw is summed in the same order
    whatever cb is (each channel's sums are its own)."""
    literally(fb)
    literally(size)
    C, F, P = xf.shape[0], parts.shape[1], parts.shape[0]
    S, SD = xf.shape[1], dyf.shape[1]
    x, d = _flat(xf), _flat(dyf)
    per = (L + P - 1) // P
    groups, blocks = F // fb, (C + cb - 1) // cb
    for t in prange(P * groups * blocks):
        part, tile = t // (groups * blocks), t % (groups * blocks)
        f0, c0 = (tile // blocks) * fb, (tile % blocks) * cb
        w = parts[part]
        end = min(L, (part + 1) * per)
        for k0 in range(part * per, end, _WG_CHUNK):
            n = min(k0 + _WG_CHUNK, end) - k0
            for ch in range(c0, min(C, c0 + cb)):
                for p in range(3):
                    a = _stack_buffer(size, xf.dtype)  # a[3*f + q]: filter f0 + f, tap q
                    for i in range(size):
                        a[i] = 0
                    at = ch * S + p * wp + k0  # x_flat[c, k + p*Wp + q] for the chunk's k
                    for k in range(n):
                        x0, x1, x2 = x[at + k], x[at + k + 1], x[at + k + 2]
                        for f in range(fb):
                            g = d[(f0 + f) * SD + doff + k0 + k]
                            a[3 * f] += g * x0
                            a[3 * f + 1] += g * x1
                            a[3 * f + 2] += g * x2
                    for f in range(fb):
                        for q in range(3):
                            w[f0 + f, ch, p, q] += a[3 * f + q]


_CHUNKED = {}


def _chunked_grad_weight(fb):
    """The chunked weight gradient for fb filters a pass, compiled with fb constant (as
    _tiled_forward does for the forward tile)."""
    kernel = _CHUNKED.get(fb)
    if kernel is None:
        size = 3 * fb

        @_serial
        def kernel(xf, dyf, wp, parts, L, doff, cb):
            _conv3x3_grad_weight_chunked(xf, dyf, wp, parts, L, doff, cb, fb, size)

        _CHUNKED[fb] = kernel
    return kernel


@_parallel
def _row_sums(a, out, start, n):
    """out[r] = a[r, start] + ... + a[r, start + n - 1], for the first len(out) rows (a row per
    task). The bias gradient: it was serial, and 3.4% of a complex-model step at batch 64 on
    one thread (a[r, start + k]'s index check kept it from vectorizing); a slice of the row
    reads unchecked: 4x faster on one thread."""
    for r in prange(out.shape[0]):
        row = a[r, start : start + n]
        acc = out[r]  # out starts zeroed: a zero in a's dtype
        for k in range(n):
            acc += row[k]
        out[r] = acc


def _grad_weight_3x3(x, dy, pad, fb=None, xf=None, dyf=None, doff=0):
    """dw, db of a 3x3 stride-1 convolution; fb: the chunked kernel's filters a pass (0: the
    AVX2 kernel; default: grad_weight_filters(channels)). xf: x already laid out (by the
    forward pass: conv2d_forward_saving); dyf, doff: dy already laid out, its position k at
    doff + k (by conv2d_backward, for the input gradient too; rows: a whole number of groups).
    Either way the sums run in the same order: the same numbers as laying them out here."""
    fb = grad_weight_filters(x.shape[1]) if fb is None else fb
    n, f = dy.shape[0], dy.shape[1]
    hp, wp = x.shape[2] + 2 * pad, x.shape[3] + 2 * pad
    # dy laid out like x, its junk rows and columns zero so they add nothing to the sums, and
    # padded with zero filters to a whole number of groups.
    group = fb or _FB
    fg = -(-f // group) * group
    if dyf is None:
        dyf, doff = _channel_planes(dy, 0, 0, hp, wp, channels=fg), 0
    if xf is None:
        xf = _channel_planes(x, pad, pad, hp, wp)
    positions = n * hp * wp - 2 * wp - 2  # every output position, junk ones included
    if not fb:
        dw, db = np.zeros((fg, x.shape[1], 3, 3), x.dtype), np.zeros(fg, x.dtype)
        _conv3x3_grad_weight_s1(xf, dyf, wp, dw, db, positions, doff, n * hp * wp)
        return dw[:f], db[:f]
    parts = np.zeros((-(-positions // _WG_PART), fg, x.shape[1], 3, 3), x.dtype)
    cb = grad_weight_channel_block(x.shape[1], parts.shape[0] * (fg // fb))
    _chunked_grad_weight(fb)(xf, dyf, wp, parts, positions, doff, cb)
    db = np.zeros(f, x.dtype)
    _row_sums(dyf, db, doff, n * hp * wp)
    return _sum_parts(parts)[:f], db


def _sum_parts(parts):
    """parts[0] + parts[1] + ..., in that order (blocks of values in parallel)."""
    total = np.empty(parts.shape[1:], parts.dtype)
    _sum_flat_parts(parts.reshape(parts.shape[0], -1), total.reshape(-1))
    return total


@_parallel
def _sum_flat_parts(parts, total):
    P, M = parts.shape
    for t in prange((M + 1023) // 1024):  # 1,024 values a task
        for m in range(t * 1024, min(M, t * 1024 + 1024)):
            acc = parts[0, m]
            for i in range(1, P):
                acc += parts[i, m]
            total[m] = acc


def conv2d_grad_weight(x, dy, kernel_size, stride, pad):
    """dw[f, c, p, q] = sum_{n,i,j} dy[n, f, i, j] * xpad[n, c, i*stride + p, j*stride + q];
    db[f] = sum_{n,i,j} dy[n, f, i, j]. Returns (dw (F, C, KH, KW), db (F,))."""
    (kh, kw), stride, pad = c.check_conv_grad_weight(x, dy, kernel_size, stride, pad)
    f = dy.shape[1]
    if (kh, kw) == (3, 3):
        if stride > 1:
            cols = _strided_columns(x, 3, 3, stride, pad, dy.shape[2:])
            return _strided_grad_weight(cols, _columns(dy), (f, x.shape[1], 3, 3))
        return _grad_weight_3x3(x, dy, pad)
    if (kh, kw) == (1, 1) and pad == 0:
        return _conv1x1_grad_weight(_columns(x[:, :, ::stride, ::stride]), dy)
    dw = np.zeros((f, x.shape[1], kh, kw), x.dtype)
    db = np.zeros(f, x.dtype)
    _conv_grad_weight(_padded(x, pad, pad), np.ascontiguousarray(dy), stride, dw, db)
    return dw, db


@_parallel
def _conv_grad_input(dy, w, stride, dxp):
    N, F, OH, OW = dy.shape
    C, KH, KW = w.shape[1], w.shape[2], w.shape[3]
    for t in prange(N * C):  # one padded input plane per task
        n, ch = t // C, t % C
        plane = dxp[n, ch]
        for f in range(F):
            for p in range(KH):
                for q in range(KW):
                    wv = w[f, ch, p, q]
                    for i in range(OH):
                        g = dy[n, f, i]
                        row = plane[i * stride + p]
                        for j in range(OW):
                            row[j * stride + q] += wv * g[j]


def conv2d_grad_input(dy, w, input_shape, stride, pad):
    """dx = the transpose of the convolution applied to dy: every dy[n, f, i, j] * w[f, c, p, q]
    added at xpad[n, c, i*stride + p, j*stride + q], padding then cropped. dx has input_shape."""
    (n, ch, h, wd), stride, pad = c.check_conv_grad_input(dy, w, input_shape, stride, pad)
    f, _, kh, kw = w.shape
    if stride > 1 and (kh, kw) == (3, 3):
        return _strided_grad_input(_columns(dy), w, input_shape, stride, pad, dy.shape[2:])
    if (kh, kw) == (1, 1) and pad == 0:
        dx = np.zeros(input_shape, dy.dtype)
        dx[:, :, ::stride, ::stride] = _conv1x1_grad_input(dy, w)
        return dx
    if stride == 1 and pad < min(kh, kw):
        # With stride 1 the input gradient is itself a convolution: of dy padded by K-1-pad with
        # the kernels flipped and their in/out channels swapped. It runs on the fast kernel.
        w_t = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        zero = np.zeros(ch, dy.dtype)
        return _forward(dy, w_t, zero, 1, kh - 1 - pad, kw - 1 - pad, (n, ch, h, wd))
    dxp = np.zeros((n, ch, h + 2 * pad, wd + 2 * pad), dy.dtype)
    _conv_grad_input(np.ascontiguousarray(dy), np.ascontiguousarray(w), stride, dxp)
    if pad == 0:
        return dxp
    return np.ascontiguousarray(dxp[:, :, pad : pad + h, pad : pad + wd])


# -- strided and 1x1 convolutions, on the fast kernels -------------------------------------------
# NOTE: a strided 3x3 convolution's forward pass is every s-th output of the stride-1 one, on the
# tiled kernel (s^2 times the work, at 4-5x the speed of the matmul below). Its gradients are
# matrix products on x's windows laid out as columns (im2col: (9C, N*OH*OW), a row per channel
# and tap): the weight gradient the columns times dy^T, the input gradient w^T times dy,
# scattered back onto the windows (col2im). (The stride-1 gradients of dy spread out with zeros
# did s^2 times the work: 16->32 channels on 32x32 images, batch 64, 11.3 -> 9.1 ms.)
# A 1x1 convolution is a matrix product: w (F, C) times x laid out (C, N*H*W), on the register-
# tiled matmul of the dense layers; with stride s, on every s-th input.


@_parallel
def _im2col(xp, kh, kw, stride, oh, ow, cols):
    """cols[(c*kh + p)*kw + q, (n*oh + i)*ow + j] = xp[n, c, i*stride + p, j*stride + q]."""
    N, C = xp.shape[0], xp.shape[1]
    for t in prange(C * kh * kw):  # one row of the columns per task
        ch, tap = t // (kh * kw), t % (kh * kw)
        p, q = tap // kw, tap % kw
        row = cols[t]
        for n in range(N):
            for i in range(oh):
                src = xp[n, ch, i * stride + p]
                at = (n * oh + i) * ow
                for j in range(ow):
                    row[at + j] = src[j * stride + q]


@_parallel
def _col2im(cols, kh, kw, stride, oh, ow, dxp):
    """dxp[n, c, i*stride + p, j*stride + q] += cols[(c*kh + p)*kw + q, (n*oh + i)*ow + j]: the
    columns' gradients added back onto the windows they came from, each padded plane by one
    task (in the same order on any thread count)."""
    N, C = dxp.shape[0], dxp.shape[1]
    for t in prange(N * C):
        n, ch = t // C, t % C
        plane = dxp[n, ch]
        for p in range(kh):
            for q in range(kw):
                row = cols[(ch * kh + p) * kw + q]
                for i in range(oh):
                    out = plane[i * stride + p]
                    at = (n * oh + i) * ow
                    for j in range(ow):
                        out[j * stride + q] += row[at + j]


_im2col_serial = _twin(_im2col)
_col2im_serial = _twin(_col2im)


def _strided_columns(x, kh, kw, stride, pad, out_plane):
    """x's windows as the columns (C*kh*kw, N*OH*OW) (see _im2col)."""
    n, ch = x.shape[:2]
    oh, ow = out_plane
    cols = np.empty((ch * kh * kw, n * oh * ow), x.dtype)
    _run(_im2col, _serially(cols.size), _padded(x, pad, pad), kh, kw, stride, oh, ow, cols)
    return cols


def _every(y1, stride, shape):
    """y1 (the stride-1 output) at every stride-th row and column: shape (N, F, OH, OW)."""
    oh, ow = shape[2], shape[3]
    return y1[:, :, : (oh - 1) * stride + 1 : stride, : (ow - 1) * stride + 1 : stride]


def _strided_grad_weight(cols, dy_cols, w_shape):
    """(dw, db) from x's columns and dy laid out (F, N*OH*OW): dw^T (C*kh*kw, F) = cols times
    dy_cols^T."""
    f = dy_cols.shape[0]
    dw_t = _matmul_into(cols, np.ascontiguousarray(dy_cols.T), np.empty((cols.shape[0], f),
                                                                       dy_cols.dtype))
    db = np.zeros(f, dy_cols.dtype)
    _row_sums(dy_cols, db, 0, dy_cols.shape[1])
    return np.ascontiguousarray(dw_t.T).reshape(w_shape), db


def _strided_grad_input(dy_cols, w, input_shape, stride, pad, out_plane):
    """w^T (C*kh*kw, F) times dy laid out (F, N*OH*OW), scattered back onto the windows."""
    n, ch, h, wd = input_shape
    f, _, kh, kw = w.shape
    oh, ow = out_plane
    dcols = _matmul_into(np.ascontiguousarray(w.reshape(f, -1).T), dy_cols,
                         np.empty((ch * kh * kw, n * oh * ow), dy_cols.dtype))
    dxp = np.zeros((n, ch, h + 2 * pad, wd + 2 * pad), dy_cols.dtype)
    _run(_col2im, _serially(dcols.size), dcols, kh, kw, stride, oh, ow, dxp)
    return np.ascontiguousarray(dxp[:, :, pad : pad + h, pad : pad + wd]) if pad else dxp


def _columns(x):
    """x (N, C, H, W) as the matrix (C, N*H*W), C-contiguous."""
    n, ch, h, w = x.shape
    return np.ascontiguousarray(np.transpose(x, (1, 0, 2, 3))).reshape(ch, n * h * w)


def _matmul_into(a, bm, out):
    """out (M, K) = a (M, R) @ bm (R, K): on the convolution's register tile (_matmul_tiled)
    where out has at least 4 tiles' worth of columns; else (a weight gradient's few columns
    and long R) on the 4 x 16 tile, whose tasks are 4 rows each. Measured on AVX-512, 2
    threads: (32 x 144) @ (144 x 16384) 116-166 GFLOP/s tiled against 35-37; (144 x 16384) @
    (16384 x 32) 26-44 tiled against 165-168."""
    serial = _serially(2 * out.size * a.shape[1])
    fb, v = conv_tile(out.shape[1], out.dtype.itemsize)
    bm = np.ascontiguousarray(bm)
    if out.shape[1] < 4 * v:
        _run(_matmul, serial, np.ascontiguousarray(a), bm, out)
    else:
        _tiled_matmul(fb, v, serial)(_row_groups(a, fb), bm, out)
    return out


def _row_groups(a, fb):
    """a (M, R) -> (ceil(M/fb), R, fb): a group's fb rows side by side for each r, the rows
    padded with zeros to a multiple of fb (what _filter_groups does for 3x3 kernels)."""
    m, r = a.shape
    groups = -(-m // fb)
    padded = np.zeros((groups * fb, r), a.dtype)
    padded[:m] = a
    return np.ascontiguousarray(padded.reshape(groups, fb, r).transpose(0, 2, 1))


@_parallel
def _matmul_tiled(ag, bm, out, fb, v, size):
    """out = a @ bm on the register tile of the convolution: fb rows x v columns of out stay in
    vector registers for the whole pass over R, each loaded run of v values of bm used by fb
    rows (a tap of _tile_taps per r); a task is 4 tiles of one row group. The last K % v
    columns are summed plainly, in float64. ag: a's rows grouped by _row_groups. (_matmul's
    4 rows x 16 columns, 4 accumulators, ran the same products at 35-80 GFLOP/s on AVX-512.)"""
    literally(fb)
    literally(v)
    literally(size)
    M, K = out.shape
    R = bm.shape[0]
    groups = ag.shape[0]
    full = K // v
    runs = max(1, (full + 3) // 4)
    b = _flat(bm)
    for t in prange(runs * groups):
        run, g = t // groups, t % groups
        m0 = g * fb
        a = _stack_buffer(size, out.dtype)
        for tile in range(run * 4, min(run * 4 + 4, full)):
            k0 = tile * v
            for k in range(size):
                a[k] = 0
            for r in range(R):
                _tile_taps(a, ag[g, r], b, r * K + k0, fb, v)
            for i in range(min(fb, M - m0)):
                for u in range(v):
                    out[m0 + i, k0 + u] = a[i * v + u]
        if run == runs - 1:
            for i in range(min(fb, M - m0)):
                for k in range(full * v, K):
                    acc = 0.0
                    for r in range(R):
                        acc += ag[g, r, i] * bm[r, k]
                    out[m0 + i, k] = acc


_matmul_tiled_serial = _twin(_matmul_tiled)
_MATMULS = {}


def _tiled_matmul(fb, v, serial):
    """_matmul_tiled for one tile shape, its fb and v compile-time constants (as
    _tiled_forward, and for the same reasons: one closure per kernel it calls)."""
    kernel = _MATMULS.get((fb, v, serial))
    if kernel is None:
        size = fb * v
        if serial:
            @_serial
            def kernel(ag, bm, out):
                _matmul_tiled_serial(ag, bm, out, fb, v, size)
        else:
            @_serial
            def kernel(ag, bm, out):
                _matmul_tiled(ag, bm, out, fb, v, size)

        _MATMULS[fb, v, serial] = kernel
    return kernel


def _conv1x1_forward(x, w, b, relu):
    n, ch, h, wd = x.shape
    f = w.shape[0]
    cols = _matmul_into(w.reshape(f, ch), _columns(x), np.empty((f, n * h * wd), x.dtype))
    y = np.ascontiguousarray(cols.reshape(f, n, h, wd).transpose(1, 0, 2, 3))
    y += b[:, None, None]
    if relu:
        flat = y.reshape(-1)
        (_relu_forward if y.size >= _PARALLEL_MIN else _relu_forward_serial)(flat, flat)
    return y


def _conv1x1_grad_weight(xcols, dy):
    """(dw (F, C, 1, 1), db) from x laid out (C, N*H*W) and dy (N, F, H, W)."""
    f, ch = dy.shape[1], xcols.shape[0]
    dcols = _columns(dy)
    dw = _matmul_into(dcols, np.ascontiguousarray(xcols.T), np.empty((f, ch), dy.dtype))
    db = np.zeros(f, dy.dtype)
    _row_sums(dcols, db, 0, dcols.shape[1])
    return dw.reshape(f, ch, 1, 1), db


def _conv1x1_grad_input(dy, w):
    """dx (N, C, H, W) at dy's positions: w^T (C, F) times dy laid out (F, N*H*W)."""
    n, f, h, wd = dy.shape
    ch = w.shape[1]
    cols = _matmul_into(np.ascontiguousarray(w.reshape(f, ch).T), _columns(dy),
                        np.empty((ch, n * h * wd), dy.dtype))
    return cols.reshape(ch, n, h, wd).transpose(1, 0, 2, 3)


# -- max pooling ------------------------------------------------------------------------------


@_inlined
def _beats(v, best):
    """Strictly greater, so ties keep the first maximum; a NaN beats every number, so the first
    NaN wins (FASTMATH keeps NaN semantics: v != v is not folded away)."""
    return v > best or (v != v and best == best)


@_parallel
def _pool_forward(x, size, stride, y, argmax):
    N, C = x.shape[0], x.shape[1]
    for t in prange(N * C):  # one plane per task
        _pool_plane_with_nan(x, t // C, t % C, size, stride, y, argmax)


@_parallel
def _pool2x2_forward(x, y, argmax):
    N, C, _, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    for t in prange(N * C):  # one plane per task
        n, ch = t // C, t % C
        poison = x[n, ch, 0, 0] * 0  # a zero in x's dtype, or NaN
        for i in range(OH):
            top, bottom = x[n, ch, 2 * i], x[n, ch, 2 * i + 1]
            out, arg = y[n, ch, i], argmax[n, ch, i]
            for j in range(OW):
                # NOTE: strictly greater, in row-major window order: ties keep the first maximum
                best, at = top[2 * j], 2 * i * W + 2 * j
                if top[2 * j + 1] > best:
                    best, at = top[2 * j + 1], 2 * i * W + 2 * j + 1
                if bottom[2 * j] > best:
                    best, at = bottom[2 * j], (2 * i + 1) * W + 2 * j
                if bottom[2 * j + 1] > best:
                    best, at = bottom[2 * j + 1], (2 * i + 1) * W + 2 * j + 1
                poison += top[2 * j] + top[2 * j + 1] + bottom[2 * j] + bottom[2 * j + 1]
                out[j] = best
                arg[j] = at
        # NOTE: '>' ignores NaN, and the NaN rule (a NaN wins its window) written into the loop
        # above stopped it vectorizing (2-3x slower). Instead the loop sums every value it reads:
        # the sum is NaN or inf only if the plane holds a NaN or an inf (or overflows), and only
        # then is the plane pooled again, cell by cell, with the rule.
        if poison - poison != 0:
            _pool_plane_with_nan(x, n, ch, 2, 2, y, argmax)


@_parallel
def _pool2x2_values(x, y, no_argmax):
    """_pool2x2_forward without the argmax (inference); no_argmax is an empty int64 array."""
    N, C = x.shape[0], x.shape[1]
    OH, OW = y.shape[2], y.shape[3]
    for t in prange(N * C):
        n, ch = t // C, t % C
        poison = x[n, ch, 0, 0] * 0
        for i in range(OH):
            top, bottom = x[n, ch, 2 * i], x[n, ch, 2 * i + 1]
            out = y[n, ch, i]
            for j in range(OW):
                a, b = top[2 * j], top[2 * j + 1]
                d, e = bottom[2 * j], bottom[2 * j + 1]
                left = b if b > a else a
                right = e if e > d else d
                out[j] = right if right > left else left
                poison += a + b + d + e
        if poison - poison != 0:  # a NaN or inf in the plane: pooled again by the rule
            _pool_plane_with_nan(x, n, ch, 2, 2, y, no_argmax)


@_serial
def _pool_plane_with_nan(x, n, ch, size, stride, y, argmax):
    W = x.shape[3]
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            bh, bv = i * stride, j * stride
            best = x[n, ch, bh, bv]
            for p in range(size):
                for q in range(size):
                    v = x[n, ch, i * stride + p, j * stride + q]
                    if _beats(v, best):
                        best = v
                        bh, bv = i * stride + p, j * stride + q
            y[n, ch, i, j] = best
            if argmax.size:  # (empty: values only)
                argmax[n, ch, i, j] = bh * W + bv


def maxpool2d_forward(x, size, stride, with_argmax=True):
    """Max over size x size windows moved by stride: (y (N, C, OH, OW), argmax int64 h*W + w,
    or None unless with_argmax)."""
    size, stride, shape = c.check_pool_forward(x, size, stride)
    y = np.empty(shape, x.dtype)
    argmax = np.empty(shape if with_argmax else (0, 0, 0, 0), np.int64)
    x = np.ascontiguousarray(x)
    serial = x.size < _POOL_PARALLEL_MIN
    if size == 2 and stride == 2:  # the seed's models pool only this way
        _run(_pool2x2_forward if with_argmax else _pool2x2_values, serial, x, y, argmax)
    else:
        _run(_pool_forward, serial, x, size, stride, y, argmax)
    return y, (argmax if with_argmax else None)


@_parallel
def _pool_backward(dy, argmax, dx):
    """Scatter-add dy at argmax into dx (zeroed here); returns how many argmax values lie
    outside their plane (those are skipped, and the caller raises)."""
    P, HW = dx.shape
    outside = 0
    for t in prange(P):  # one plane per task; overlapping windows add up within it
        plane = dx[t]
        for k in range(HW):
            plane[k] = 0
        for k in range(dy.shape[1]):
            at = argmax[t, k]
            if 0 <= at < HW:
                plane[at] += dy[t, k]
            else:
                outside += 1
    return outside


def maxpool2d_backward(dy, argmax, input_shape, size, stride):
    """dx (input_shape): every dy[n, c, i, j] added at its argmax position in plane (n, c)."""
    (n, ch, h, w), size, stride = c.check_pool_backward(dy, argmax, input_shape, size, stride)
    dx = np.empty((n * ch, h * w), dy.dtype)
    outside = _pool_backward(np.ascontiguousarray(dy).reshape(n * ch, -1),
                             np.ascontiguousarray(argmax, dtype=np.int64).reshape(n * ch, -1), dx)
    if outside:  # checked inside the kernel: a separate pass over argmax cost as much
        raise c.argmax_range_error(h, w, outside)
    return dx.reshape(n, ch, h, w)


# -- average pooling and the residual add ------------------------------------------------------


@_parallel
def _avgpool_forward(x, size, stride, y):
    N, C = x.shape[0], x.shape[1]
    OH, OW = y.shape[2], y.shape[3]
    scale = size * size
    for t in prange(N * C):  # one plane per task
        n, ch = t // C, t % C
        for i in range(OH):
            out = y[n, ch, i]
            for j in range(OW):
                total = out[j]  # y starts zeroed: a zero in x's dtype
                for p in range(size):
                    row = x[n, ch, i * stride + p]
                    for q in range(size):
                        total += row[j * stride + q]
                out[j] = total / scale


@_parallel
def _avgpool_backward(dy, size, stride, dx):
    N, C = dy.shape[0], dy.shape[1]
    OH, OW = dy.shape[2], dy.shape[3]
    scale = size * size
    for t in prange(N * C):  # one plane per task: overlapping windows add up in it
        n, ch = t // C, t % C
        for i in range(OH):
            g = dy[n, ch, i]
            for j in range(OW):
                share = g[j] / scale
                for p in range(size):
                    row = dx[n, ch, i * stride + p]
                    for q in range(size):
                        row[j * stride + q] += share


def avgpool2d_forward(x, size, stride):
    """The mean of every size x size window moved by stride: (N, C, OH, OW)."""
    size, stride, shape = c.check_pool_forward(x, size, stride)
    y = np.zeros(shape, x.dtype)
    _run(_avgpool_forward, x.size < _POOL_PARALLEL_MIN, np.ascontiguousarray(x), size, stride,
         y)
    return y


def avgpool2d_backward(dy, input_shape, size, stride):
    """dy / size^2 added to every value of its window."""
    input_shape, size, stride = c.check_avgpool_backward(dy, input_shape, size, stride)
    dx = np.zeros(input_shape, dy.dtype)
    _run(_avgpool_backward, dx.size < _POOL_PARALLEL_MIN, np.ascontiguousarray(dy), size, stride,
         dx)
    return dx


@_parallel
def _plane_means(x, y):
    """y[r] = mean of row r of x (rows: planes), summed in order."""
    L = x.shape[1]
    for r in prange(x.shape[0]):
        row = x[r]
        total = y[r]  # zero
        for k in range(L):
            total += row[k]
        y[r] = total / L


@_parallel
def _spread(dy, dx):
    """dx[r, k] = dy[r] / L for every k of row r."""
    L = dx.shape[1]
    for r in prange(dx.shape[0]):
        share = dy[r] / L
        row = dx[r]
        for k in range(L):
            row[k] = share


def global_avgpool_forward(x):
    """(N, C, H, W) -> (N, C): the mean of every plane."""
    c.check_array("x", x, 4)
    n, ch, h, w = x.shape
    y = np.zeros(n * ch, x.dtype)
    _run(_plane_means, x.size < _PARALLEL_MIN, np.ascontiguousarray(x).reshape(n * ch, h * w),
         y)
    return y.reshape(n, ch)


def global_avgpool_backward(dy, input_shape):
    """dy[n, c] / (H * W) at every value of plane (n, c)."""
    n, ch, h, w = c.check_global_avgpool_backward(dy, input_shape)
    dx = np.empty((n * ch, h * w), dy.dtype)
    _run(_spread, dx.size < _PARALLEL_MIN, np.ascontiguousarray(dy).reshape(-1), dx)
    return dx.reshape(n, ch, h, w)


@_parallel
def _add(a, b, out):
    for i in prange(a.size):
        out[i] = a[i] + b[i]


def add(a, b):
    """a + b, elementwise (the residual connection)."""
    c.check_add(a, b)
    out = np.empty(a.shape, a.dtype)
    _run(_add, a.size < _PARALLEL_MIN, np.ascontiguousarray(a).reshape(-1),
         np.ascontiguousarray(b).reshape(-1), out.reshape(-1))
    return out


# -- elementwise, dense, loss -----------------------------------------------------------------


# NOTE: each serial twin is its own function, not a second jit of the parallel one: Numba's
# on-disk cache is keyed by the function, so two builds of one function would share entries.
@_parallel
def _relu_forward(x, y):
    for i in prange(x.size):
        y[i] = 0 if x[i] <= 0 else x[i]  # NOTE: NaN <= 0 is false: a NaN passes


@_serial
def _relu_forward_serial(x, y):
    for i in range(x.size):
        y[i] = 0 if x[i] <= 0 else x[i]  # NOTE: NaN <= 0 is false: a NaN passes


@_parallel
def _relu_backward(dy, y, dx):
    for i in prange(dy.size):
        dx[i] = dy[i] * 0 if y[i] <= 0 else dy[i]  # NOTE: dy * 0 keeps a NaN dy NaN


@_serial
def _relu_backward_serial(dy, y, dx):
    for i in range(dy.size):
        dx[i] = dy[i] * 0 if y[i] <= 0 else dy[i]  # NOTE: dy * 0 keeps a NaN dy NaN


def relu_forward(x):
    """y = 0 where x <= 0, else x (NaN passes), elementwise, any shape."""
    c.check_array("x", x)
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    kernel = _relu_forward if x.size >= _PARALLEL_MIN else _relu_forward_serial
    kernel(x.reshape(-1), y.reshape(-1))
    return y


def relu_backward(dy, y):
    """dx = dy where the forward output y was not <= 0 (positive or NaN), else dy * 0."""
    c.check_relu_backward(dy, y)
    dy = np.ascontiguousarray(dy)
    dx = np.empty_like(dy)
    kernel = _relu_backward if dy.size >= _PARALLEL_MIN else _relu_backward_serial
    kernel(dy.reshape(-1), np.ascontiguousarray(y).reshape(-1), dx.reshape(-1))
    return dx


# NOTE: dense layers are computed here rather than by NumPy's matmul on purpose. OpenBLAS runs its
# own thread pool; with Numba's threads spinning on the same cores between kernels, the two pools
# stalled each other for milliseconds per call (a 4-MFLOP GEMM took 8 ms). One runtime owns the
# cores during training.


@_parallel
def _dense_forward(x, w, b, y):
    N, IN = x.shape
    OUT = w.shape[0]
    nblocks = (N + 1) // 2
    for t in prange(((OUT + 3) // 4) * nblocks):  # 4 outputs x 2 samples per task
        o0, n0 = (t // nblocks) * 4, (t % nblocks) * 2  # neighbours share the 4 rows of w
        # rows past the end repeat the last one; their sums are not stored
        w0, w1, w2, w3 = w[o0], w[min(o0 + 1, OUT - 1)], w[min(o0 + 2, OUT - 1)], \
            w[min(o0 + 3, OUT - 1)]
        xa, xb = x[n0], x[min(n0 + 1, N - 1)]
        zero = y[n0, o0]  # y starts zeroed: a zero in the arrays' dtype
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = zero
        for k in range(IN):  # 8 running sums, 6 loads per 8 multiply-adds
            s0 += xa[k] * w0[k]
            s1 += xa[k] * w1[k]
            s2 += xa[k] * w2[k]
            s3 += xa[k] * w3[k]
            s4 += xb[k] * w0[k]
            s5 += xb[k] * w1[k]
            s6 += xb[k] * w2[k]
            s7 += xb[k] * w3[k]
        sums = ((s0, s1, s2, s3), (s4, s5, s6, s7))
        for j in range(2):
            for i in range(4):
                if n0 + j < N and o0 + i < OUT:
                    y[n0 + j, o0 + i] = sums[j][i] + b[o0 + i]


def dense_forward(x, w, b):
    """y = x w^T + b: x (N, IN), w (OUT, IN), b (OUT,) -> (N, OUT)."""
    c.check_dense_forward(x, w, b)
    y = np.zeros((x.shape[0], w.shape[0]), x.dtype)
    _run(_dense_forward, _serially(2 * y.size * x.shape[1]), np.ascontiguousarray(x),
         np.ascontiguousarray(w), b, y)
    return y


@_parallel
def _matmul(a, bm, out):
    """out (M, K) = a (M, R) @ bm (R, K), all C-contiguous: the register tile of the convolution
    (4 rows x _V columns of out in registers, one pass over R)."""
    M, R = a.shape
    K = bm.shape[1]
    blocks, full = (M + 3) // 4, K // _V  # full tiles of _V columns; the rest at the end
    runs = max(1, (full + 7) // 8)
    b = _flat(bm)
    for t in prange(runs * blocks):  # 8 tiles of 4 rows per task
        run, m0 = t // blocks, (t % blocks) * 4
        r0, r1, r2, r3 = m0, min(m0 + 1, M - 1), min(m0 + 2, M - 1), min(m0 + 3, M - 1)
        a0 = _stack_buffer(_V, out.dtype)
        a1 = _stack_buffer(_V, out.dtype)
        a2 = _stack_buffer(_V, out.dtype)
        a3 = _stack_buffer(_V, out.dtype)
        for tile in range(run * 8, min(run * 8 + 8, full)):
            k0 = tile * _V
            for v in range(_V):
                a0[v] = a1[v] = a2[v] = a3[v] = 0
            for r in range(R):
                at = r * K + k0
                _tile_step(a0, a1, a2, a3, a[r0, r], a[r1, r], a[r2, r], a[r3, r], b, at)
            for v in range(_V):
                out[m0, k0 + v] = a0[v]
            if m0 + 1 < M:
                for v in range(_V):
                    out[m0 + 1, k0 + v] = a1[v]
            if m0 + 2 < M:
                for v in range(_V):
                    out[m0 + 2, k0 + v] = a2[v]
            if m0 + 3 < M:
                for v in range(_V):
                    out[m0 + 3, k0 + v] = a3[v]
        if run == runs - 1:  # the last K % _V columns of these rows, plainly
            for m in range(m0, min(m0 + 4, M)):
                for k in range(full * _V, K):
                    acc = 0.0  # a few columns: summed in float64 whatever the dtype
                    for r in range(R):
                        acc += a[m, r] * bm[r, k]
                    out[m, k] = acc


@_serial
def _column_sums(dy, db):
    for n in range(dy.shape[0]):
        for o in range(dy.shape[1]):
            db[o] += dy[n, o]


def dense_backward(dy, x, w):
    """(dx = dy w (N, IN), dw = dy^T x (OUT, IN), db = sum_n dy (OUT,))."""
    c.check_dense_backward(dy, x, w)
    dy = np.ascontiguousarray(dy)
    dx = np.empty(x.shape, dy.dtype)
    dw = np.empty(w.shape, dy.dtype)
    db = np.zeros(w.shape[0], dy.dtype)
    _matmul_into(dy, w, dx)
    _matmul_into(dy.T, x, dw)
    _column_sums(dy, db)
    return dx, dw, db


@_serial
def _softmax_cross_entropy(logits, labels, dlogits):
    N, K = logits.shape
    loss = 0.0
    for n in range(N):
        top = logits[n, 0]
        for k in range(1, K):
            top = max(top, logits[n, k])
        total = 0.0
        for k in range(K):
            e = np.exp(logits[n, k] - top)  # NOTE: shifted by the max, so exp cannot overflow
            dlogits[n, k] = e
            total += e
        loss += np.log(total) + top - logits[n, labels[n]]
        for k in range(K):
            dlogits[n, k] = dlogits[n, k] / total / N
        dlogits[n, labels[n]] -= 1.0 / N
    return loss / N


def softmax_cross_entropy(logits, labels):
    """(mean cross-entropy of softmax(logits) against labels, its gradient (N, K))."""
    c.check_softmax_cross_entropy(logits, labels)
    dlogits = np.empty_like(logits)
    loss = _softmax_cross_entropy(np.ascontiguousarray(logits),
                                  np.ascontiguousarray(labels, dtype=np.int64), dlogits)
    return float(loss), dlogits


@_parallel
def _sgd_update(param, grad, lr):
    for i in prange(param.size):
        param[i] -= lr * grad[i]


@_serial
def _sgd_update_serial(param, grad, lr):
    for i in range(param.size):
        param[i] -= lr * grad[i]



def sgd_update(param, grad, lr):
    """param -= lr * grad, in place, in one pass (no temporary array)."""
    c.check_sgd_update(param, grad, lr)
    kernel = _sgd_update if param.size >= _PARALLEL_MIN else _sgd_update_serial
    kernel(param.reshape(-1), np.ascontiguousarray(grad).reshape(-1), param.dtype.type(lr))


# -- optimizers: one fused pass over each parameter (and its state) --------------------------


@_inlined
def _momentum_at(param, grad, velocity, i, lr, momentum, weight_decay, nesterov):
    g = grad[i] + weight_decay * param[i]
    velocity[i] = momentum * velocity[i] + g
    if nesterov:
        param[i] -= lr * (g + momentum * velocity[i])
    else:
        param[i] -= lr * velocity[i]


@_parallel
def _sgd_momentum(param, grad, velocity, lr, momentum, weight_decay, nesterov):
    for i in prange(param.size):
        _momentum_at(param, grad, velocity, i, lr, momentum, weight_decay, nesterov)


@_serial
def _sgd_momentum_serial(param, grad, velocity, lr, momentum, weight_decay, nesterov):
    for i in range(param.size):
        _momentum_at(param, grad, velocity, i, lr, momentum, weight_decay, nesterov)


def sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay, nesterov):
    """torch.optim.SGD's step (dampening 0), in place on param and velocity, in one pass."""
    lr, momentum, weight_decay = c.check_sgd_momentum_update(param, grad, velocity, lr, momentum,
                                                             weight_decay)
    t = param.dtype.type
    kernel = _sgd_momentum if param.size >= _PARALLEL_MIN else _sgd_momentum_serial
    kernel(param.reshape(-1), np.ascontiguousarray(grad).reshape(-1), velocity.reshape(-1),
           t(lr), t(momentum), t(weight_decay), bool(nesterov))


@_inlined
def _adam_at(param, grad, m, v, i, b, eps, weight_decay, decay, step_size, inv_root_bc2):
    # b = (beta1, 1 - beta1, beta2, 1 - beta2), all in the arrays' dtype (an int 1 - a float32
    # would be float64 in Numba)
    p = param[i] * decay  # decay is 1 - lr * weight_decay for AdamW, else 1
    g = grad[i] + weight_decay * p  # weight_decay is 0 here for AdamW
    mi = b[0] * m[i] + b[1] * g
    vi = b[2] * v[i] + b[3] * g * g
    m[i] = mi
    v[i] = vi
    param[i] = p - step_size * mi / (np.sqrt(vi) * inv_root_bc2 + eps)


@_parallel
def _adam(param, grad, m, v, b, eps, weight_decay, decay, step_size, inv_root_bc2):
    for i in prange(param.size):
        _adam_at(param, grad, m, v, i, b, eps, weight_decay, decay, step_size, inv_root_bc2)


@_serial
def _adam_serial(param, grad, m, v, b, eps, weight_decay, decay, step_size, inv_root_bc2):
    for i in range(param.size):
        _adam_at(param, grad, m, v, i, b, eps, weight_decay, decay, step_size, inv_root_bc2)


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, step):
    """torch.optim.Adam's step (AdamW's when decoupled), in place on param, m and v, in one
    pass; the bias corrections are computed once here, in float64."""
    lr, beta1, beta2, eps, weight_decay, step = c.check_adam_update(
        param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step)
    t = param.dtype.type
    decay, coupled = (1 - lr * weight_decay, 0.0) if decoupled else (1.0, weight_decay)
    kernel = _adam if param.size >= _PARALLEL_MIN else _adam_serial
    kernel(param.reshape(-1), np.ascontiguousarray(grad).reshape(-1), m.reshape(-1),
           v.reshape(-1), (t(beta1), t(1 - beta1), t(beta2), t(1 - beta2)), t(eps), t(coupled),
           t(decay), t(lr / (1 - beta1**step)), t(1 / np.sqrt(1 - beta2**step)))


# -- dropout and batch normalization ----------------------------------------------------------


@_parallel
def _dropout(x, keep, scale, y):
    for i in prange(x.size):
        y[i] = x[i] * scale if keep[i] else x[i] * 0  # NOTE: x * 0 keeps a NaN NaN


@_serial
def _dropout_serial(x, keep, scale, y):
    for i in range(x.size):
        y[i] = x[i] * scale if keep[i] else x[i] * 0


def dropout(x, keep, scale):
    """y = x * scale where keep, x * 0 elsewhere, in one pass."""
    scale = c.check_dropout(x, keep, scale)
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    kernel = _dropout if x.size >= _PARALLEL_MIN else _dropout_serial
    kernel(x.reshape(-1), np.ascontiguousarray(keep).reshape(-1), x.dtype.type(scale),
           y.reshape(-1))
    return y


# NOTE: one channel per task; every sum runs in float64 whatever the arrays' dtype. The forward
# pass sums x - (the channel's first value) and its square in one read (shifted sums keep the
# variance accurate when the mean is large), then writes y = x * a + b in a second.
@_parallel
def _batchnorm_forward(x, gamma, beta, eps, y, mean, var):
    N, C, L = x.shape
    M = N * L
    for ch in prange(C):
        shift = float(x[0, ch, 0])
        s = 0.0
        ss = 0.0
        for n in range(N):
            row = x[n, ch]
            for k in range(L):
                d = float(row[k]) - shift
                s += d
                ss += d * d
        mu = shift + s / M
        v = max(ss / M - (s / M) ** 2, 0.0)
        mean[ch] = mu
        var[ch] = v
        _batchnorm_affine(x, ch, gamma[ch] / np.sqrt(v + eps), mu, beta[ch], y)


@_inlined
def _batchnorm_affine(x, ch, a64, mu, beta, y):
    """y[:, ch] = (x[:, ch] - mu) * a + beta, as x * a + b in x's dtype."""
    a = y.dtype.type(a64)
    b = y.dtype.type(beta - mu * a64)
    for n in range(x.shape[0]):
        row, out = x[n, ch], y[n, ch]
        for k in range(x.shape[2]):
            out[k] = row[k] * a + b


@_parallel
def _batchnorm_inference(x, gamma, beta, mean, var, eps, y):
    for ch in prange(x.shape[1]):
        _batchnorm_affine(x, ch, gamma[ch] / np.sqrt(float(var[ch]) + eps), float(mean[ch]),
                          float(beta[ch]), y)


@_parallel
def _batchnorm_backward(dy, x, gamma, mean, var, eps, dx, dgamma, dbeta):
    N, C, L = x.shape
    M = N * L
    for ch in prange(C):
        mu = float(mean[ch])
        inv = 1 / np.sqrt(float(var[ch]) + eps)
        sdy = 0.0
        sdyx = 0.0
        for n in range(N):
            g, row = dy[n, ch], x[n, ch]
            for k in range(L):
                sdy += g[k]
                sdyx += float(g[k]) * (float(row[k]) - mu)
        dbeta[ch] = sdy
        dgamma[ch] = sdyx * inv
        # dx = gamma inv (dy - sdy / M - xhat * dgamma / M) = dy * c1 - x * c3 + (mu c3 - c2)
        c1 = float(gamma[ch]) * inv
        c3 = c1 * inv * inv * sdyx / M
        c0 = mu * c3 - c1 * sdy / M
        t = dx.dtype.type
        a, b, d = t(c1), t(c3), t(c0)
        for n in range(N):
            g, row, out = dy[n, ch], x[n, ch], dx[n, ch]
            for k in range(L):
                out[k] = g[k] * a - row[k] * b + d


def batchnorm_forward(x, gamma, beta, eps):
    """(y, mean, var) of batch normalization over axes 0 and 2 of x (N, C, L)."""
    eps = c.check_batchnorm(x, gamma, beta, eps)
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    mean, var = np.empty(x.shape[1], x.dtype), np.empty(x.shape[1], x.dtype)
    _batchnorm_forward(x, gamma, beta, eps, y, mean, var)
    return y, mean, var


def batchnorm_inference(x, gamma, beta, mean, var, eps):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta per channel of x (N, C, L)."""
    eps = c.check_batchnorm(x, gamma, beta, eps, (("mean", mean), ("var", var)))
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    # NOTE: no serial twin here: its compiled affine loop may fuse x * a + b into one FMA where
    # the parallel one doesn't (last-bit differences, float64), and the numbers must not depend
    # on the batch size
    _batchnorm_inference(x, gamma, beta, mean, var, eps, y)
    return y


def batchnorm_backward(dy, x, gamma, mean, var, eps):
    """(dx, dgamma, dbeta) of batchnorm_forward, one channel per task."""
    eps = c.check_batchnorm_backward(dy, x, gamma, mean, var, eps)
    x = np.ascontiguousarray(x)
    dx = np.empty_like(x)
    dgamma, dbeta = np.empty(x.shape[1], x.dtype), np.empty(x.shape[1], x.dtype)
    _batchnorm_backward(np.ascontiguousarray(dy), x, gamma, mean, var, eps, dx, dgamma, dbeta)
    return dx, dgamma, dbeta
