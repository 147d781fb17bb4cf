"""Modulated deformable convolution (DCNv2) with torchvision.ops.deform_conv2d semantics.

Math (stride 1, dilation 1). For output (b, n, y, x), offset group g = c // (Cin/G), tap
t = i*kw + j:

    py = y - padding + i + offset[b, 2*(g*K + t), y, x]        (K = kh*kw)
    px = x - padding + j + offset[b, 2*(g*K + t) + 1, y, x]
    out[b, n, y, x] = bias[n] + sum_{c, i, j} weight[n, c, i, j] * mask[b, g*K + t, y, x]
                                              * bilinear(x[b, c], py, px)

bilinear is torchvision's: 0 if py <= -1 or py >= H or px <= -1 or px >= W; otherwise the four
corners weighted as usual, each corner outside the map counting as zero.

Contract. x [B, Cin, H, W]; offset [B, 2*G*K, Ho, Wo]; mask [B, G*K, Ho, Wo] or None (all ones);
weight [Cout, Cin, kh, kw]; bias [Cout] or None; Ho = H + 2*padding - kh + 1 (same for W);
G = offset channels / (2K) unless `offset_groups` is given; Cin divisible by G. `row0` (default None: all)
computes only output rows row0 .. row0 + offset rows - 1 (offset and mask then hold those rows,
and so does the output): a band of a large output whose input x is whole, so that the offsets of
the whole output need never exist at once (the engine's bounded-memory reference context). All float tensors
share x's dtype (fp16, bf16, fp32); the output [B, Cout, Ho, Wo] is in x's dtype, accumulated in
fp32. fp32 uses exact fp32 products on the GPU (no tf32), so it matches torchvision to ~1e-6.

The Triton kernel is an implicit GEMM: per (batch, pixel block, Cout block) it loops over taps and
input-channel blocks, gathers the modulated bilinear samples into a [pixels, channels] tile and
multiplies it with the weight slice [channels, Cout]. A channel block spans offset groups (each
column uses its own group's offsets), so K = BLOCK_C >= 16 even with 8 channels per group.

`deform_conv2d_sampled` is the CPU path: the reference gathers each of the four corners of every
tap as a separate tensor (four index tensors, four products and sums the size of the columns),
while `grid_sample` does the same bilinear sampling, zero outside, in one vectorised pass per
offset group. Its sample positions go through grid_sample's [-1, 1] normalisation, which rounds
them by up to about W * 2^-24 pixels, so it agrees with the reference to ~1e-5 relative, not
bit for bit (11x faster on 32 channels at 480x640 on a 2-core CPU, 2026-12-04).
"""

from __future__ import annotations

import torch

from ._launch import dot_ieee, launch_config, require_triton, tl, triton

