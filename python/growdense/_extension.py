"""Loads the compiled parts of growdense and checks they match the installed torch."""

from __future__ import annotations

from pathlib import Path

import torch

_REBUILD = (
    "Rebuild growdense against the installed torch: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` from the source tree."
)

try:
    from . import _C
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        f"growdense's compiled extension is missing ({error}). Install the package with pip "
        "so that it is built: `pip install --no-build-isolation .` from the source tree."
    ) from error


def _release(version: str) -> str:
    return version.split("+")[0]


def check_torch_version(built: str, installed: str) -> None:
    """Raise ImportError when the extension was built for another torch release."""
    if _release(built) != _release(installed):
        raise ImportError(
            f"growdense was built against torch {built} but torch {installed} is installed; "
            f"a C++ extension only loads under the torch it was compiled for. {_REBUILD}"
        )


check_torch_version(_C.torch_version, torch.__version__)

# Next to _C, which an editable install keeps apart from the Python sources.
_library = next(Path(_C.__file__).parent.glob("libgrowdense_ops*.so"), None)
if _library is None:  # pragma: no cover
    raise ImportError(f"growdense's operator library libgrowdense_ops.so is missing. {_REBUILD}")
try:
    torch.ops.load_library(str(_library))
except OSError as error:  # pragma: no cover
    raise ImportError(f"growdense could not load {_library.name}: {error}. {_REBUILD}") from error


def build_info() -> dict[str, object]:
    """What this build contains: version, the torch it was built against, CUDA kernels."""
    return {
        "version": _C.version,
        "torch_version": _C.torch_version,
        "with_cuda": bool(_C.with_cuda),
        "cuda_version": _C.cuda_version or None,
        "cuda_archs": _C.cuda_archs.split() if _C.cuda_archs else [],
        "compiler": _C.compiler,
    }


def cuda_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return bool(_C.with_cuda)


def cuda_available() -> bool:
    """Whether growdense's CUDA kernels can run here: built with them, and a GPU is present."""
    return cuda_built() and torch.cuda.is_available()
