"""GPU-only command-line checks (bench/gpu_check.sh runs them): the demo with the shipped weights
on CUDA, the profiler's GPU path, a real CUDA out-of-memory turned into one sentence, and eval and
batch on CUDA against their CPU runs."""

import json

import pytest
import torch
from support import invoke
from test_batch import raw_folder  # noqa: F401  (a fixture shared with the CPU tests)
from test_eval import dataset  # noqa: F401  (likewise)

from sddusr_engine.io import read_image
from sddusr_engine.weights import DEFAULT_WEIGHTS

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped weights not present")
def test_demo_on_cuda_with_the_shipped_weights(tmp_path):
    res = invoke("demo", "-o", tmp_path, "--device", "cuda")
    assert res.exit_code == 0, res.output
    sr = read_image(tmp_path / "sr.png")
    assert sr.ndim == 3 and sr.shape[2] == 3 and sr.std() > 1.0
    assert (tmp_path / "comparison.png").is_file()
    assert not list(tmp_path.glob("*.tmp*"))


def test_profile_on_cuda(tiny_weights, tmp_path):
    res = invoke("profile", "--size", "256x384", "--repeats", 2, "--device", "cuda",
                 "--weights", tiny_weights, "--json", tmp_path / "p.json")  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["meta"]["gpu"] not in (False, None)
    kernels = {r["name"] for r in data["rows"] if r["kind"] == "kernel"}
    assert {"patch_match", "patch_warp", "deform_conv2d"} <= kernels
    assert all(r["ms"] > 0 for r in data["rows"] if r["kind"] == "kernel")


def test_cuda_out_of_memory_is_one_sentence(tmp_path):
    from test_cli import assert_one_line_error

    torch.cuda.empty_cache()
    # 2 MiB, less than the shipped weights alone (4.6 MiB in fp16): no plan fits, not even
    # bounded tiles with their maps in host memory, which need a few tens of MiB for this pair
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(2 * 2**20 / total)
    try:
        res = invoke("demo", "-o", tmp_path / "o", "--device", "cuda", "--tile", 0)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert_one_line_error(res)
    assert "out of memory" in res.stderr
    assert not (tmp_path / "o" / "sr.png").exists()


def test_eval_on_cuda_agrees_with_the_cpu(dataset, tiny_weights, tmp_path):  # noqa: F811
    means = {}
    for dev in ("cpu", "cuda"):
        res = invoke("eval", dataset, "--weights", tiny_weights, "--device", dev,
                     "--json", tmp_path / f"{dev}.json")  # fmt: skip
        assert res.exit_code == 0, res.output
        means[dev] = json.loads((tmp_path / f"{dev}.json").read_text())["mean"]
    for method in ("sr", "no_ref", "bicubic"):  # eval runs fp32 by default
        assert means["cuda"][method]["psnr"] == pytest.approx(
            means["cpu"][method]["psnr"], abs=0.05
        )


def test_batch_on_cuda_writes_the_good_pairs(raw_folder, tiny_weights, tmp_path):  # noqa: F811
    res = invoke("batch", raw_folder, "-o", tmp_path / "out", "--weights", tiny_weights,
                 "--device", "cuda")  # fmt: skip
    assert res.exit_code == 1 and "Traceback" not in res.output  # the folder holds bad pairs too
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good0.png", "good1.png"]
    assert read_image(tmp_path / "out" / "good0.png").shape == (128, 192, 3)