__all__ = ["deform_conv2d", "deform_conv2d_reference", "deform_conv2d_sampled"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_REF_CHUNK_ELEMS = 1 << 24


def _check(x, offset, mask, weight, bias, padding, offset_groups, row0=None):
    def desc(t):
        return f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}"

    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in _FLOAT:
        raise ValueError(f"deform_conv2d: x must be float [B, Cin, H, W], got {desc(x)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"deform_conv2d: weight must be [Cout, Cin, kh, kw], got {desc(weight)}")
    b, cin, h, w = x.shape
    cout, wcin, kh, kw = weight.shape
    if wcin != cin:
        raise ValueError(f"deform_conv2d: weight {desc(weight)} does not fit x {desc(x)}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"deform_conv2d: padding must be a non-negative int, got {padding!r}")
    ho, wo = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"deform_conv2d: empty output for x {desc(x)}, weight {desc(weight)}")
    ntap = kh * kw
    if not isinstance(offset, torch.Tensor) or offset.dim() != 4:
        raise ValueError(f"deform_conv2d: offset must be [B, 2*G*K, Ho, Wo], got {desc(offset)}")
    if offset.shape[1] % (2 * ntap) or offset.shape[1] == 0:
        raise ValueError(
            f"deform_conv2d: offset {desc(offset)} channels not a multiple of {2 * ntap}"
        )
    g = offset.shape[1] // (2 * ntap)
    if offset_groups is not None and offset_groups != g:
        raise ValueError(
            f"deform_conv2d: offset {desc(offset)} holds {g} groups, offset_groups={offset_groups}"
        )
    if cin % g:
        raise ValueError(f"deform_conv2d: Cin {cin} not divisible by {g} offset groups")
    if row0 is not None:  # a band of output rows: as many as the offsets hold, inside the output
        if not isinstance(row0, int) or row0 < 0:
            raise ValueError(f"deform_conv2d: row0 must be a non-negative int, got {row0!r}")
        rows = offset.shape[2]
        if rows == 0 or row0 + rows > ho:
            raise ValueError(
                f"deform_conv2d: offset {desc(offset)} rows from row0={row0} exceed the {ho} "
                "output rows"
            )
        ho = rows
    if tuple(offset.shape) != (b, 2 * g * ntap, ho, wo):
        raise ValueError(
            f"deform_conv2d: offset {desc(offset)}, expected {(b, 2 * g * ntap, ho, wo)}"
        )
    if mask is not None and (
        not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, g * ntap, ho, wo)
    ):
        raise ValueError(f"deform_conv2d: mask {desc(mask)}, expected {(b, g * ntap, ho, wo)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (cout,)):
        raise ValueError(f"deform_conv2d: bias {desc(bias)}, expected ({cout},)")
    for name, t in (("offset", offset), ("mask", mask), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"deform_conv2d: {name} dtype {t.dtype} differs from x {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"deform_conv2d: {name} on {t.device}, x on {x.device}")
    return g, ho, wo


def _tap_positions(offset_rows, y0, padding, kh, kw):
    """Where every tap of output rows y0.. samples: (py, px), each [G, K, rows, Wo] in fp32.
    `offset_rows` is offset[b, :, y0:y1] ([2*G*K, rows, Wo]); the spec's arithmetic, in its
    order, shared by the reference and the sampled path."""
    ntap, (_, r, wo), dev = kh * kw, offset_rows.shape, offset_rows.device
    off = offset_rows.float().view(-1, ntap, 2, r, wo)
    ti = torch.arange(kh, device=dev).repeat_interleave(kw).float().view(1, ntap, 1, 1)
    tj = torch.arange(kw, device=dev).repeat(kh).float().view(1, ntap, 1, 1)
    yy = torch.arange(y0, y0 + r, device=dev).float().view(1, 1, -1, 1)
    xx = torch.arange(wo, device=dev).float().view(1, 1, 1, -1)
    return yy - padding + ti + off[:, :, 0], xx - padding + tj + off[:, :, 1]


def _columns_times_weight(x, offset, mask, weight, bias, padding, ho, wo, row0, prepare, columns):
    """The loop the two PyTorch paths share: per image `src = prepare(x[b])`, per chunk of output
    rows the tap positions (`_tap_positions`), the modulated columns [Cin*K, rows*Wo] that
    `columns(src, py, px, mask_rows)` samples, times the weight; then the bias. fp32 throughout,
    x's dtype out."""
    cout, cin, kh, kw = weight.shape
    w2 = weight.float().reshape(cout, cin * kh * kw)
    out = torch.empty(x.shape[0], cout, ho, wo, dtype=torch.float32, device=x.device)
    rows = max(1, _REF_CHUNK_ELEMS // max(1, cin * kh * kw * wo))
    for bi in range(x.shape[0]):
        src = prepare(x[bi])
        for y0 in range(0, ho, rows):
            y1 = min(ho, y0 + rows)
            py, px = _tap_positions(offset[bi, :, y0:y1], (row0 or 0) + y0, padding, kh, kw)
            m = None if mask is None else mask[bi, :, y0:y1].float()
            out[bi, :, y0:y1] = (w2 @ columns(src, py, px, m)).view(cout, y1 - y0, wo)
    if bias is not None:
        out += bias.float().view(1, cout, 1, 1)
    return out.to(x.dtype)


def deform_conv2d_reference(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int = 1,
    offset_groups: int | None = None,
    row0: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch spec: bilinear gathers into columns (row chunks), then a matmul, in fp32."""
    g, ho, wo = _check(x, offset, mask, weight, bias, padding, offset_groups, row0)
    _, cin, h, w = x.shape
    ntap, cg = weight.shape[2] * weight.shape[3], cin // g

    def prepare(xb):
        xt = xb.float().reshape(g, cg, h * w).transpose(1, 2)  # [G, HW, Cg]
        return torch.cat([xt, xt.new_zeros(g, 1, cg)], 1)  # row HW is the zero "outside" sample

    def columns(xt, py, px, m):
        inside = (py > -1) & (py < h) & (px > -1) & (px < w)
        y_lo, x_lo = torch.floor(py), torch.floor(px)
        ly, lx = py - y_lo, px - x_lo
        val = 0
        for cy, cx, wt in (
            (y_lo, x_lo, (1 - ly) * (1 - lx)),
            (y_lo, x_lo + 1, (1 - ly) * lx),
            (y_lo + 1, x_lo, ly * (1 - lx)),
            (y_lo + 1, x_lo + 1, ly * lx),
        ):
            ok = inside & (cy >= 0) & (cy <= h - 1) & (cx >= 0) & (cx <= w - 1)
            flat = torch.where(ok, cy * w + cx, torch.full_like(cy, h * w)).long()
            # gather, not xt[gi, flat]: same values, but its backward is a scatter-add
            # rather than an indexed put, which on CUDA sorts every index first
            idx = flat.reshape(g, -1, 1).expand(-1, -1, cg)
            v = torch.gather(xt, 1, idx)  # [G, K*r*Wo, Cg]
            val = val + v * wt.reshape(g, -1, 1)
        if m is not None:
            val = val * m.reshape(g, -1, 1)
        return val.view(g, ntap, -1, cg).permute(0, 3, 1, 2).reshape(cin * ntap, -1)

    return _columns_times_weight(
        x, offset, mask, weight, bias, padding, ho, wo, row0, prepare, columns
    )


def deform_conv2d_sampled(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int = 1,
    offset_groups: int | None = None,
    row0: int | None = None,
) -> torch.Tensor:
    """The same op through `grid_sample` (bilinear, zeros outside) and a matmul, in fp32, in
    chunks of output rows; maps narrower than 2 pixels fall back to the reference."""
    g, ho, wo = _check(x, offset, mask, weight, bias, padding, offset_groups, row0)
    _, cin, h, w = x.shape
    if h < 2 or w < 2:  # grid_sample's normalisation divides by H - 1 and W - 1
        return deform_conv2d_reference(x, offset, mask, weight, bias, padding, offset_groups, row0)
    ntap, cg = weight.shape[2] * weight.shape[3], cin // g

    def columns(xg, py, px, m):
        r = py.shape[2]
        # align_corners=True puts -1 and 1 on the first and last pixel centres
        grid = torch.stack((px * (2.0 / (w - 1)) - 1.0, py * (2.0 / (h - 1)) - 1.0), dim=-1)
        cols = torch.nn.functional.grid_sample(
            xg, grid.view(g, ntap * r, wo, 2), "bilinear", "zeros", align_corners=True
        ).view(g, cg, ntap, r, wo)
        if m is not None:
            cols = cols * m.view(g, 1, ntap, r, wo)
        return cols.reshape(cin * ntap, r * wo)

    return _columns_times_weight(
        x, offset, mask, weight, bias, padding, ho, wo, row0,
        lambda xb: xb.float().reshape(g, cg, h, w), columns,
    )  # fmt: skip


@triton.jit
def _deform_conv2d_kernel(
    out_ptr,
    x_ptr, off_ptr, msk_ptr, w_ptr, b_ptr,
    CIN, H, W, COUT, HO, WO, CG, G, PAD, ROW0,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[b, n, p] = bias[n] + sum_{t, c} w[n, c, t] * mask[g(c), t, p] * bilinear(x[c], p, t)."""
    # -- map the program to (batch, pixel block, Cout block) -------------------------------------
    pid_p = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    bi = tl.program_id(2).to(tl.int64)
    K: tl.constexpr = KH * KW
    npix = HO * WO
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_p = offs_p < npix
    mask_n = offs_n < COUT
    oy = (offs_p // WO + ROW0).to(tl.float32)  # HO counts the band's rows, from ROW0
    ox = (offs_p % WO).to(tl.float32)
    x_base = x_ptr + bi * CIN * H * W
    off_base = off_ptr + bi * (2 * G * K) * npix
    msk_base = msk_ptr + bi * (G * K) * npix
    acc = tl.zeros([BLOCK_P, BLOCK_N], tl.float32)

    # -- loop over taps and input-channel blocks --------------------------------------------------
    for t in range(K):
        ti = t // KW
        tj = t % KW
        for c0 in range(0, CIN, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask_c = offs_c < CIN
            m2 = mask_p[:, None] & mask_c[None, :]
            g = offs_c // CG
            ch = 2 * (g * K + t)  # dy channel of (group, tap)
            dy = tl.load(off_base + ch[None, :] * npix + offs_p[:, None], mask=m2, other=0.0)
            dx = tl.load(off_base + (ch + 1)[None, :] * npix + offs_p[:, None], mask=m2, other=0.0)
            py = oy[:, None] - PAD + ti + dy.to(tl.float32)
            px = ox[:, None] - PAD + tj + dx.to(tl.float32)
            inside = m2 & (py > -1.0) & (py < H) & (px > -1.0) & (px < W)
            y_lo_f = tl.floor(py)
            x_lo_f = tl.floor(px)
            ly = py - y_lo_f
            lx = px - x_lo_f
            y_lo = y_lo_f.to(tl.int64)
            x_lo = x_lo_f.to(tl.int64)
            y_hi = y_lo + 1
            x_hi = x_lo + 1
            ch_base = x_base + offs_c[None, :] * H * W
            ok_yl = inside & (y_lo >= 0)
            ok_yh = inside & (y_hi <= H - 1)
            ok_xl = x_lo >= 0
            ok_xh = x_hi <= W - 1
            v1 = tl.load(ch_base + y_lo * W + x_lo, mask=ok_yl & ok_xl, other=0.0).to(tl.float32)
            v2 = tl.load(ch_base + y_lo * W + x_hi, mask=ok_yl & ok_xh, other=0.0).to(tl.float32)
            v3 = tl.load(ch_base + y_hi * W + x_lo, mask=ok_yh & ok_xl, other=0.0).to(tl.float32)
            v4 = tl.load(ch_base + y_hi * W + x_hi, mask=ok_yh & ok_xh, other=0.0).to(tl.float32)
            a = (1.0 - ly) * (1.0 - lx) * v1 + (1.0 - ly) * lx * v2 + ly * (1.0 - lx) * v3
            a += ly * lx * v4
            if HAS_MASK:
                mk = tl.load(
                    msk_base + (g * K + t)[None, :] * npix + offs_p[:, None], mask=m2, other=0.0
                )
                a = a * mk.to(tl.float32)
            # weight slice [BLOCK_C, BLOCK_N] of weight[n, c, ti, tj]
            wt = tl.load(
                w_ptr + offs_n[None, :] * (CIN * K) + offs_c[:, None] * K + t,
                mask=mask_c[:, None] & mask_n[None, :], other=0.0,
            )  # fmt: skip
            if IEEE:
                acc = tl.dot(a, wt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a.to(wt.dtype), wt, acc)

    # -- bias and write back ----------------------------------------------------------------------
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + bi * COUT * npix + offs_n[None, :] * npix + offs_p[:, None],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_p[:, None] & mask_n[None, :],
    )


def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int = 1,
    offset_groups: int | None = None,
    row0: int | None = None,
) -> torch.Tensor:
    """Modulated deformable conv, stride 1: [B, Cout, Ho, Wo] in x's dtype (Ho: the band's rows
    with `row0`)."""
    g, ho, wo = _check(x, offset, mask, weight, bias, padding, offset_groups, row0)
    require_triton(x)
    b, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    x, offset, weight = x.contiguous(), offset.contiguous(), weight.contiguous()
    mask = mask.contiguous() if mask is not None else None
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty(b, cout, ho, wo, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    cfg = launch_config("deform_conv2d", x.dtype)
    bp, bn, bc = cfg.blocks["BLOCK_P"], cfg.blocks["BLOCK_N"], cfg.blocks["BLOCK_C"]
    grid = (triton.cdiv(ho * wo, bp), triton.cdiv(cout, bn), b)
    _deform_conv2d_kernel[grid](
        out, x, offset, mask if mask is not None else x, weight, bias if bias is not None else x,
        cin, h, w, cout, ho, wo, cin // g, g, padding, row0 or 0,
        KH=kh, KW=kw, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
        IEEE=dot_ieee(x.dtype), BLOCK_P=bp, BLOCK_N=bn, BLOCK_C=bc,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
