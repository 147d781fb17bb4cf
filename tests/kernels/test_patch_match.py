"""patch_match: reference vs brute force, Triton kernel vs reference, masks, work count, tl.dot K."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sddusr_engine.kernels import (
    key_side,
    match_descriptors,
    patch_descriptors,
    patch_match,
    patch_match_blocked,
    patch_match_reference,
)
from sddusr_engine.kernels._launch import is_interpreter, launch_config

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the package attribute `patch_match` is the function; the module is reached this way
pm = importlib.import_module("sddusr_engine.kernels.patch_match")
SCORE_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _brute(query, key, qmask=None, kmask=None):
    """The spec written the obvious way: full similarity matrix (tiny sizes only)."""
    qd = F.normalize(
        F.unfold(F.pad(query[None].float(), (1, 1, 1, 1), mode="reflect"), 3)[0].t(), dim=1
    )
    kd = F.normalize(
        F.unfold(F.pad(key[None].float(), (1, 1, 1, 1), mode="reflect"), 3)[0].t(), dim=1
    )
    sim = qd @ kd.t()
    if kmask is not None:
        sim[:, ~kmask.reshape(-1)] = float("-inf")
    score, index = sim.max(1).values, sim.argmax(1)
    if kmask is not None and not kmask.any():
        score, index = torch.zeros_like(score), torch.full_like(index, -1)
    if qmask is not None:
        score = torch.where(qmask.reshape(-1), score, 0.0)
        index = torch.where(qmask.reshape(-1), index, -1)
    return score.view(query.shape[1:]), index.view(query.shape[1:]), sim


def _check_against(close, ref_score, ref_index, score, index, query, key, dtype, kmask=None):
    """Scores within tolerance; indices equal wherever the reference's top-1 is unambiguous."""
    tol = SCORE_TOL[dtype]
    assert score.dtype == torch.float32 and index.dtype == torch.int64
    close(score, ref_score, tol, "score")
    qd = patch_descriptors(query).float()
    kd = patch_descriptors(key).float()
    sim = qd @ kd.t()
    if kmask is not None:
        sim[:, ~kmask.reshape(-1)] = float("-inf")
    top2 = sim.topk(min(2, sim.shape[1]), dim=1).values
    margin = (top2[:, 0] - top2[:, -1]).view(ref_index.shape) if sim.shape[1] > 1 else None
    clear = (margin > tol) if margin is not None else torch.ones_like(ref_index, dtype=torch.bool)
    assert torch.equal(index[clear], ref_index[clear]), "indices differ where the top-1 is clear"
    # where ambiguous, the chosen key must still score within tolerance of the best
    picked = ref_index >= 0
    got = sim.view(*ref_index.shape, -1).gather(-1, index.clamp_min(0)[..., None])[..., 0]
    assert (got[picked] >= ref_score[picked] - 2 * tol).all()


def test_descriptors_match_unfold_spec(close):
    x = torch.randn(5, 7, 6)
    want = F.normalize(
        F.unfold(F.pad(x[None], (1, 1, 1, 1), mode="reflect"), 3)[0].t(), dim=1, eps=1e-12
    )
    close(patch_descriptors(x), want, 1e-6, "descriptors")
    assert patch_descriptors(x.half()).dtype == torch.float16


@pytest.mark.parametrize("chunk", [1 << 24, 37])
def test_reference_matches_brute_force(monkeypatch, close, chunk):
    monkeypatch.setattr(pm, "_REF_CHUNK_ELEMS", chunk)  # exercise the query chunking
    q, k = torch.randn(3, 7, 5), torch.randn(3, 13, 17)
    qm, km = torch.rand(7, 5) > 0.4, torch.rand(13, 17) > 0.5
    for qmask, kmask in ((None, None), (qm, km)):
        score, index = patch_match_reference(q, k, qmask, kmask)
        bs, bi, _ = _brute(q, k, qmask, kmask)
        close(score, bs, 1e-6, "score")
        assert torch.equal(index, bi)


