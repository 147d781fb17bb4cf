"""Training the network: the loop, its configuration and command line, checkpoints, weight
surgery, losses, and fitting the low-band upsampler.

`python -m sddusr_engine.train --data DIR --out DIR --steps N [...]`, or `train(TrainConfig(...))`.
"""

from .checkpoint import load_checkpoint
from .config import TrainConfig, build_parser
from .loop import main, train

__all__ = ["TrainConfig", "build_parser", "load_checkpoint", "main", "train"]
