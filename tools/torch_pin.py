"""scikit-build-core metadata provider: pin the runtime torch to the build's torch."""

from __future__ import annotations

__all__ = ["dynamic_metadata"]


def dynamic_metadata(field: str, settings: dict | None = None) -> list[str]:
    if field != "dependencies":
        raise ValueError(f"torch_pin only provides 'dependencies', not {field!r}")
    import torch

    release = torch.__version__.split("+")[0]
    return [f"torch=={release}", "numpy"]