def test_reference_ties_go_to_lowest_index():
    k = torch.randn(2, 6, 6)
    k[:, :, 3:] = k[:, :, :3]  # columns 3..5 repeat 0..2: interior duplicates
    q = k[:, 1:5, 1:3].clone()
    _, index = patch_match_reference(q, k)
    _, bi, _ = _brute(q, k)
    assert torch.equal(index, bi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(4, 7, 5, 13, 17), (16, 13, 17, 11, 9), (3, 2, 3, 5, 2)])
def test_kernel_matches_reference(close, dtype, shape):
    c, hq, wq, hk, wk = shape
    q, k = torch.randn(c, hq, wq).to(dtype), torch.randn(c, hk, wk).to(dtype)
    rs, ri = patch_match_reference(q, k)
    s, i = patch_match(q, k)
    _check_against(close, rs, ri, s, i, q, k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_with_masks(close, dtype):
    q, k = torch.randn(8, 13, 17).to(dtype), torch.randn(8, 11, 7).to(dtype)
    qm, km = torch.rand(13, 17) > 0.5, torch.rand(11, 7) > 0.3
    rs, ri = patch_match_reference(q, k, qm, km)
    s, i = patch_match(q, k, qm, km)
    assert (i[~qm] == -1).all() and (s[~qm] == 0).all()
    assert km.reshape(-1)[i[qm]].all(), "matched an inactive key"
    _check_against(close, rs, ri, s, i, q, k, dtype, km)


def test_kernel_ties_across_blocks_go_to_lowest_index(close):
    bk = launch_config("patch_match", torch.float32).blocks["BLOCK_K"]
    kd = F.normalize(torch.randn(3 * bk, 32), dim=1)
    kd[2 * bk + 5] = kd[7]  # same descriptor in block 0 and block 2
    kd[bk + 1] = kd[bk]  # and twice inside block 1
    qd = kd[[7, bk, bk + 1, 2 * bk + 5]].clone()
    score, index = match_descriptors(qd, kd)
    assert index.tolist() == [7, bk, bk, 7]
    ref_score, ref_index = match_descriptors(qd, kd, backend="torch")
    assert torch.equal(index, ref_index)
    close(score, ref_score, 1e-6, "score")


def test_work_scales_with_active_positions():
    q, k = torch.randn(4, 20, 24), torch.randn(4, 18, 22)
    qm = torch.zeros(20, 24, dtype=torch.bool)
    km = torch.zeros(18, 22, dtype=torch.bool)
    qm[3:8, 2:9] = True  # 35 active queries of 480
    km[::3, ::2] = True  # 66 active keys of 396
    bq, bk = (launch_config("patch_match", torch.float32).blocks[n] for n in ("BLOCK_Q", "BLOCK_K"))
    *_, stats = patch_match(q, k, qm, km, return_stats=True)
    aq, ak = int(qm.sum()), int(km.sum())
    assert stats["active_queries"] == aq and stats["active_keys"] == ak
    assert stats["pairs_evaluated"] == -(-aq // bq) * bq * (-(-ak // bk) * bk)
    assert stats["pairs_evaluated"] < 480 * 396 // 4
    *_, ref_stats = patch_match_reference(q, k, qm, km, return_stats=True)
    assert ref_stats["pairs_evaluated"] == aq * ak


_mask_kind = st.sampled_from(["none", "all_false", "single", "all_true", "random"])


def _make_mask(kind, h, w, draw_pos):
    if kind == "none":
        return None
    if kind == "all_false":
        return torch.zeros(h, w, dtype=torch.bool)
    if kind == "all_true":
        return torch.ones(h, w, dtype=torch.bool)
    if kind == "single":
        m = torch.zeros(h * w, dtype=torch.bool)
        m[draw_pos % (h * w)] = True
        return m.view(h, w)
    g = torch.Generator().manual_seed(draw_pos)
    return torch.rand(h, w, generator=g) > 0.5


@settings(max_examples=12, deadline=None)
@given(qk=_mask_kind, kk=_mask_kind, pos=st.integers(0, 10_000), seed=st.integers(0, 2**16))
def test_mask_properties(qk, kk, pos, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(3, 6, 5, generator=g), torch.randn(3, 7, 4, generator=g)
    qm, km = _make_mask(qk, 6, 5, pos), _make_mask(kk, 7, 4, pos + 1)
    for fn in (patch_match_reference, patch_match):
        s, i = fn(q, k, qm, km)
        bs, bi, _ = _brute(q, k, qm, km)
        assert (s - bs).abs().max().item() <= 1e-5, fn.__name__
        inactive = torch.zeros(6, 5, dtype=torch.bool) if qm is None else ~qm
        if km is not None and not km.any():
            inactive = torch.ones(6, 5, dtype=torch.bool)
        assert (i[inactive] == -1).all() and (s[inactive] == 0).all()
        assert torch.equal(i, bi)
        if km is not None:
            assert km.reshape(-1)[i[i >= 0]].all()


def test_validation_errors():
    q, k = torch.randn(3, 5, 5), torch.randn(4, 5, 5)
    with pytest.raises(ValueError, match="channels"):
        patch_match(q, k)
    with pytest.raises(ValueError, match="query_mask"):
        patch_match(q, q, torch.ones(4, 5))
    with pytest.raises(ValueError, match="dtype"):
        patch_match_reference(q.long(), q.long())
    with pytest.raises(ValueError, match="H, W >= 2"):
        patch_match(torch.randn(3, 1, 5), q)


def test_every_dot_has_k_at_least_16(record_dots):
    q, k = torch.randn(1, 5, 4), torch.randn(1, 6, 5)  # 9 features: padded up to a K of 16
    patch_match(q, k)
    if is_interpreter():
        assert record_dots and all(kk >= 16 for _, kk, _ in record_dots), record_dots


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_matches_reference(close, dtype):
    q = torch.randn(16, 61, 67, device="cuda").to(dtype)
    k = torch.randn(16, 53, 47, device="cuda").to(dtype)
    qm, km = torch.rand(61, 67, device="cuda") > 0.5, torch.rand(53, 47, device="cuda") > 0.5
    for qmask, kmask in ((None, None), (qm, km)):
        rs, ri = patch_match_reference(q, k, qmask, kmask)
        s, i = patch_match(q, k, qmask, kmask)
        _check_against(
            close,
            rs.cpu(),
            ri.cpu(),
            s.cpu(),
            i.cpu(),
            q.cpu(),
            k.cpu(),
            dtype,
            None if kmask is None else kmask.cpu(),
        )


def test_get_ops_and_import_without_triton():
    """The package imports and the references run where triton is missing (macOS)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from sddusr_engine.kernels import get_ops, HAS_TRITON\n"
        "assert not HAS_TRITON\n"
        "ops = get_ops('torch')\n"
        "s, i = ops.patch_match(torch.randn(2, 4, 4), torch.randn(2, 5, 5))\n"
        "assert i.dtype == torch.int64\n"
        "try:\n"
        "    get_ops('triton')\n"
        "except RuntimeError as e:\n"
        "    print('ok', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr
    from sddusr_engine.kernels import KernelOps, get_ops

    with torch.no_grad():  # CPU inference: the blocked path; elsewhere the reference
        q, k = torch.randn(2, 4, 4), torch.randn(2, 5, 5)
        got, want = get_ops("torch").patch_match(q, k), patch_match_reference(q, k)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert isinstance(get_ops("triton"), KernelOps) and get_ops("triton").patch_match is patch_match
    with pytest.raises(ValueError, match="backend"):
        get_ops("cuda")


@pytest.mark.parametrize(
    "qshape, kshape, masked",
    [
        ((16, 20, 30), (16, 70, 70), False),
        ((3, 17, 23), (3, 71, 61), True),
        ((5, 2, 3), (5, 2, 2), True),
    ],
)
def test_blocked_cpu_path_matches_the_reference(qshape, kshape, masked):
    """More queries and keys than one block holds (256 x 4096), ragged, with and without masks:
    the same scores and indices as the reference, and the same work counted."""
    q, k = torch.randn(*qshape), torch.randn(*kshape)
    qm = torch.rand(qshape[1:]) > 0.3 if masked else None
    km = torch.rand(kshape[1:]) > 0.3 if masked else None
    want = patch_match_reference(q, k, qm, km, return_stats=True)
    got = patch_match_blocked(q, k, qm, km, return_stats=True)
    assert torch.equal(got[1], want[1]) and got[2] == want[2]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)


def test_blocked_cpu_path_breaks_ties_to_the_lowest_index_across_blocks():
    """Equal best keys in different key blocks: the lowest index, as the reference gives."""
    from sddusr_engine.kernels.patch_match import _CPU_BLOCK_K, _match_blocked, _match_reference

    kd = F.normalize(torch.randn(3 * _CPU_BLOCK_K, 8), dim=1)
    qd = kd[[5, 7, 9000]].clone()
    kd[_CPU_BLOCK_K + 5] = kd[5]  # the same best key again, one block later
    kd[2 * _CPU_BLOCK_K + 1] = kd[9000]  # and again, in the last block (9000 is in the third)
    kd[2] = kd[7]  # an earlier copy, in the same block
    score, index = _match_blocked(qd, kd)
    assert index.tolist() == [5, 2, 2 * _CPU_BLOCK_K + 1] == _match_reference(qd, kd)[1].tolist()
    torch.testing.assert_close(score, torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_a_key_side_made_once_matches_like_the_key_map(dtype, masked):
    """`key_side` (the key map's descriptors, compacted once for many query bands): every
    implementation gives with it exactly what it gives with the map and its mask, work counted
    included; a key side with a key mask, or of other channels, is refused."""
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(8, 13, 17, generator=g), torch.randn(8, 11, 9, generator=g)
    q, k = q.to(dtype), k.to(dtype)
    qm = torch.rand(13, 17, generator=g) > 0.3 if masked else None
    km = torch.rand(11, 9, generator=g) > 0.4 if masked else None
    side = key_side(k, km)
    assert side.shape == (8, 11, 9) and side.desc.dtype == dtype
    assert side.desc_t is not None and side.desc_t.dtype == torch.float32  # the CPU's blocks
    impls = [patch_match_reference, patch_match_blocked]
    if is_interpreter():
        impls.append(patch_match)
    for fn in impls:
        want = fn(q, k, qm, km, return_stats=True)
        got = fn(q, side, qm, None, return_stats=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), fn.__name__
        assert got[2] == want[2]
    with pytest.raises(ValueError, match="compacted already"):
        patch_match_blocked(q, side, qm, torch.ones(11, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="share channels"):
        patch_match_blocked(q[:4], side)


def test_matching_in_bands_describes_the_keys_once(monkeypatch):
    """`sparse_match` in bands of query rows makes the key side once, not once per band, with
    the result of one call."""
    from sddusr_engine.model import matching

    g = torch.Generator().manual_seed(12)
    q, k = torch.randn(1, 8, 40, 17, generator=g), torch.randn(1, 8, 11, 9, generator=g)
    qm = torch.rand(1, 1, 40, 17, generator=g) > 0.3
    km = torch.rand(1, 1, 11, 9, generator=g) > 0.3
    made = []
    real = matching.key_side
    monkeypatch.setattr(matching, "key_side", lambda *a: made.append(1) or real(*a))
    whole = matching.sparse_match(q, k, qm, km, patch_match_blocked)
    banded = matching.sparse_match(q, k, qm, km, patch_match_blocked, row_bands=5)
    assert len(made) == 1
    assert torch.equal(banded[1], whole[1]) and torch.equal(banded[0], whole[0])
    assert banded[2] == whole[2]
