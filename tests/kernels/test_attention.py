"""attention: both regimes (one split, split keys + combine) vs the reference, tl.dot K >= 16."""

from __future__ import annotations

import math

import pytest
import torch

from sddusr_engine.kernels import attention, attention_reference
from sddusr_engine.kernels._launch import is_interpreter

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _inputs(nq, nk, d, c, dtype, device="cpu"):
    q = torch.randn(nq, d, device=device).to(dtype)
    k = torch.randn(nk, d, device=device).to(dtype)
    v = torch.randn(nk, c, device=device).to(dtype)
    return q, k, v


def test_reference_is_the_formula(close):
    q, k, v = _inputs(13, 7, 5, 3, torch.float32)
    want = torch.softmax(q @ k.t() * 0.3, dim=1) @ v
    close(attention_reference(q, k, v, 0.3), want, 1e-6, "reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nq,nk,d,c", [(97, 128, 64, 64), (13, 17, 7, 5), (50, 130, 32, 48)])
def test_many_queries_few_keys(close, dtype, nq, nk, d, c):
    q, k, v = _inputs(nq, nk, d, c, dtype)
    scale = 1 / math.sqrt(d)
    got = attention(q, k, v, scale, num_splits=1)
    assert got.dtype == dtype
    close(got, attention_reference(q, k, v, scale), TOL[dtype], "one split")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nq,nk,splits", [(128, 1031, None), (5, 613, 3), (7, 200, 64)])
def test_few_queries_many_keys_split(close, dtype, nq, nk, splits):
    q, k, v = _inputs(nq, nk, 64, 64, dtype)
    got = attention(q, k, v, 0.125, num_splits=splits)
    close(got, attention_reference(q, k, v, 0.125), TOL[dtype], "split keys")


def test_large_logits_stay_finite(close):
    q, k, v = _inputs(9, 300, 16, 16, torch.float32)
    for splits in (1, 4):
        got = attention(q * 30, k, v, 1.0, num_splits=splits)
        assert torch.isfinite(got).all()
        close(got, attention_reference(q * 30, k, v, 1.0), 1e-5, f"{splits} splits")


def test_validation_errors():
    q, k, v = _inputs(4, 5, 8, 3, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        attention(q, k[:, :4], v, 1.0)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(q.half(), k, v, 1.0)
    with pytest.raises(ValueError, match="at least one key"):
        attention_reference(q, k[:0], v[:0], 1.0)


def test_every_dot_has_k_at_least_16(record_dots):
    q, k, v = _inputs(5, 40, 3, 2, torch.float32)  # d = 3, c = 2: padded to 16
    attention(q, k, v, 1.0, num_splits=2)
    attention(q, k, v, 1.0, num_splits=1)
    if is_interpreter():
        assert record_dots and all(kk >= 16 for _, kk, _ in record_dots), record_dots


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nq,nk", [(20000, 128), (128, 300_000)])
def test_gpu_matches_reference(close, dtype, nq, nk):
    q, k, v = _inputs(nq, nk, 64, 64, dtype, "cuda")
    close(attention(q, k, v, 0.125), attention_reference(q, k, v, 0.125), TOL[dtype], "cuda")
