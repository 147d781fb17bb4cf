"""The inference engine: `Engine` (core.py) and what it is made of.

settings.py resolves and checks the run options once; tiling.py streams one network pass through
the device in exact tiles; ensemble.py averages flipped passes; adapt.py fine-tunes a copy of the
network per pair; postprocess.py applies the low-band projection and the adaptation blend in fp32.
"""

from .core import Engine, Progress
from .info import RunInfo
from .settings import DTYPES, ENSEMBLE_SIZES, MAX_ADAPT_STEPS, RunSettings

__all__ = [
    "DTYPES",
    "ENSEMBLE_SIZES",
    "MAX_ADAPT_STEPS",
    "Engine",
    "Progress",
    "RunInfo",
    "RunSettings",
]
