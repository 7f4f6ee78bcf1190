"""growdense: dense layers that grow and shrink in place while they train."""

from ._extension import build_info, cuda_available, cuda_built
from .layers import GrowLinear
from . import ops

__version__ = build_info()["version"]

__all__ = ["GrowLinear", "ops", "build_info", "cuda_available", "cuda_built", "__version__"]
from .wiring import Wiring
from .schedule import GrowthEvent, GrowthSchedule
from . import init_strategies, optim_state
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
__all__ += ["Wiring", "GrowthEvent", "GrowthSchedule", "init_strategies", "optim_state"]
__all__ += ["CheckpointError", "load_checkpoint", "save_checkpoint"]
