"""growdense: dense layers that grow and shrink in place while they train."""

from ._extension import build_info, cuda_available, cuda_built
from .layers import GrowLinear, active_block
from . import init_strategies, ops, optim, optim_state, policies
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .schedule import GrowthEvent, GrowthSchedule
from .wiring import Wiring
from . import gradient_growth  # registers init='gradmax' and init='tiny'
from .growable import NotGrowableError, growable
from .norms import GrowLayerNorm, GrowRMSNorm
from .embedding import GrowEmbedding
from .attention import GrowMultiheadAttention

__version__ = build_info()["version"]

__all__ = [
    "GrowLinear",
    "GrowLayerNorm",
    "GrowRMSNorm",
    "GrowEmbedding",
    "GrowMultiheadAttention",
    "Wiring",
    "growable",
    "NotGrowableError",
    "GrowthEvent",
    "GrowthSchedule",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "active_block",
    "ops",
    "optim",
    "optim_state",
    "init_strategies",
    "gradient_growth",
    "policies",
    "build_info",
    "cuda_available",
    "cuda_built",
    "__version__",
]
