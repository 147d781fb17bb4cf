"""Fused reference detail: the high band of the warp times its confidence gate, in two launches.

Math. warp_sum, gate [C, H, W] with H = 4*hq, W = 4*wq (the warp's output grid, 4x the query
grid [hq, wq]); cells are the 4x4 blocks of that grid, one per query. alpha is a 1-element tensor.

- norm "constant" (the published KeDuSR arithmetic):
      warped = warp_sum / 5.0625
      low    = bicubic_x4(avgpool4(warped))     (align_corners=False, A = -0.75, taps clamped)
      hf     = 2*alpha*(warped - low)
- norm "coverage" (each pixel divided by the patches that really cover it, holes left at zero):
      coverage[y, x] = number of queries (qy, qx) with index >= 0 whose 9x9 stride-4 patch covers
                       the pixel, i.e. |y - 4*qy| <= 4 and |x - 4*qx| <= 4
      covered = coverage > 0
      warped  = warp_sum / max(coverage, 1)
      low     = up(warped) / max(up(covered), 1e-3),  up = bilinear_x4(avgpool4(.))
                (align_corners=False)
      hf      = (2*alpha*(warped - low) + low_gain[c]*low) * covered   (low_gain optional)
- out = hf * gate.

Contract. warp_sum, gate [C, H, W] and out [C, H, W] are fp16, bf16 or fp32 (each its own), any
strides: NCHW (H*W, W, 1), channels_last (1, W*Ctot, Ctot), or a channel slice of a bigger
tensor in either layout; only out's [C, H, W] elements are written. alpha: 1 element, float.
index [hq, wq] int64 (-1 = no match) is required by "coverage" and unused by "constant".
low_gain [C] float, "coverage" only. All on one device. Arithmetic in fp32, the result cast to
out's dtype (out=None: a new NCHW tensor in warp_sum's dtype). No autograd: an inference op.

Launches. (1) `_cell_mean_kernel`: the 4x4 cell means of warped, [C, hq, wq] fp32 (1/16 of the
map), and for "coverage" of covered, [hq, wq]. (2) `_detail_kernel`: one program per tile of
BLOCK_Y x BLOCK_X output pixels and BLOCK_C channels reads warp_sum, gate, the 4x4 (bicubic) or
2x2 (bilinear) cell means around each pixel and the index's 3x3 neighbourhood, and writes out.
Coverage is counted in both from the index instead of by a transposed convolution: pixel row
4*cy + r is covered by query rows cy and cy+1, and by cy-1 too when r == 0 (columns alike), so it
is 9, 6 or 4 where every query is active. Traffic: warp_sum is read twice (once per launch), gate
read and out written once, the cell means written and read once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._launch import launch_config, require_triton, tl, triton

__all__ = ["fused_detail", "fused_detail_reference"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_NORMS = ("constant", "coverage")
# (9/4)^2: the mean number of 9x9 stride-4 patches over a pixel; the kernels spell the number out,
# since a plain global float is not visible inside a Triton kernel
_WARP_OVERLAP = 5.0625
_CELL = 4  # the warp's stride: output pixels per query along each side


def _desc(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} {tuple(t.shape)}"


def _check(warp_sum, gate, alpha, norm, index, low_gain, out) -> tuple[int, int, int]:
    if norm not in _NORMS:
        raise ValueError(f"fused_detail: norm must be one of {_NORMS}, got {norm!r}")
    if (
        not isinstance(warp_sum, torch.Tensor)
        or warp_sum.dim() != 3
        or warp_sum.dtype not in _FLOAT
    ):
        raise ValueError(f"fused_detail: warp_sum must be float [C, H, W], got {_desc(warp_sum)}")
    c, h, w = warp_sum.shape
    if h % _CELL or w % _CELL:
        raise ValueError(
            f"fused_detail: warp_sum {tuple(warp_sum.shape)} must have H and W multiples of {_CELL}"
        )
    dev = warp_sum.device
    if (
        not isinstance(gate, torch.Tensor)
        or gate.shape != warp_sum.shape
        or gate.dtype not in _FLOAT
    ):
        raise ValueError(
            f"fused_detail: gate must be float {tuple(warp_sum.shape)} like warp_sum, got "
            f"{_desc(gate)}"
        )
    if not isinstance(alpha, torch.Tensor) or alpha.numel() != 1 or alpha.dtype not in _FLOAT:
        raise ValueError(
            f"fused_detail: alpha must be a 1-element float tensor, got {_desc(alpha)}"
        )
    tensors = {"gate": gate, "alpha": alpha}
    if norm == "coverage":
        if index is None:
            raise ValueError("fused_detail: norm 'coverage' needs the index map [hq, wq]")
        want = (h // _CELL, w // _CELL)
        if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.shape != want:
            raise ValueError(
                f"fused_detail: index must be int64 {want} for warp_sum {tuple(warp_sum.shape)}, "
                f"got {_desc(index)}"
            )
        tensors["index"] = index
    if low_gain is not None:
        if norm != "coverage":
            raise ValueError("fused_detail: low_gain applies to norm 'coverage' only")
        if (
            not isinstance(low_gain, torch.Tensor)
            or low_gain.shape != (c,)
            or low_gain.dtype not in _FLOAT
        ):
            raise ValueError(f"fused_detail: low_gain must be float ({c},), got {_desc(low_gain)}")
        tensors["low_gain"] = low_gain
    if out is not None:
        if (
            not isinstance(out, torch.Tensor)
            or out.shape != warp_sum.shape
            or out.dtype not in _FLOAT
        ):
            raise ValueError(
                f"fused_detail: out must be float {tuple(warp_sum.shape)}, got {_desc(out)}"
            )
        tensors["out"] = out
    for name, t in tensors.items():
        if t.device != dev:
            raise ValueError(f"fused_detail: warp_sum on {dev}, {name} on {t.device}")
    return c, h, w


def fused_detail_reference(
    warp_sum: torch.Tensor,
    gate: torch.Tensor,
    alpha: torch.Tensor,
    *,
    norm: str,
    index: torch.Tensor | None = None,
    low_gain: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch spec of `fused_detail` (fp32 arithmetic, the result in out's dtype)."""
    c, h, w = _check(warp_sum, gate, alpha, norm, index, low_gain, out)
    ws = warp_sum.float()[None]
    a = alpha.float().reshape(1)
    if norm == "constant":
        warped = ws / _WARP_OVERLAP
        low = F.interpolate(
            F.avg_pool2d(warped, _CELL), scale_factor=_CELL, mode="bicubic", align_corners=False
        )
        hf = 2.0 * a * (warped - low)
    else:
        # the fold of a ones 9x9 patch per active query, at stride 4
        active = (index >= 0).float()[None, None]
        ones = active.new_ones(1, 1, 9, 9)
        coverage = F.conv_transpose2d(
            active, ones, stride=_CELL, padding=4, output_padding=_CELL - 1
        )
        covered = (coverage > 0).float()
        warped = ws / coverage.clamp_min(1.0)
        up = lambda t: F.interpolate(F.avg_pool2d(t, _CELL), scale_factor=_CELL, mode="bilinear")
        low = up(warped) / up(covered).clamp_min(1e-3)
        detail = 2.0 * a * (warped - low)
        if low_gain is not None:
            detail = detail + low_gain.float().view(1, c, 1, 1) * low
        hf = detail * covered
    res = (hf * gate.float()[None])[0]
    if out is None:
        return res.to(warp_sum.dtype)
    out.copy_(res)
    return out


