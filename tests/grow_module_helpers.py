"""Shared checks for the growable twins of torch modules (norms, embedding, attention)."""

from __future__ import annotations

import torch
from torch import Tensor


def active_part(module, path: str, tensor: Tensor) -> Tensor:
    """``tensor`` (a capacity-shaped parameter or gradient of ``path``) cut to the twin's shape."""
    dims = module._layout()[path]
    view = tensor.view(module._factored_shape(dims))[module._region(dims)]
    return view.reshape(module._twin_shape(dims))


def outside_is_zero(module, path: str, tensor: Tensor) -> bool:
    """Whether everything of ``tensor`` outside ``path``'s active part is zero."""
    dims = module._layout()[path]
    rest = tensor.detach().clone()
    rest.view(module._factored_shape(dims))[module._region(dims)] = 0
    return bool((rest == 0).all())


def assert_outside_zero(module, grads: bool = True) -> None:
    """Every declared tensor (and its gradient) is zero outside its active part."""
    for path in module.tensor_layout():
        t = module._tensor(path)
        assert outside_is_zero(module, path, t), f"{path} is nonzero outside its active part"
        if grads and t.grad is not None:
            g = t.grad.to_dense() if t.grad.is_sparse else t.grad
            assert outside_is_zero(module, path, g), f"{path}.grad is nonzero outside its active part"


def storage(module) -> dict:
    """``path -> (Parameter object, data_ptr)`` of every declared tensor."""
    return {path: (module._tensor(path), module._tensor(path).data_ptr()) for path in module.tensor_layout()}


def assert_same_storage(module, before: dict) -> None:
    for path, (param, ptr) in before.items():
        assert module._tensor(path) is param, f"{path} is a new object"
        assert param.data_ptr() == ptr, f"{path} moved to new storage"


def twin_state(module) -> dict:
    """The active part of every declared tensor, as the torch twin's state_dict."""
    return {path: module.active_tensor(path).detach().clone() for path in module.tensor_layout()}


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them through aot_eager."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        return lookup_backend("aot_eager")(gm, example_inputs)
