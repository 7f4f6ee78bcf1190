"""Each element's age in growdense.optim for tensors of any rank (issue 23).

:func:`growdense.optim.cohorts` splits a Parameter's active block into boxes of elements
born at the same step. A width may ride any dimension: the heads of a
``GrowMultiheadAttention(add_bias_kv=True)`` ride the third dimension of its ``(1, 1,
capacity)`` ``bias_k`` and ``bias_v``. Heads added under ``optimizer_state="keep"`` must
then be stepped with their own step count, exactly as a fresh optimizer over the new
heads' slices would step them.

References: a brute-force age per element (the latest birth of its indices, by NumPy
broadcasting) for the split; a fresh ``growdense.optim`` optimizer over copies of the new
slices for the training. That comparison is bit for bit (``torch.equal``): both apply the
same element-wise operations to the same values.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from growdense import GrowMultiheadAttention, Wiring
from growdense import optim
from growdense.optim import BIRTH_KEY, cohorts


def brute_force_ages(active, births) -> np.ndarray:
    """The birth of every element of the block: the maximum over its indices' births."""
    ages = np.zeros(active, dtype=np.int64)
    for d, n in enumerate(active):
        shape = [1] * len(active)
        shape[d] = n
        ages = np.maximum(ages, np.asarray(births[d][:n], dtype=np.int64).reshape(shape))
    return ages


def assert_exact_cover(active, births):
    covered = np.zeros(active, dtype=np.int64)
    ages = brute_force_ages(active, births)
    boxes = cohorts(active, births)
    for index, birth in boxes:
        covered[index] += 1
        assert (ages[index] == birth).all(), (index, birth)
    assert (covered == 1).all()
    return boxes


@pytest.mark.parametrize("seed", range(40))
def test_cohorts_cover_the_block_once_with_one_age_per_box_in_any_rank(seed):
    rng = random.Random(seed)
    rank = rng.choice([1, 2, 3, 4])
    capacity = [rng.randint(1, 5) for _ in range(rank)]
    active = tuple(rng.randint(0, c) for c in capacity)
    # Births from a few distinct steps, scattered (as after a permutation) or in order.
    steps = [0] + sorted(rng.sample(range(1, 30), 3))
    births = [sorted(rng.choices(steps, k=c)) if rng.random() < 0.5 else rng.choices(steps, k=c) for c in capacity]
    assert_exact_cover(active, births)


def test_in_order_births_give_one_box_per_birth_and_dimension():
    # A matrix grown along both dimensions: two boxes for the new birth, as before.
    assert assert_exact_cover((4, 3), [[0, 0, 5, 5], [0, 0, 5]]) == [
        ((slice(0, 2), slice(0, 2)), 0),
        ((slice(2, 4), slice(0, 3)), 5),
        ((slice(0, 2), slice(2, 3)), 5),
    ]
    # bias_k's (1, 1, heads * head_dim): the third dimension's births count.
    assert assert_exact_cover((1, 1, 6), [[0], [0], [0, 0, 0, 0, 7, 7]]) == [
        ((slice(0, 1), slice(0, 1), slice(0, 4)), 0),
        ((slice(0, 1), slice(0, 1), slice(4, 6)), 7),
    ]
    with pytest.raises(ValueError, match="births for 2 dimensions"):
        cohorts((1, 1, 6), [[0], [0]])


# ---- new heads of an attention with bias_k/bias_v, stepped as by a fresh optimizer -------------
D, H0, GROW, CAP = 4, 2, 2, 4  # head_dim, heads before, heads added, capacity in heads
E = 8


def head_slices(attn, start, stop):
    """The new heads' part of every Parameter riding the heads: (parameter, index) pairs."""
    rows = slice(start * D, stop * D)
    cap = CAP * D
    out = [(attn.bias_k, (slice(None), slice(None), rows)), (attn.bias_v, (slice(None), slice(None), rows))]
    for j in range(3):  # q, k, v blocks of in_proj_weight / in_proj_bias
        block = slice(j * cap + start * D, j * cap + stop * D)
        out += [(attn.in_proj_weight, (block, slice(0, E))), (attn.in_proj_bias, (block,))]
    out.append((attn.out_proj.weight, (slice(0, E), rows)))
    return out


MAKERS = {
    "adam": lambda ps: optim.Adam(ps, lr=1e-2, weight_decay=0.01),
    "adamw-amsgrad": lambda ps: optim.AdamW(ps, lr=1e-2, amsgrad=True),
    "radam": lambda ps: optim.RAdam(ps, lr=1e-2),
    "adagrad-lr-decay": lambda ps: optim.Adagrad(ps, lr=1e-2, lr_decay=0.05),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_new_heads_of_bias_k_and_bias_v_count_their_own_steps(name):
    make = MAKERS[name]
    torch.manual_seed(0)
    attn = GrowMultiheadAttention(E, H0, add_bias_kv=True, batch_first=True, capacity_heads=CAP, dtype=torch.float64)
    opt = make(attn.parameters())
    wiring = Wiring(opt, optimizer_state="keep")
    wiring.add_width("heads", [(attn, "heads")])
    x = torch.randn(3, 5, E, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def step():
        opt.zero_grad()
        out, _ = attn(x, x, x, need_weights=False)
        out.pow(2).sum().backward()
        opt.step()

    for _ in range(6):
        step()
    wiring.grow("heads", GROW, init="he", generator=torch.Generator().manual_seed(2))
    assert opt.state[attn.bias_k][BIRTH_KEY][2] == [0] * (H0 * D) + [6] * (GROW * D) + [0] * ((CAP - H0 - GROW) * D)
    pairs = head_slices(attn, H0, H0 + GROW)
    fresh = [nn.Parameter(p.detach()[index].clone()) for p, index in pairs]
    fresh_opt = make(fresh)
    for s in range(3):
        step()
        for f, (p, index) in zip(fresh, pairs):
            f.grad = p.grad[index].clone()
        fresh_opt.step()
        for k, (f, (p, index)) in enumerate(zip(fresh, pairs)):
            assert torch.equal(p.detach()[index], f.detach()), (s, k)
    # The Parameter's own count is its oldest elements' (6 steps before the growth, 3 after).
    assert int(opt.state[attn.bias_k]["step"]) == 9
