"""Shared test helpers: tiny network sizes, the golden-vector folder, the CLI runner."""

import os
from pathlib import Path

from typer.testing import CliRunner

# A network small enough for the CPU: every part present, every width tiny.
TINY = dict(
    channels=16,
    trunk_groups=1,
    trunk_blocks=1,
    encoder_blocks=1,
    decoder_blocks=1,
    tokens=8,
    token_dim=16,
    mask_hidden=8,
)

# The published code's test vectors: ../shared/golden beside the clone (CI has it; a user's clone
# does not, and the tests that need them skip with that reason). SDDUSR_GOLDEN_DIR points elsewhere
# (for example, a copy of some of them on a GPU machine).
GOLDEN_DIR = Path(
    os.environ.get("SDDUSR_GOLDEN_DIR")
    or Path(__file__).resolve().parents[1].parent / "shared" / "golden"
)

_runner = CliRunner()


def invoke(*args, **env):
    """Run the `sddusr` app in-process with a wide terminal (tables not folded)."""
    from sddusr_engine.cli import app

    return _runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **env})
