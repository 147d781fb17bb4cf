"""Test set-up: Triton's interpreter on machines without a GPU, fixed seeds, shared fixtures."""

import os
import random
from pathlib import Path

# Must happen before anything imports triton: without a GPU the kernels run under the interpreter.
try:
    import torch as _torch

    _has_cuda = _torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from support import GOLDEN_DIR  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def golden_dir() -> Path:
    """The published code's test vectors (../shared/golden beside the clone); skip where absent."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN_DIR} (they ship beside CI's clone only)")
    return GOLDEN_DIR


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; bench/gpu_check.sh runs these")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A tiny random `sddusr` network saved as this project's safetensors."""
    from support import TINY

    from sddusr_engine.model.network import build_model
    from sddusr_engine.weights import save_weights

    torch.manual_seed(0)
    return save_weights(
        build_model("sddusr", **TINY), tmp_path_factory.mktemp("w") / "tiny.safetensors"
    )


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """A small synthetic raw pair as files: (wide.png, tele.png, the wide's shape)."""
    from sddusr_engine.io import write_image
    from sddusr_engine.synthetic import make_synthetic_pair, procedural_image

    d = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(0)
    wide, tele, _ = make_synthetic_pair(
        procedural_image((160, 240), rng), rotation_deg=1.0, rng=rng
    )
    write_image(d / "wide.png", wide)
    write_image(d / "tele.png", tele)
    return d / "wide.png", d / "tele.png", wide.shape
