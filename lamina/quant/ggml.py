"""GGML's block formats for weight matrices, in PyTorch: quantize, dequantize and convert.

A matrix [N, K] in a format of lamina.kernels.types.TYPES is stored row by row as K / block blocks, held as uint8
[N, K / block * bytes]; the byte layouts are in types.py. What a block holds (d, m, dmin: float16 scales):

  type    block  bytes  bits   holds                                               QUANTIZE follows GGML's
  Q8_0      32     34   8.5    d, 32 int8 q                                        quantize_row_q8_0_ref
  Q4_0      32     18   4.5    d, 32 4-bit q, w = d (q - 8)                        quantize_row_q4_0_ref
  Q4_1      32     20   5.0    d, m, 32 4-bit q, w = d q + m                       quantize_row_q4_1_ref
  Q5_0      32     22   5.5    d, 32 5-bit q, w = d (q - 16)                       quantize_row_q5_0_ref
  Q5_1      32     24   6.0    d, m, 32 5-bit q                                    quantize_row_q5_1_ref
  IQ4_NL    32     18   4.5    d, 32 4-bit indices into KVALUES                    quantize_iq4_nl (scale search)
  IQ4_XS   256    136   4.25   d, 8 6-bit scales, 256 indices into KVALUES         quantize_iq4_xs
  Q2_K     256     84   2.625  d, dmin, 16 (4-bit scale, 4-bit min), 2-bit q       quantize_row_q2_K_ref
  Q3_K     256    110   3.44   d, 16 6-bit scales, 3-bit q                         quantize_row_q3_K_ref
  Q4_K     256    144   4.5    d, dmin, 8 (6-bit scale, 6-bit min), 4-bit q        quantize_row_q4_K_ref
  Q5_K     256    176   5.5    d, dmin, 8 (6-bit scale, 6-bit min), 5-bit q        quantize_row_q5_K_ref
  Q6_K     256    210   6.56   d, 16 int8 scales, 6-bit q                          quantize_row_q6_K_ref
  F16       32     64  16      32 float16 (GGML's blocks of 1, 32 at a time)       GGML_FP32_TO_FP16
  BF16      32     64  16      32 bfloat16                                          GGML_FP32_TO_BF16

These are the bytes a GGUF file holds, so a file's blocks are used as they are. `dequantize` equals GGML's (and the
`gguf` package's) float32 result bit for bit, on any device. The 32-weight quantizers give GGML's bytes exactly; the
others (no importance weights: what llama-quantize writes without an imatrix) run GGML's search, vectorised over
blocks, with sums taken in torch's order, so a near tie between two candidates may fall the other way than in a C
build (whose own result depends on the compiler contracting multiply-adds).
"""

from __future__ import annotations

import functools

import torch

from lamina.kernels.types import KVALUES, TYPES

QK = 32  # weights per block of the 32-weight formats (the K-quants and IQ4_XS have 256: TYPES[name].block)
BLOCK_BYTES = {name: t.nbytes for name, t in TYPES.items()}
_EPS = 1e-15  # GGML's GROUP_MAX_EPS: a group whose largest magnitude is below it is all zero
# Weights quantized at a time: on a CPU the searches' temporaries then stay in cache (2**15 to 2**17 measured
# fastest); an accelerator wants large launches.
_CHUNK = {"cpu": 1 << 16}
_CHUNK_OTHER = 1 << 22


