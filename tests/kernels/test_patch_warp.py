"""patch_warp: reference vs a per-query loop, Triton kernel vs reference, validation, tl.dot-free."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from sddusr_engine.kernels import (
    PatchTable,
    get_ops,
    patch_grid,
    patch_table,
    patch_warp,
    patch_warp_blocked,
    patch_warp_reference,
    table_part,
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _brute(value, index, ksize=9, stride=4):
    """Place each selected patch at (stride*qy - P, stride*qx - P) one by one."""
    c, hv, wv = value.shape
    hq, wq = index.shape
    nh, top, bottom = patch_grid(hv, ksize, stride)
    nw, left, right = patch_grid(wv, ksize, stride)
    vp = F.pad(value[None].float(), (left, right, top, bottom), mode="reflect")[0]
    pad, m = (ksize - 1) // 2, ksize
    out = torch.zeros(c, stride * hq + 2 * m, stride * wq + 2 * m)
    for qy in range(hq):
        for qx in range(wq):
            p = int(index[qy, qx])
            if p < 0:
                continue
            py, px = divmod(p, nw)
            y, x = stride * qy - pad + m, stride * qx - pad + m
            out[:, y : y + ksize, x : x + ksize] += vp[
                :, py * stride : py * stride + ksize, px * stride : px * stride + ksize
            ]
    return out[:, m : m + stride * hq, m : m + stride * wq]


def test_patch_grid_matches_kedusr_same_padding():
    assert patch_grid(64) == (16, 2, 3)  # total (16-1)*4 + 9 - 64 = 5
    assert patch_grid(13) == (4, 4, 4)  # total (4-1)*4 + 9 - 13 = 8


@pytest.mark.parametrize("vshape,qshape", [((3, 13, 17), (6, 7)), ((2, 8, 5), (5, 3))])
def test_reference_matches_loop(close, vshape, qshape):
    v = torch.randn(*vshape)
    n = patch_grid(vshape[1])[0] * patch_grid(vshape[2])[0]
    idx = torch.randint(-1, n, qshape)
    close(patch_warp_reference(v, idx), _brute(v, idx), 1e-6, "reference")


def test_reference_bands_match_loop(monkeypatch, close):
    import importlib

    mod = importlib.import_module("sddusr_engine.kernels.patch_warp")
    monkeypatch.setattr(mod, "_REF_CHUNK_ELEMS", 1)  # one query row per band
    v = torch.randn(2, 11, 9)
    idx = torch.randint(-1, 3 * 3, (5, 4))
    close(patch_warp_reference(v, idx), _brute(v, idx), 1e-6, "banded reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vshape,qshape", [((5, 13, 17), (7, 5)), ((17, 9, 11), (4, 6))])
def test_kernel_matches_reference(close, dtype, vshape, qshape):
    v = torch.randn(*vshape).to(dtype)
    n = patch_grid(vshape[1])[0] * patch_grid(vshape[2])[0]
    idx = torch.randint(-1, n, qshape)
    want = patch_warp_reference(v, idx)
    got = patch_warp(v, idx)
    assert got.dtype == dtype and got.shape == (vshape[0], 4 * qshape[0], 4 * qshape[1])
    close(got, want, TOL[dtype], "patch_warp")


def test_all_unmatched_gives_zeros():
    v = torch.randn(2, 8, 8)
    out = patch_warp(v, torch.full((3, 4), -1, dtype=torch.int64))
    assert out.shape == (2, 12, 16) and not out.any()


def test_validation_errors():
    v = torch.randn(2, 8, 8)
    with pytest.raises(ValueError, match="outside"):
        patch_warp(v, torch.full((2, 2), 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        patch_warp(v, torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="too small"):
        patch_warp_reference(torch.randn(2, 3, 8), torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_matches_reference(close, dtype):
    v = torch.randn(64, 131, 97, device="cuda").to(dtype)
    n = patch_grid(131)[0] * patch_grid(97)[0]
    idx = torch.randint(-1, n, (61, 43), device="cuda")
    close(patch_warp(v, idx), patch_warp_reference(v, idx), TOL[dtype], "patch_warp cuda")


@pytest.mark.parametrize(
    "vshape,qshape,ksize,stride",
    [
        ((3, 13, 17), (6, 7), 9, 4),
        ((2, 8, 5), (5, 3), 9, 4),
        ((4, 30, 41), (9, 13), 9, 4),  # more queries than fit one value row
        ((3, 12, 10), (4, 6), 5, 2),  # P = 2 = stride: blocks of 2
        ((2, 11, 9), (3, 5), 5, 4),  # P = 2 is not a multiple of 4: the reference
    ],
)
def test_blocked_path_matches_the_loop(close, vshape, qshape, ksize, stride):
    v = torch.randn(*vshape)
    n = patch_grid(vshape[1], ksize, stride)[0] * patch_grid(vshape[2], ksize, stride)[0]
    idx = torch.randint(-1, n, qshape)
    got = patch_warp_blocked(v, idx, ksize, stride)
    assert got.shape == (vshape[0], stride * qshape[0], stride * qshape[1])
    close(got, _brute(v, idx, ksize, stride), 1e-6, "blocked")
    half = patch_warp_blocked(v.half(), idx, ksize, stride)
    assert half.dtype == torch.float16
    close(half, patch_warp_reference(v.half(), idx, ksize, stride), TOL[torch.float16], "fp16")
    assert not patch_warp_blocked(v, torch.full_like(idx, -1), ksize, stride).any()


def test_torch_backend_warps_by_blocks_for_cpu_inference_only():
    v = torch.randn(3, 13, 17)
    idx = torch.randint(-1, 4 * 5, (6, 7))
    op = get_ops("torch").patch_warp
    with torch.no_grad():
        assert torch.equal(op(v, idx), patch_warp_blocked(v, idx))
    v.requires_grad_(True)
    assert torch.equal(op(v, idx).detach(), patch_warp_reference(v, idx).detach())


@pytest.mark.parametrize("vshape", [(3, 13, 17), (2, 8, 5), (4, 30, 41), (1, 9, 33)])
def test_a_block_table_cut_in_bands_is_the_padded_map_reshuffled(monkeypatch, vshape):
    """The table, cut band by band from the map with the reflect padding as indices, holds
    exactly the blocks of the reflect-padded map (zeros beyond it), whatever the bands."""
    pw = sys.modules[patch_table.__module__]
    v = torch.randn(*vshape)
    c, hv, wv = vshape
    nh, top, bottom = patch_grid(hv)
    nw, left, right = patch_grid(wv)
    rb, sb = nh + 2, nw + 2
    vp = F.pad(v[None], (left, right, top, bottom), mode="reflect")[0]
    vp = F.pad(vp, (0, 4 * sb - vp.shape[2], 0, 4 * rb - vp.shape[1]))
    want = vp.view(c, rb, 4, sb, 4).permute(1, 3, 0, 2, 4).reshape(rb * sb, c * 16)
    for chunk in (1, c * 16 * sb * 2, 1 << 24):  # one block row, two, all at once
        monkeypatch.setattr(pw, "_REF_CHUNK_ELEMS", chunk)
        table = patch_table(v)
        assert torch.equal(table.table[:-1], want) and not table.table[-1].any()


def test_a_block_table_cut_once_warps_like_the_map_itself(close):
    """`patch_table` (what the engine cuts once per pair for every tile's warp) gives the same
    warp as the map, in its dtype; a table cut for other patches, or for blocks that do not tile
    the patch, is refused; the torch backend cuts one for CPU inference only."""
    v = torch.randn(5, 29, 23)
    n = patch_grid(29)[0] * patch_grid(23)[0]
    table = patch_table(v)
    for shape in [(7, 6), (3, 11), (1, 1)]:
        idx = torch.randint(-1, n, shape)
        assert torch.equal(patch_warp_blocked(table, idx), patch_warp_blocked(v, idx))
    idx = torch.randint(-1, n, (7, 6))
    half = patch_warp_blocked(patch_table(v.half()), idx)
    assert half.dtype == torch.float16
    close(half, patch_warp_reference(v.half(), idx), TOL[torch.float16], "fp16 table")
    with pytest.raises(ValueError, match="table cut for ksize 9 stride 4"):
        patch_warp_blocked(table, idx, 5, 2)
    with pytest.raises(ValueError, match="not whole blocks"):
        patch_table(v, 5, 4)
    with pytest.raises(ValueError, match="index range"):
        patch_warp_blocked(table, torch.full((2, 2), n), 9, 4)
    ops = get_ops("torch")
    with torch.no_grad():
        source = ops.warp_source(v, 9, 4)
        assert isinstance(source, PatchTable) and torch.equal(
            ops.patch_warp(source, idx), ops.patch_warp(v, idx)
        )
    assert ops.warp_source(v.requires_grad_(True), 9, 4) is v  # training: the map itself
    assert get_ops("triton").warp_source(v, 9, 4) is v


@pytest.mark.parametrize("vshape, qshape", [((5, 29, 23), (7, 6)), ((3, 40, 37), (11, 13)),
                                            ((2, 9, 9), (1, 1))])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_table_part_holds_the_blocks_an_index_reads_and_warps_the_same(vshape, qshape, dtype):
    """`table_part` (what a tile of a GPU run with host maps receives): exactly the blocks of the
    matched patches, ascending, and the zero row; warping from it is bit-identical to warping
    from the whole table, in fp32 and in a table of the map's 16-bit dtype."""
    torch.manual_seed(sum(vshape) + sum(qshape))
    v = torch.randn(*vshape).to(dtype)
    nh, nw = patch_grid(vshape[1])[0], patch_grid(vshape[2])[0]
    table = patch_table(v, dtype=dtype)
    assert table.table.dtype == dtype
    idx = torch.randint(-1, nh * nw, qshape)
    part = table_part(table, idx)
    sb = nw + 2
    want = sorted(
        {(p // nw + a) * sb + p % nw + b for p in idx[idx >= 0].tolist() for a in range(3)
         for b in range(3)}
    )  # fmt: skip
    assert part.blocks.tolist() == want and part.table.shape[0] == len(want) + 1
    assert torch.equal(part.table[:-1], table.table[want]) and not part.table[-1].any()
    assert torch.equal(patch_warp_blocked(part, idx), patch_warp_blocked(table, idx))
    close = patch_warp_blocked(part, idx).float() - patch_warp_reference(v, idx).float()
    assert close.abs().max() <= TOL[dtype] * 9 * max(1.0, float(v.abs().max()))
    none = torch.full(qshape, -1)
    empty = table_part(table, none)
    assert empty.table.shape[0] == 1 and not patch_warp_blocked(empty, none).any()
    with pytest.raises(ValueError, match="already a part"):
        table_part(part, idx)


def test_a_table_part_is_bounded_by_the_index_not_the_map():
    """Neighbouring matches that move together share blocks: a tile of coherent matches on a map
    sixteen times its area takes about one block per query, never more than nine."""
    v = torch.randn(2, 256, 256)
    nw = patch_grid(256)[0]
    qy, qx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    coherent = (qy + 20) * nw + (qx + 30)  # a shifted copy of the tile's neighbourhood
    part = table_part(patch_table(v), coherent)
    assert part.table.shape[0] - 1 == 18 * 18  # (16 + 2)^2 blocks, 1.27 per query
    scattered = torch.randperm(nw * nw)[:256].view(16, 16)
    assert table_part(patch_table(v), scattered).table.shape[0] - 1 <= 9 * 256
