"""Patch warp: KeDuSR's fold of matched Ref patches, overlaps summed (no division).

Math. value [C, Hv, Wv] is reflect-padded "same" style: for a side S, n = ceil(S/stride) patches,
total pad (n-1)*stride + ksize - S, top/left pad = total//2, bottom/right the rest. Key patch
p = (py, px) (flat id py*nW + px) is the ksize x ksize window of the padded value at
(py*stride, px*stride). For every query (qy, qx) with index[qy, qx] = p >= 0, that patch is added
to the output with its top-left at (stride*qy - P, stride*qx - P), P = (ksize-1)//2:

    out[c, oy, ox] = sum_{qy, qx} padded[c, py*s + oy - s*qy + P, px*s + ox - s*qx + P]

over the queries whose window covers (oy, ox) -- exactly F.fold(kernel ksize, stride s, padding P,
output size (s*Hq, s*Wq)) of the selected patches. KeDuSR divides by 5.0625 outside this op.

Contract. value [C, Hv, Wv] fp16/bf16/fp32; index [Hq, Wq] int64 in [-1, nH*nW); output
[C, stride*Hq, stride*Wq] in value's dtype, accumulated in fp32. Reflect padding needs every pad
< the side, i.e. Hv, Wv > max pad (ValueError otherwise); fold needs 0 <= 2P - ksize + stride <
stride (true for ksize 9, stride 4). The Triton kernel gathers, per output pixel, the at most
ceil(ksize/stride)^2 patches covering it; the unfolded value tensor is never built.

`patch_warp_blocked` is the CPU path. When P is a multiple of the stride (9 and 4: P = 4), a patch
is a 3x3 arrangement of stride x stride blocks of the padded value, and it lands on whole blocks
of the output. So the warp is 9 row gathers of a block table (each row one block's C*s*s values,
contiguous) added into the output's blocks at 9 shifts, instead of unfolding C*k*k values per
query and folding them back (3x faster on 32 channels, 240x320 queries, 2-core CPU, 2026-12-04).
It sums in another order, so it agrees with the reference to fp32 rounding.

`table_part` takes from a table the blocks one index map reads, onto the index's device: a GPU run
whose F_Ref_align table stays in host memory sends each tile only the blocks its matches touch
(at most 9 per query, fewer where neighbouring matches share blocks), and `patch_warp_blocked`
warps from that part exactly as from the whole table (the same rows, summed in the same order).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._launch import launch_config, require_triton, tl, triton

__all__ = [
    "PatchTable",
    "table_part",
    "patch_grid",
    "patch_table",
    "patch_warp",
    "patch_warp_blocked",
    "patch_warp_reference",
]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_REF_CHUNK_ELEMS = 1 << 24


def patch_grid(side: int, ksize: int = 9, stride: int = 4) -> tuple[int, int, int]:
    """(number of patches, top/left pad, bottom/right pad) along one side of the value map."""
    n = math.ceil(side / stride)
    total = (n - 1) * stride + ksize - side
    return n, total // 2, total - total // 2


def _check(value, index, ksize, stride):
    if not isinstance(value, torch.Tensor) or value.dim() != 3 or value.dtype not in _FLOAT:
        raise ValueError(
            f"patch_warp: value must be float [C, Hv, Wv], got {getattr(value, 'dtype', None)} "
            f"{tuple(getattr(value, 'shape', ()))}"
        )
    return _check_index(index, tuple(value.shape), value.device, ksize, stride)


def _check_index(index, value_shape, device, ksize, stride):
    """The index map and the geometry against a value map of `value_shape` on `device`:
    (patches per column, per row, top pad, left pad). `index=None`: the geometry alone."""
    if index is not None:
        if not isinstance(index, torch.Tensor) or index.dim() != 2 or index.dtype != torch.int64:
            raise ValueError(
                f"patch_warp: index must be int64 [Hq, Wq], got {getattr(index, 'dtype', None)} "
                f"{tuple(getattr(index, 'shape', ()))}"
            )
        if index.device != device:
            raise ValueError(f"patch_warp: value on {device}, index on {index.device}")
    if ksize < 1 or stride < 1:
        raise ValueError(f"patch_warp: ksize {ksize} and stride {stride} must be positive")
    pad = (ksize - 1) // 2
    if not 0 <= 2 * pad - ksize + stride < stride:
        raise ValueError(f"patch_warp: fold of ksize {ksize} stride {stride} is not {stride}x")
    _, hv, wv = value_shape
    nh, top, bottom = patch_grid(hv, ksize, stride)
    nw, left, right = patch_grid(wv, ksize, stride)
    if max(top, bottom) >= hv or max(left, right) >= wv:
        raise ValueError(
            f"patch_warp: value {tuple(value_shape)} too small for reflect pads "
            f"({top}, {bottom}, {left}, {right}) of ksize {ksize} stride {stride}"
        )
    if index is not None and index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < -1 or hi >= nh * nw:
            raise ValueError(f"patch_warp: index range [{lo}, {hi}] outside [-1, {nh * nw})")
    return nh, nw, top, left


def patch_warp_reference(
    value: torch.Tensor, index: torch.Tensor, ksize: int = 9, stride: int = 4
) -> torch.Tensor:
    """Plain PyTorch spec of `patch_warp` (gather + F.fold in bands of query rows)."""
    nh, nw, top, left = _check(value, index, ksize, stride)
    c, hv, wv = value.shape
    hq, wq = index.shape
    pad = (ksize - 1) // 2
    _, _, bottom = patch_grid(hv, ksize, stride)
    _, _, right = patch_grid(wv, ksize, stride)
    vp = F.pad(value[None].float(), (left, right, top, bottom), mode="reflect")[0]
    out = torch.zeros(c, stride * hq, stride * wq, dtype=torch.float32, device=value.device)
    if hq == 0 or wq == 0:
        return out.to(value.dtype)
    ar = torch.arange(ksize, device=value.device)
    rows_per_band = max(1, _REF_CHUNK_ELEMS // max(1, c * ksize * ksize * wq))
    for r0 in range(0, hq, rows_per_band):
        idx = index[r0 : r0 + rows_per_band]  # [nr, Wq]
        nr = idx.shape[0]
        valid = idx >= 0
        p = idx.clamp_min(0)
        ys = (p // nw * stride)[..., None] + ar  # [nr, Wq, k]
        xs = (p % nw * stride)[..., None] + ar
        patches = vp[:, ys[..., :, None], xs[..., None, :]]  # [C, nr, Wq, k, k]
        patches = patches * valid[None, :, :, None, None]
        cols = patches.permute(0, 3, 4, 1, 2).reshape(1, c * ksize * ksize, nr * wq)
        band = F.fold(
            cols, (stride * (nr - 1) + ksize, stride * wq), ksize, stride=stride, padding=(0, pad)
        )[0]
        y0 = stride * r0 - pad  # band row 0 on the output grid
        a, b = max(0, y0), min(stride * hq, y0 + band.shape[1])
        out[:, a:b] += band[:, a - y0 : b - y0]
    return out.to(value.dtype)


class PatchTable(NamedTuple):
    """A value map cut once into the block table that `patch_warp_blocked` gathers from, so that
    warping many tiles against the same Ref features pays for the padding and the reshuffle once
    (per call, for a whole F_Ref_align, it cost 4 of 18 s of a tiled CPU run, 2026-12-06)."""

    table: torch.Tensor  # [rb*sb + 1, C*s*s] (fp32 by default); the last row is zeros (no match)
    shape: tuple[int, int, int]  # (C, Hv, Wv) of the value map
    dtype: torch.dtype  # the value map's dtype (the warp's output dtype)
    ksize: int
    stride: int
    # a part (`table_part`): the ascending block numbers (of the whole table) its rows hold,
    # before its zero row; None: the whole table, every block in order
    blocks: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.table.device


def patch_table(
    value: torch.Tensor, ksize: int = 9, stride: int = 4, dtype: torch.dtype = torch.float32
) -> PatchTable:
    """The block table of `value` [C, Hv, Wv] for `patch_warp_blocked` (see the module docstring),
    its values in `dtype` (fp32: the CPU's warp adds them without a conversion; the value's own
    16-bit dtype halves a table kept in host memory for a GPU). Needs (ksize-1)//2 to be a
    multiple of the stride (9 and 4).

    Cut in bands of block rows straight from `value` (the reflect padding as row and column
    indices), so that making it holds the map, the table and one band: a padded copy of a 12 MP
    F_Ref_align would be two more maps of its size."""
    nh, nw, top, left = _check(value, None, ksize, stride)
    if ((ksize - 1) // 2) % stride:
        raise ValueError(f"patch_table: ksize {ksize} is not whole blocks of stride {stride}")
    c, hv, wv = value.shape
    s, nb = stride, -(-ksize // stride)
    _, _, bottom = patch_grid(hv, ksize, stride)
    _, _, right = patch_grid(wv, ksize, stride)
    rb, sb = nh - 1 + nb, nw - 1 + nb  # whole blocks covering every patch, per side
    dev = value.device
    table = torch.empty(rb * sb + 1, c * s * s, dtype=dtype, device=dev)
    blocks = table[:-1].view(rb, sb, c, s, s)
    band = max(1, _REF_CHUNK_ELEMS // (sb * s * s * c))  # block rows per band
    part = torch.zeros(c, min(band, rb) * s, sb * s, dtype=torch.float32, device=dev)
    # the reflected columns either side: left+wv+right of the padded width, zeros beyond
    left_cols = _reflected(torch.arange(-left, 0, device=dev), wv)
    right_cols = _reflected(torch.arange(wv, wv + right, device=dev), wv)
    for r0 in range(0, rb, band):
        r1 = min(r0 + band, rb)
        rows = torch.arange(r0 * s, r1 * s, device=dev)
        rows = _reflected(rows[rows < top + hv + bottom] - top, hv)  # below: zeros (unused)
        n, p = rows.numel(), part[:, : (r1 - r0) * s]
        p[:, :n, left : left + wv] = value.index_select(1, rows)
        p[:, :n, :left] = p[:, :n, left + left_cols]
        p[:, :n, left + wv : left + wv + right] = p[:, :n, left + right_cols]
        p[:, n:] = 0
        blocks[r0:r1].copy_(p.view(c, r1 - r0, s, sb, s).permute(1, 3, 0, 2, 4))
    table[-1] = 0
    return PatchTable(table, (c, hv, wv), value.dtype, ksize, stride)


def table_part(src: PatchTable, index: torch.Tensor) -> PatchTable:
    """The rows of `src` that `patch_warp_blocked(src, index)` reads, on index's device, as a
    table that warps `index` to the same output: the blocks of every matched patch (the zero
    row for the rest), gathered where `src` lives and sent once."""
    _, nw, _, _ = _check_index(index, src.shape, index.device, src.ksize, src.stride)
    if src.blocks is not None:
        raise ValueError("table_part: src is already a part of a table")
    nb = -(-src.ksize // src.stride)
    sb = nw - 1 + nb
    p = index[index >= 0]
    first = (p // nw) * sb + p % nw
    steps = torch.arange(nb, device=p.device)
    shifts = (steps[:, None] * sb + steps).reshape(1, -1)  # a patch's blocks from its first
    blocks = torch.unique(first[:, None] + shifts)  # sorted ascending
    shape = (blocks.numel() + 1, src.table.shape[1])
    part = torch.empty(shape, dtype=src.table.dtype, device=index.device)
    if blocks.numel():
        part[:-1].copy_(src.table.index_select(0, blocks.to(src.table.device)))
    part[-1] = 0
    return src._replace(table=part, blocks=blocks)


def _reflected(i: torch.Tensor, side: int) -> torch.Tensor:
    """Indices -side < i < 2 side - 1 mirrored into 0..side-1 as reflect padding does."""
    i = i.abs()
    return torch.where(i >= side, 2 * (side - 1) - i, i)


def patch_warp_blocked(
    value: torch.Tensor | PatchTable, index: torch.Tensor, ksize: int = 9, stride: int = 4
) -> torch.Tensor:
    """`patch_warp` by blocks (see the module docstring); the reference where P % stride != 0.
    `value` may be its `patch_table`, made once for many calls."""
    if isinstance(value, PatchTable):
        if (value.ksize, value.stride) != (ksize, stride):
            raise ValueError(
                f"patch_warp: table cut for ksize {value.ksize} stride {value.stride}, "
                f"called with ksize {ksize} stride {stride}"
            )
        src = value
    else:
        if ((ksize - 1) // 2) % stride:
            return patch_warp_reference(value, index, ksize, stride)
        src = patch_table(value, ksize, stride)
    c, hv, wv = src.shape
    nh, nw, _, _ = _check_index(index, src.shape, src.device, ksize, stride)
    hq, wq = index.shape
    s, nb, shift = stride, -(-ksize // stride), (ksize - 1) // 2 // stride
    dev, table = src.device, src.table
    sb = nw - 1 + nb
    none = table.shape[0] - 1  # the zero row
    p = index.reshape(-1)
    valid = p >= 0
    first = torch.where(valid, (p // nw) * sb + p % nw, torch.full_like(p, none))
    out = torch.zeros(hq + nb - 1, wq + nb - 1, c, s, s, dtype=torch.float32, device=dev)
    for a in range(nb):
        ra = min(s, ksize - a * s)  # the block's rows that lie in the patch (the last: fewer)
        for b in range(nb):
            rb = min(s, ksize - b * s)
            rows = torch.where(valid, first + a * sb + b, first)
            if src.blocks is not None:  # a part: block numbers to its rows (they are all in it)
                rows = torch.where(valid, torch.searchsorted(src.blocks, rows), none)
            blocks = table.index_select(0, rows).view(hq, wq, c, s, s)
            # offsets past the patch's edge contribute nothing: only the rest is added
            out[a : a + hq, b : b + wq, :, :ra, :rb] += blocks[..., :ra, :rb]
    out = out[shift : shift + hq, shift : shift + wq]  # output block qy + a - shift holds block a
    return out.permute(2, 0, 3, 1, 4).reshape(c, hq * s, wq * s).to(src.dtype)


@triton.jit
def _patch_warp_kernel(
    out_ptr,
    v_ptr, stride_vc, stride_vh,
    idx_ptr,
    C, HV, WV, HQ, WQ, NW, PAD_T, PAD_L, HO, WO,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, NT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """out[c, oy, ox] = sum over the <= NT x NT covering queries of padded value at the patch offset."""
    # -- map the program to [BLOCK_C channels, BLOCK_P output pixels] -------------------------
    pid_p = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_p = offs_p < HO * WO
    mask_c = offs_c < C
    oy = offs_p // WO
    ox = offs_p % WO
    P: tl.constexpr = (KSIZE - 1) // 2
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)

    # -- gather the covering patches ----------------------------------------------------------------
    for ty in range(NT):
        qy = (oy + P) // STRIDE - ty
        ry = oy + P - STRIDE * qy  # row inside the patch
        ok_y = (ry < KSIZE) & (qy >= 0) & (qy < HQ)
        for tx in range(NT):
            qx = (ox + P) // STRIDE - tx
            rx = ox + P - STRIDE * qx
            ok = mask_p & ok_y & (rx < KSIZE) & (qx >= 0) & (qx < WQ)
            p = tl.load(idx_ptr + qy * WQ + qx, mask=ok, other=-1)
            ok = ok & (p >= 0)
            vy = (p // NW) * STRIDE + ry - PAD_T
            vx = (p % NW) * STRIDE + rx - PAD_L
            # reflect padding (pads < side, checked by the launcher)
            vy = tl.where(vy < 0, -vy, vy)
            vy = tl.where(vy >= HV, 2 * (HV - 1) - vy, vy)
            vx = tl.where(vx < 0, -vx, vx)
            vx = tl.where(vx >= WV, 2 * (WV - 1) - vx, vx)
            v = tl.load(
                v_ptr + offs_c[:, None] * stride_vc + (vy * stride_vh + vx)[None, :],
                mask=mask_c[:, None] & ok[None, :], other=0.0,
            )  # fmt: skip
            acc += v.to(tl.float32)

    # -- write back -------------------------------------------------------------------------------
    tl.store(
        out_ptr + offs_c[:, None] * (HO * WO) + offs_p[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_c[:, None] & mask_p[None, :],
    )


def patch_warp(
    value: torch.Tensor, index: torch.Tensor, ksize: int = 9, stride: int = 4
) -> torch.Tensor:
    """Summed fold of the key patches picked by `index`: [C, stride*Hq, stride*Wq], value's dtype."""
    nh, nw, top, left = _check(value, index, ksize, stride)
    require_triton(value, index)
    c, hv, wv = value.shape
    hq, wq = index.shape
    ho, wo = stride * hq, stride * wq
    out = torch.empty(c, ho, wo, dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out
    value = value.contiguous()
    index = index.contiguous()
    cfg = launch_config("patch_warp", value.dtype)
    bc, bp = cfg.blocks["BLOCK_C"], cfg.blocks["BLOCK_P"]
    grid = (triton.cdiv(ho * wo, bp), triton.cdiv(c, bc))
    _patch_warp_kernel[grid](
        out, value, value.stride(0), value.stride(1), index,
        c, hv, wv, hq, wq, nw, top, left, ho, wo,
        KSIZE=ksize, STRIDE=stride, NT=-(-ksize // stride),
        BLOCK_C=bc, BLOCK_P=bp, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out
