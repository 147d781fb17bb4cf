"""Shared helpers for the kernel tests: per-dtype tolerances, a verbose allclose, tl.dot recording."""

from __future__ import annotations

import functools

import pytest
import torch

# Relative to the largest magnitude of the expected tensor.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "") -> None:
    """allclose against tol * max|expected| that reports how many elements miss and where."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a, e = actual.float().cpu(), expected.float().cpu()
    atol = tol * max(1.0, e.abs().max().item())
    err = (a - e).abs()
    bad = err > atol
    if bad.any():
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off by more than {atol:.3g} "
            f"(max {err.max().item():.3g}); first at {first}: {a[first].item()} vs {e[first].item()}"
        )


@pytest.fixture
def record_dots():
    """Record the operand shapes of every tl.dot run (interpreter only) -> list of (M, K, N)."""
    import triton.language as tl
    import triton.language.core as core

    orig = core.dot
    seen: list[tuple[int, int, int]] = []

    @functools.wraps(orig)
    def dot(input, other, *args, **kwargs):
        (m, k), (k2, n) = ([int(getattr(s, "value", s)) for s in t.shape] for t in (input, other))
        seen.append((m, k, n))
        return orig(input, other, *args, **kwargs)

    tl.dot = core.dot = dot
    try:
        yield seen
    finally:
        tl.dot = core.dot = orig


@pytest.fixture
def close():
    """The verbose allclose above, as a fixture (test modules here are not a package)."""
    return assert_close