# ---- bytes and numbers -----------------------------------------------------------------------------------------------


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> float32 [..., 1], read as little-endian float16."""
    return raw.contiguous().view(torch.float16).float()


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float [..., 1] -> [..., 2] uint8: float16, rounded to nearest even as GGML_FP32_TO_FP16."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _u8(x: torch.Tensor) -> torch.Tensor:
    """Integer values -> their low byte, as C stores an int into a uint8_t."""
    return (x.to(torch.int32) & 0xFF).to(torch.uint8)


def _consts(like: torch.Tensor, values, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=like.device)


def _f32(value: float) -> float:
    """`value` rounded to float32, as C rounds each step of a float expression."""
    return torch.tensor(value, dtype=torch.float32).item()


def _nearest(x: torch.Tensor) -> torch.Tensor:
    """GGML's nearest_int (float32 + 1.5 * 2**23): round half to even, as torch.round."""
    return torch.round(x)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: round half away from zero (exact: no x + 0.5 that rounds up)."""
    a = x.abs()
    f = a.floor()
    return torch.copysign(f + (2 * (a - f)).floor(), x)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [..., 1]: the first value of largest magnitude, as GGML's `if (ax > amax)` loops find it."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


def _rdiv(a: float, x: torch.Tensor) -> torch.Tensor:
    """a / x, rounded once as C divides (torch computes `a / x` for a Python number a as a * (1 / x))."""
    return torch.div(torch.full((), a, dtype=x.dtype, device=x.device), x)


def _div(x: torch.Tensor, b: float) -> torch.Tensor:
    """x / b, rounded once as C divides (CUDA computes `x / b` for a Python number b as x * (1 / b))."""
    return torch.div(x, torch.full((), b, dtype=x.dtype, device=x.device))


def _inv(x: torch.Tensor) -> torch.Tensor:
    """1 / x, and 0 where x is 0 (GGML's `d ? 1/d : 0`)."""
    return torch.where(x == 0, 0.0, _rdiv(1.0, torch.where(x == 0, 1.0, x)))


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[..., 32] values < 16 -> [..., 16] bytes: q[j] in the low half of byte j, q[j + 16] in the high half."""
    q = q.to(torch.int32)
    return _u8(q[..., :16] | (q[..., 16:] << 4))


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    """The inverse of _nibbles: [..., 16] bytes -> [..., 32] int32."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1).to(torch.int32)


def _bits(raw: torch.Tensor, width: int = 1) -> torch.Tensor:
    """[..., m] bytes -> [..., 8 / width, m] int32: field s of byte j (bits width*s ...) at [s, j]."""
    shifts = _consts(raw, list(range(0, 8, width)), torch.uint8)[:, None]
    return ((raw.unsqueeze(-2) >> shifts) & ((1 << width) - 1)).to(torch.int32)


def _pack(fields: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of _bits: [..., 8 / width, m] values < 2**width -> [..., m] bytes."""
    shifts = _consts(fields, list(range(0, 8, width)))[:, None]
    return _u8((fields.to(torch.int32) << shifts).sum(-2))


# ---- GGML's scale searches, vectorised over groups (the last dimension is one group of weights) ---------------------


def _make_qkx2(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool):
    """make_qkx2_quants: x ~ scale * L - min with L in 0..nmax, fitted by weighted least squares over nstep + 1
    trial scales (weights w); each trial grids x from the best min so far. Returns (scale, min, L) with scale and
    min [..., 1] (min >= 0, the subtracted one)."""
    hi = x.amax(-1, keepdim=True)
    m = x.amin(-1, keepdim=True).clamp(max=0)
    flat = hi == m
    m0 = m
    sum_w = w.sum(-1, keepdim=True)
    sum_x = (w * x).sum(-1, keepdim=True)

    def error(scale, m, L):
        diff = scale * L + m - x
        return (w * (diff.abs() if mad else diff * diff)).sum(-1, keepdim=True)

    iscale = _rdiv(nmax, torch.where(flat, 1.0, hi - m))
    scale = _rdiv(1.0, iscale)
    L = _nearest(iscale * (x - m)).clamp(0, nmax)
    best = error(scale, m, L)
    for step in range(nstep + 1):
        trial = _f32(_f32(rmin + _f32(_f32(rdelta) * step)) + nmax)  # (rmin + rdelta*is + nmax) in float
        Laux = _nearest(_rdiv(trial, hi - m) * (x - m)).clamp(0, nmax)
        sum_l = (w * Laux).sum(-1, keepdim=True)
        sum_l2 = (w * Laux * Laux).sum(-1, keepdim=True)
        sum_xl = (w * Laux * x).sum(-1, keepdim=True)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0  # a positive min is not allowed: fit the scale alone
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        cur = error(this_scale, this_min, Laux)
        better = (D > 0) & (cur < best) & ~flat
        L = torch.where(better, Laux, L)
        best, scale = torch.where(better, cur, best), torch.where(better, this_scale, scale)
        m = torch.where(better, this_min, m)
    return torch.where(flat, 0.0, scale), -torch.where(flat, m0, m), torch.where(flat, 0.0, L)


def _make_qx(x, nmax: int):
    """make_qx_quants (rmse_type 1, weights x^2): x ~ scale * (L - nmax) with L in 0..2 nmax - 1, the best of 19
    trial scales. Returns (scale [..., 1], L)."""
    top = _signed_absmax(x)
    zero = top.abs() < _EPS
    top = torch.where(zero, 1.0, top)
    w = x * x

    def fit(iscale):
        L = _nearest(iscale * x).clamp(-nmax, nmax - 1)
        return L, (w * x * L).sum(-1, keepdim=True), (w * L * L).sum(-1, keepdim=True)

    L, sumlx, suml2 = fit(_rdiv(-nmax, top))
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step:
            Laux, sumlx, suml2 = fit(_rdiv(-_f32(nmax + _f32(_f32(0.1) * step)), top))
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = torch.where(better, Laux, L)
            scale = torch.where(better, sumlx / suml2, scale)
            best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L + nmax)


def _make_q3(x, nmax: int):
    """make_q3_quants with do_rmse: a first scale from the largest weight, then up to 5 passes that move one L at a
    time where that improves the weighted (x^2) fit. Returns (scale [..., 1], L in 0..2 nmax - 1)."""
    top = _signed_absmax(x)
    zero = top.abs() < _EPS
    w = x * x
    L = _nearest(_rdiv(-nmax, torch.where(zero, 1.0, top)) * x).clamp(-nmax, nmax - 1)
    sumlx = (w * x * L).sum(-1)
    suml2 = (w * L * L).sum(-1)
    # GGML stops after a pass that changes nothing; a further pass would change nothing either.
    for _ in range(5):
        for i in range(x.shape[-1]):
            xi, wi, li = x[..., i], w[..., i], L[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = _nearest(xi * sl2 / slx).clamp(-nmax, nmax - 1)
            slx_new, sl2_new = slx + wi * xi * new, sl2 + wi * new * new
            take = (slx > 0) & (new != li) & (sl2_new > 0) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            L[..., i] = torch.where(take, new, li)
            sumlx, suml2 = torch.where(take, slx_new, sumlx), torch.where(take, sl2_new, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)[..., None]
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L + nmax)


def _grid(like):
    """GGML's best_index_int8 on KVALUES as two tables on floor(2x) + 256: level j is taken once 2x reaches
    val[j-1] + val[j], an integer, so floor(2x) decides it. Returns (index, value) tables."""
    t = torch.arange(-256, 256, device=like.device)
    mids2 = _consts(like, [a + b for a, b in zip(KVALUES, KVALUES[1:])], torch.int64)
    index = (t[:, None] >= mids2).sum(-1)
    return index, _consts(like, KVALUES, torch.float32)[index]


def _lookup(x2, table):
    """table[the grid level of x] for each x, given x2 = 2x (finite)."""
    return table.take(x2.floor().clamp(-256, 255).long() + 256)


def _iq4_scale(x):
    """quantize_row_iq4_nl_impl's per-32 scale (weights x^2, ntry 7): the least-squares scale of the best of 16
    index assignments to the KVALUES grid. x [..., 32] -> [..., 1]."""
    _, values = _grid(x)
    top = _signed_absmax(x)
    zero = top.abs() < _EPS
    top = torch.where(zero, 1.0, top)
    w = x * x
    wx = w * x  # GGML sums (w q) x: the same up to rounding, which the order of the sums changes anyway

    def fit(iscale):
        q = _lookup(2 * iscale * x, values)
        return (wx * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)

    sumqx, sumq2 = fit(_rdiv(1.0, _div(-top, KVALUES[0])))
    d = torch.where(sumq2 > 0, sumqx / sumq2, 0.0)
    best = d * sumqx
    for step in range(-7, 8):
        sumqx, sumq2 = fit(_rdiv(step + KVALUES[0], top))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, 0.0, d)


# ---- quantizers: float32 [B, block] -> uint8 [B, bytes] --------------------------------------------------------------


def _q8_0(x):
    d = _div(x.abs().amax(-1, keepdim=True), 127)
    q = _roundf(x * _inv(d)).to(torch.int8)
    return torch.cat([_f16_bytes(d), q.view(torch.uint8)], -1)


def _q4_0(x):
    d = _div(_signed_absmax(x), -8)
    q = (x * _inv(d) + 8.5).trunc().clamp(0, 15)
    return torch.cat([_f16_bytes(d), _nibbles(q)], -1)


def _q4_1(x):
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = _div(hi - lo, 15)
    q = ((x - lo) * _inv(d) + 0.5).trunc().clamp(0, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _nibbles(q)], -1)


def _high_bits(q):
    """[..., 32] 5-bit values -> qh: their 5th bits as 4 bytes, little-endian (bit j of the uint32 for q[j])."""
    return _pack(((q.to(torch.int32) >> 4) & 1).unflatten(-1, (4, 8)).transpose(-1, -2), 1)


def _q5_0(x):
    d = _div(_signed_absmax(x), -16)
    q = (x * _inv(d) + 16.5).trunc().clamp(0, 31)
    return torch.cat([_f16_bytes(d), _high_bits(q), _nibbles(q.to(torch.int32) & 0xF)], -1)


def _q5_1(x):
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = _div(hi - lo, 31)
    q = ((x - lo) * _inv(d) + 0.5).trunc().clamp(0, 31)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _high_bits(q), _nibbles(q.to(torch.int32) & 0xF)], -1)


def _iq4_nl(x):
    d = _iq4_scale(x)
    index, _ = _grid(x)
    return torch.cat([_f16_bytes(d), _nibbles(_lookup(2 * _inv(d) * x, index))], -1)


def _iq4_xs(x):
    B = x.shape[0]
    x = x.view(B, 8, 32)
    scales = _iq4_scale(x)[..., 0]  # [B, 8]
    d = _div(-_signed_absmax(scales), 32)  # [B, 1]
    ls = _nearest(_inv(d) * scales).clamp(-32, 31)
    index, _ = _grid(x)
    L = _lookup(2 * _inv(d * ls)[..., None] * x, index)  # [B, 8, 32]
    ls = ls.to(torch.int32) + 32
    scales_l = _u8((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4))
    high = ((ls >> 4) << (2 * _consts(x, list(range(8))))).sum(-1, keepdim=True)  # the uint16 scales_h
    scales_h = _u8(torch.cat([high, high >> 8], -1))
    return torch.cat([_f16_bytes(d), scales_h, scales_l, _nibbles(L).reshape(B, 128)], -1)


def _k_scales(scales, mins, bits: int):
    """A K-quant's sub-block scales and mins as `bits`-bit multiples of one float16 d and dmin each (the largest
    positive one maps to the top level). Returns (d, dmin [B, 1] float16-rounded float32, ls, lm [B, S] int32)."""
    top = float((1 << bits) - 1)
    out = []
    for v in (scales, mins):
        vmax = v.amax(1, keepdim=True).clamp(min=0)  # GGML's running max starts at 0
        q = _nearest(torch.where(vmax > 0, _rdiv(top, torch.where(vmax > 0, vmax, 1.0)), 0.0) * v)
        out += [_f16(_f16_bytes(_div(vmax, top))), q.to(torch.int32) & 0xFF]  # stored into a uint8_t
    d, ls, dmin, lm = out
    return d, dmin, ls, lm


def _q2_k(x):
    B = x.shape[0]
    x = x.view(B, 16, 16)
    scales, mins, L = _make_qkx2(x, x.abs(), 3, -0.5, 0.1, 15, True)
    d, dmin, ls, lm = _k_scales(scales[..., 0], mins[..., 0], 4)
    packed = (ls | (lm << 4)) & 0xFF
    dl, ml = (d * (packed & 0xF))[..., None], (dmin * (packed >> 4))[..., None]
    L = torch.where(dl != 0, _nearest((x + ml) / torch.where(dl != 0, dl, 1.0)).clamp(0, 3), L)
    qs = _pack(L.reshape(B, 2, 4, 32), 2).reshape(B, 64)
    return torch.cat([_u8(packed), qs, _f16_bytes(d), _f16_bytes(dmin)], -1)


def _q3_k(x):
    B = x.shape[0]
    x = x.view(B, 16, 16)
    scales, L = _make_q3(x, 4)
    scales = scales[..., 0]  # [B, 16]
    top = _signed_absmax(scales)
    iscale = torch.where(top != 0, _rdiv(-32.0, torch.where(top != 0, top, 1.0)), 0.0)
    ls = torch.where(top != 0, _nearest(iscale * scales).clamp(-32, 31) + 32, 0.0).to(torch.int32)
    d16 = _f16_bytes(_inv(iscale))
    dl = (_f16(d16) * (ls - 32))[..., None]
    L = torch.where(dl != 0, _nearest(x / torch.where(dl != 0, dl, 1.0)).clamp(-4, 3) + 4, L).reshape(B, 256)
    high = L > 3
    L = L - 4 * high
    hmask = _pack(high.view(B, 8, 32), 1)
    qs = _pack(L.view(B, 2, 4, 32), 2).reshape(B, 64)
    low = ls[:, :8] & 0xF | ((ls[:, 8:] & 0xF) << 4)
    upper = _pack((ls >> 4).view(B, 4, 4), 2)
    return torch.cat([hmask, qs, _u8(low), upper, d16], -1)


def _q45_k(x, nmax: int, rmin: float, nstep: int):
    B = x.shape[0]
    x = x.view(B, 8, 32)
    weights = _div((x * x).sum(-1, keepdim=True), 32).sqrt() + x.abs()
    scales, mins, L = _make_qkx2(x, weights, nmax, rmin, 0.1, nstep, False)
    d, dmin, ls, lm = _k_scales(scales[..., 0], mins[..., 0], 6)
    ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    dl, ml = (d * ls)[..., None], (dmin * lm)[..., None]
    L = torch.where(dl != 0, _nearest((x + ml) / torch.where(dl != 0, dl, 1.0)).clamp(0, nmax), L).to(torch.int32)
    packed = torch.cat(  # get_scale_min_k4's layout
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
        ],
        -1,
    )
    qs = _pack((L & 0xF).view(B, 4, 2, 32), 4).reshape(B, 128)
    qh = [_pack(L >> 4, 1)] if nmax == 31 else []
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _u8(packed), *qh, qs], -1)


def _q6_k(x):
    B = x.shape[0]
    x = x.view(B, 16, 16)
    scales, L = _make_qx(x, 32)
    scales = scales[..., 0]
    top = _signed_absmax(scales)
    zero = top.abs() < _EPS
    iscale = _rdiv(-128.0, torch.where(zero, 1.0, top))
    d16 = _f16_bytes(_rdiv(1.0, iscale))
    ls = _nearest(iscale * scales).clamp(max=127)
    dl = (_f16(d16) * ls)[..., None]
    L = torch.where(dl != 0, _nearest(x / torch.where(dl != 0, dl, 1.0)).clamp(-32, 31) + 32, L)
    L = L.to(torch.int32).view(B, 2, 4, 32)  # [half, quarter, l]
    ql = torch.cat([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4), L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], -1)
    qh = _pack(L >> 4, 2)
    out = torch.cat([_u8(ql).reshape(B, 128), qh.reshape(B, 64), _u8(ls), d16], -1)
    return torch.where(zero, 0, out)  # an all-zero block is all zero bytes


_QUANTIZERS = {
    "Q4_1": _q4_1,
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": functools.partial(_q45_k, nmax=15, rmin=-1.0, nstep=20),
    "Q5_K": functools.partial(_q45_k, nmax=31, rmin=-0.5, nstep=15),
    "Q6_K": _q6_k,
    "F16": _f16_bytes,  # rounded to nearest even, as GGML
    "BF16": lambda x: x.to(torch.bfloat16).view(torch.uint8),  # rounded to nearest even, as GGML (NaN aside)
}


def quantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """Float [N, K] -> uint8 [N, K / block * bytes], the GGML `qtype` blocks of its rows, as GGML's reference
    quantizer writes them (see the module's docstring); on w's device. K must be a multiple of the type's block."""
    if qtype not in _QUANTIZERS:
        raise ValueError(f"unknown block format {qtype!r}; expected one of {', '.join(_QUANTIZERS)}")
    t = TYPES[qtype]
    if w.dim() != 2 or w.shape[1] % t.block:
        raise ValueError(
            f"{qtype} quantizes rows whose length is a multiple of its block of {t.block} weights; "
            f"got a tensor of shape {tuple(w.shape)}"
        )
    x = w.detach().float().reshape(-1, t.block)
    out = torch.empty(x.shape[0], t.nbytes, dtype=torch.uint8, device=w.device)
    step = max(_CHUNK.get(w.device.type, _CHUNK_OTHER) // t.block, 1)
    for i in range(0, x.shape[0], step):
        out[i : i + step] = _QUANTIZERS[qtype](x[i : i + step])
    return out.reshape(w.shape[0], t.row_bytes(w.shape[1]))


# float matrix -> blocks, by format
QUANTIZE = {name: functools.partial(quantize, qtype=name) for name in _QUANTIZERS}
quantize_q8_0, quantize_q4_1 = QUANTIZE["Q8_0"], QUANTIZE["Q4_1"]


def q4_0_to_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks -> the same weights as Q4_1 blocks (m = -8d, exact in float16)."""
    N = blocks.shape[0]
    b = blocks.reshape(N, -1, BLOCK_BYTES["Q4_0"])
    m = _f16_bytes(-8 * _f16(b[..., :2]))
    return torch.cat([b[..., :2], m, b[..., 2:]], dim=-1).reshape(N, -1)


# ---- dequantizers: uint8 [B, bytes] -> float32 [B, block], in the order of GGML's float operations ----------------


def _dq_q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _dq_q4_0(b):
    return _f16(b[:, :2]) * (_unnibble(b[:, 2:]) - 8).float()


def _dq_q4_1(b):
    return _f16(b[:, :2]) * _unnibble(b[:, 4:]).float() + _f16(b[:, 2:4])


def _dq_q5(b, offset: int):
    qh = _bits(b[:, offset : offset + 4]).transpose(-1, -2).reshape(-1, 32)
    return _unnibble(b[:, offset + 4 :]) | (qh << 4)


def _dq_q5_0(b):
    return _f16(b[:, :2]) * (_dq_q5(b, 2) - 16).float()


def _dq_q5_1(b):
    return _f16(b[:, :2]) * _dq_q5(b, 4).float() + _f16(b[:, 2:4])


def _dq_iq4_nl(b):
    values = _consts(b, KVALUES, torch.float32)
    return _f16(b[:, :2]) * values[_unnibble(b[:, 2:]).long()]


def _dq_iq4_xs(b):
    values = _consts(b, KVALUES, torch.float32)
    scales_h = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)
    high = (scales_h[:, None] >> (2 * _consts(b, list(range(8))))) & 3
    low = torch.stack([b[:, 4:8] & 0xF, b[:, 4:8] >> 4], -1).reshape(-1, 8).to(torch.int32)
    dl = (_f16(b[:, :2]) * ((low | (high << 4)) - 32).float())[..., None]  # [B, 8, 1]
    q = _unnibble(b[:, 8:].reshape(-1, 8, 16)).long()
    return (dl * values[q]).reshape(-1, 256)


def _dq_q2_k(b):
    sc = b[:, :16]
    dl = (_f16(b[:, 80:82]) * (sc & 0xF).float())[..., None]
    ml = (_f16(b[:, 82:84]) * (sc >> 4).float())[..., None]
    q = _bits(b[:, 16:80].reshape(-1, 2, 32), 2).reshape(-1, 16, 16).float()
    return (dl * q - ml).reshape(-1, 256)


def _dq_q3_k(b):
    s = b[:, 96:108]
    low = _unnibble(s[:, :8])
    high = _bits(s[:, 8:], 2).reshape(-1, 16)
    dl = (_f16(b[:, 108:110]) * ((low | (high << 4)) - 32).float())[..., None]
    ql = _bits(b[:, 32:96].reshape(-1, 2, 32), 2).reshape(-1, 256)
    hm = _bits(b[:, :32]).reshape(-1, 256)
    q = (ql - 4 * (1 - hm)).float()  # the high bit set means no offset
    return (dl * q.view(-1, 16, 16)).reshape(-1, 256)


def _scale_min_k4(s):
    """get_scale_min_k4: 12 bytes -> 8 6-bit scales and 8 6-bit mins, [B, 8] int32 each."""
    s = s.to(torch.int32)
    s0, s1, s2 = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([s0 & 63, (s2 & 0xF) | ((s0 >> 6) << 4)], -1)
    m = torch.cat([s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)], -1)
    return sc, m


def _dq_q45_k(b, q):
    sc, m = _scale_min_k4(b[:, 4:16])
    dl = (_f16(b[:, :2]) * sc.float())[..., None]
    ml = (_f16(b[:, 2:4]) * m.float())[..., None]
    return (dl * q.float() - ml).reshape(-1, 256)


def _dq_q4_k(b):
    return _dq_q45_k(b, _bits(b[:, 16:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32))


def _dq_q5_k(b):
    ql = _bits(b[:, 48:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32)
    return _dq_q45_k(b, ql | (_bits(b[:, 16:48]) << 4))


def _dq_q6_k(b):
    ql = b[:, :128].reshape(-1, 2, 64)
    low = torch.cat([ql & 0xF, ql >> 4], -1).to(torch.int32)  # [B, 2, 128]
    high = _bits(b[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 2, 128)
    q = ((low | (high << 4)) - 32).float().view(-1, 16, 16)
    dl = (_f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float())[..., None]
    return (dl * q).reshape(-1, 256)


_DEQUANTIZERS = {
    "Q4_1": _dq_q4_1,
    "Q8_0": _dq_q8_0,
    "Q4_0": _dq_q4_0,
    "Q5_0": _dq_q5_0,
    "Q5_1": _dq_q5_1,
    "IQ4_NL": _dq_iq4_nl,
    "IQ4_XS": _dq_iq4_xs,
    "Q2_K": _dq_q2_k,
    "Q3_K": _dq_q3_k,
    "Q4_K": _dq_q4_k,
    "Q5_K": _dq_q5_k,
    "Q6_K": _dq_q6_k,
    "F16": _f16,
    "BF16": lambda b: b.contiguous().view(torch.bfloat16).float(),
}


def dequantize(blocks: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, K / block * bytes] (or [n_blocks * bytes] for a flat tensor) -> [N, K] (or flat) in `dtype`, on
    the blocks' device; in float32 it equals GGML's dequantize_row_* bit for bit."""
    if qtype not in _DEQUANTIZERS:
        raise ValueError(f"unknown block format {qtype!r}; expected one of {', '.join(_DEQUANTIZERS)}")
    nbytes = BLOCK_BYTES[qtype]
    if blocks.dim() == 0 or blocks.shape[-1] % nbytes:
        raise ValueError(f"{qtype} blocks are {nbytes} bytes each; got rows of {tuple(blocks.shape)[-1:]} bytes")
    w = _DEQUANTIZERS[qtype](blocks.reshape(-1, nbytes))
    return w.reshape(*blocks.shape[:-1], blocks.shape[-1] // nbytes * TYPES[qtype].block).to(dtype)