@triton.jit
def _active_cols(idx_ptr, qy, cx, first_col, ok, HQ, WQ):
    """Active queries in query row qy whose patches cover pixel column 4*cx + s: columns cx and
    cx+1, and cx-1 too where s == 0 (first_col); 0 where qy lies outside the query grid."""
    ok = ok & (qy >= 0) & (qy < HQ)
    row = idx_ptr + qy * WQ
    n = (tl.load(row + cx, mask=ok & (cx < WQ), other=-1) >= 0).to(tl.float32)
    n += (tl.load(row + cx + 1, mask=ok & (cx + 1 < WQ), other=-1) >= 0).to(tl.float32)
    n += (tl.load(row + cx - 1, mask=ok & first_col & (cx >= 1), other=-1) >= 0).to(tl.float32)
    return n


@triton.jit
def _cubic_near(x):
    # PyTorch's cubic convolution for |x| <= 1, A = -0.75
    return ((-0.75 + 2.0) * x - (-0.75 + 3.0)) * x * x + 1.0


@triton.jit
def _cubic_far(x):
    # ... and for 1 < |x| < 2
    return ((-0.75 * x - 5.0 * -0.75) * x + 8.0 * -0.75) * x - 4.0 * -0.75


@triton.jit
def _cell_mean_kernel(
    mean_ptr, cmean_ptr,
    ws_ptr, stride_wc, stride_wh, stride_ww,
    idx_ptr,
    C, HQ, WQ,
    COVERAGE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """mean[c, cy, cx] = mean over cell (cy, cx) of warped; cmean[cy, cx] = mean of covered."""
    # -- map the program to [BLOCK_C channels, BLOCK_H x BLOCK_W cells] -------------------------
    pid_h = tl.program_id(0).to(tl.int64)
    pid_w = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    q = tl.arange(0, BLOCK_H * BLOCK_W).to(tl.int64)
    cy = pid_h * BLOCK_H + q // BLOCK_W
    cx = pid_w * BLOCK_W + q % BLOCK_W
    mask_c = offs_c < C
    mask_q = (cy < HQ) & (cx < WQ)
    # a cell's 4 columns on the last axis: [BLOCK_C, cells, 4] tiles, summed over that axis
    s = tl.arange(0, 4).to(tl.int64)[None, :]
    px = cx[:, None] * 4 + s
    cy2 = cy[:, None] + s * 0
    mask_px = mask_q[:, None] & (s >= 0)
    c3 = offs_c[:, None, None] * stride_wc
    mask3 = mask_c[:, None, None] & mask_px[None, :, :]
    acc = tl.zeros([BLOCK_C, BLOCK_H * BLOCK_W, 4], dtype=tl.float32)

    # -- sum the cell's 4 rows ----------------------------------------------------------------
    if COVERAGE:
        first_col = s == 0
        cover_up = _active_cols(idx_ptr, cy2 - 1, px // 4, first_col, mask_px, HQ, WQ)
        cover_in = _active_cols(idx_ptr, cy2, px // 4, first_col, mask_px, HQ, WQ)
        cover_in += _active_cols(idx_ptr, cy2 + 1, px // 4, first_col, mask_px, HQ, WQ)
        covered = tl.zeros([BLOCK_H * BLOCK_W, 4], dtype=tl.float32)
    for r in tl.static_range(4):
        ws = tl.load(
            ws_ptr + c3 + ((cy2 * 4 + r) * stride_wh + px * stride_ww)[None, :, :],
            mask=mask3, other=0.0,
        ).to(tl.float32)  # fmt: skip
        if COVERAGE:
            cov = cover_in
            if r == 0:  # only a cell's first row is reached by the query row above
                cov = cov + cover_up
            acc += ws / tl.maximum(cov, 1.0)[None, :, :]
            covered += (cov > 0).to(tl.float32)
        else:
            acc += ws / 5.0625

    # -- write back ---------------------------------------------------------------------------
    mean = tl.sum(acc, axis=2) / 16.0
    tl.store(
        mean_ptr + offs_c[:, None] * (HQ * WQ) + (cy * WQ + cx)[None, :], mean,
        mask=mask_c[:, None] & mask_q[None, :],
    )  # fmt: skip
    if COVERAGE:  # one channel block writes the channel-free covered mean
        tl.store(
            cmean_ptr + cy * WQ + cx, tl.sum(covered, axis=1) / 16.0,
            mask=mask_q & (q * 0 + pid_c == 0),
        )  # fmt: skip


@triton.jit
def _detail_kernel(
    out_ptr, stride_oc, stride_oh, stride_ow,
    ws_ptr, stride_wc, stride_wh, stride_ww,
    gate_ptr, stride_gc, stride_gh, stride_gw,
    mean_ptr, cmean_ptr, idx_ptr, alpha_ptr, gain_ptr,
    C, HQ, WQ,
    COVERAGE: tl.constexpr, HAS_GAIN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    """out[c, oy, ox] = hf * gate (module docstring), the low band from the cell means."""
    # -- map the program to [BLOCK_C channels, BLOCK_Y x BLOCK_X output pixels] ----------------
    pid_y = tl.program_id(0).to(tl.int64)
    pid_x = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    p = tl.arange(0, BLOCK_Y * BLOCK_X).to(tl.int64)
    oy = pid_y * BLOCK_Y + p // BLOCK_X
    ox = pid_x * BLOCK_X + p % BLOCK_X
    mask_c = offs_c < C
    mask_p = (oy < HQ * 4) & (ox < WQ * 4)
    mask = mask_c[:, None] & mask_p[None, :]
    ws = tl.load(
        ws_ptr + offs_c[:, None] * stride_wc + (oy * stride_wh + ox * stride_ww)[None, :],
        mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    gate = tl.load(
        gate_ptr + offs_c[:, None] * stride_gc + (oy * stride_gh + ox * stride_gw)[None, :],
        mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    two_alpha = 2.0 * tl.load(alpha_ptr).to(tl.float32)
    plane = mean_ptr + offs_c[:, None] * (HQ * WQ)
    # source coordinates of PyTorch's x4 upsampling with align_corners=False
    sy = (oy.to(tl.float32) + 0.5) * 0.25 - 0.5
    sx = (ox.to(tl.float32) + 0.5) * 0.25 - 0.5

    if COVERAGE:
        # -- coverage from the index's 3x3 neighbourhood, bilinear taps of the cell means ------
        cy = oy // 4
        cx = ox // 4
        first_col = (ox % 4) == 0
        cov = _active_cols(idx_ptr, cy, cx, first_col, mask_p, HQ, WQ)
        cov += _active_cols(idx_ptr, cy + 1, cx, first_col, mask_p, HQ, WQ)
        cov += _active_cols(idx_ptr, cy - 1, cx, first_col, mask_p & (oy % 4 == 0), HQ, WQ)
        covered = (cov > 0).to(tl.float32)
        warped = ws / tl.maximum(cov, 1.0)[None, :]
        # bilinear clamps a negative source to 0 (so the floor is a truncation)
        sy = tl.maximum(sy, 0.0)
        sx = tl.maximum(sx, 0.0)
        y0 = sy.to(tl.int64)
        x0 = sx.to(tl.int64)
        ly = sy - y0.to(tl.float32)
        lx = sx - x0.to(tl.float32)
        y1 = tl.minimum(y0 + 1, HQ - 1)
        x1 = tl.minimum(x0 + 1, WQ - 1)
        t00, t01, t10, t11 = y0 * WQ + x0, y0 * WQ + x1, y1 * WQ + x0, y1 * WQ + x1
        m00 = tl.load(plane + t00[None, :], mask=mask, other=0.0)
        m01 = tl.load(plane + t01[None, :], mask=mask, other=0.0)
        m10 = tl.load(plane + t10[None, :], mask=mask, other=0.0)
        m11 = tl.load(plane + t11[None, :], mask=mask, other=0.0)
        wy0, wy1 = (1.0 - ly)[None, :], ly[None, :]
        wx0, wx1 = (1.0 - lx)[None, :], lx[None, :]
        num = wy0 * (wx0 * m00 + wx1 * m01) + wy1 * (wx0 * m10 + wx1 * m11)
        c00 = tl.load(cmean_ptr + t00, mask=mask_p, other=0.0)
        c01 = tl.load(cmean_ptr + t01, mask=mask_p, other=0.0)
        c10 = tl.load(cmean_ptr + t10, mask=mask_p, other=0.0)
        c11 = tl.load(cmean_ptr + t11, mask=mask_p, other=0.0)
        den = (1.0 - ly) * ((1.0 - lx) * c00 + lx * c01) + ly * ((1.0 - lx) * c10 + lx * c11)
        low = num / tl.maximum(den, 1e-3)[None, :]
        detail = two_alpha * (warped - low)
        if HAS_GAIN:
            gain = tl.load(gain_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            detail += gain[:, None] * low
        hf = detail * covered[None, :]
    else:
        # -- bicubic taps of the cell means: 4 rows x 4 columns, clamped to the grid -----------
        warped = ws / 5.0625
        fy = tl.floor(sy)
        fx = tl.floor(sx)
        ty = sy - fy
        tx = sx - fx
        iy = fy.to(tl.int64)
        ix = fx.to(tl.int64)
        wx0 = _cubic_far(tx + 1.0)[None, :]
        wx1 = _cubic_near(tx)[None, :]
        wx2 = _cubic_near(1.0 - tx)[None, :]
        wx3 = _cubic_far(2.0 - tx)[None, :]
        xa = tl.minimum(tl.maximum(ix - 1, 0), WQ - 1)
        xb = tl.minimum(tl.maximum(ix, 0), WQ - 1)
        xc = tl.minimum(tl.maximum(ix + 1, 0), WQ - 1)
        xd = tl.minimum(tl.maximum(ix + 2, 0), WQ - 1)
        low = tl.zeros([BLOCK_C, BLOCK_Y * BLOCK_X], dtype=tl.float32)
        for k in tl.static_range(4):
            if k == 0:
                wy = _cubic_far(ty + 1.0)
            elif k == 1:
                wy = _cubic_near(ty)
            elif k == 2:
                wy = _cubic_near(1.0 - ty)
            else:
                wy = _cubic_far(2.0 - ty)
            row = tl.minimum(tl.maximum(iy - 1 + k, 0), HQ - 1) * WQ
            m = wx0 * tl.load(plane + (row + xa)[None, :], mask=mask, other=0.0)
            m += wx1 * tl.load(plane + (row + xb)[None, :], mask=mask, other=0.0)
            m += wx2 * tl.load(plane + (row + xc)[None, :], mask=mask, other=0.0)
            m += wx3 * tl.load(plane + (row + xd)[None, :], mask=mask, other=0.0)
            low += wy[None, :] * m
        hf = two_alpha * (warped - low)

    # -- write back ---------------------------------------------------------------------------
    tl.store(
        out_ptr + offs_c[:, None] * stride_oc + (oy * stride_oh + ox * stride_ow)[None, :],
        (hf * gate).to(out_ptr.dtype.element_ty), mask=mask,
    )  # fmt: skip


def fused_detail(
    warp_sum: torch.Tensor,
    gate: torch.Tensor,
    alpha: torch.Tensor,
    *,
    norm: str,
    index: torch.Tensor | None = None,
    low_gain: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gated detail map hf * gate of `norm` (module docstring), written into `out`."""
    c, h, w = _check(warp_sum, gate, alpha, norm, index, low_gain, out)
    require_triton(warp_sum, gate)
    if out is None:
        out = torch.empty(c, h, w, dtype=warp_sum.dtype, device=warp_sum.device)
    if out.numel() == 0:
        return out
    hq, wq = h // _CELL, w // _CELL
    coverage = norm == "coverage"
    mean = torch.empty(c, hq, wq, dtype=torch.float32, device=out.device)
    cmean = torch.empty(hq, wq, dtype=torch.float32, device=out.device) if coverage else mean
    idx = index.contiguous() if coverage else mean  # unread by "constant"
    gain = low_gain.contiguous() if low_gain is not None else mean  # unread without a gain
    # channel-contiguous output (channels_last): tiles wide in channels keep the writes coalesced
    cfg = launch_config(
        "fused_detail_cl" if out.stride(0) == 1 and c > 1 else "fused_detail", out.dtype
    )
    bc, bh, bw, by, bx = (
        cfg.blocks[k] for k in ("BLOCK_C", "BLOCK_H", "BLOCK_W", "BLOCK_Y", "BLOCK_X")
    )
    ws_strides = warp_sum.stride()
    _cell_mean_kernel[(triton.cdiv(hq, bh), triton.cdiv(wq, bw), triton.cdiv(c, bc))](
        mean, cmean, warp_sum, *ws_strides, idx, c, hq, wq,
        COVERAGE=coverage, BLOCK_C=bc, BLOCK_H=bh, BLOCK_W=bw, num_warps=cfg.num_warps,
    )  # fmt: skip
    _detail_kernel[(triton.cdiv(h, by), triton.cdiv(w, bx), triton.cdiv(c, bc))](
        out, *out.stride(), warp_sum, *ws_strides, gate, *gate.stride(),
        mean, cmean, idx, alpha, gain, c, hq, wq,
        COVERAGE=coverage, HAS_GAIN=low_gain is not None,
        BLOCK_C=bc, BLOCK_Y=by, BLOCK_X=bx, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out
