"""``protocol.move_and_fill_units_`` (the one-pass shrink kernel) against an element-by-element reference."""

from __future__ import annotations

import pytest
import torch

from growdense import protocol
from growdense.protocol import CONSUMER, PRODUCER, Axis


def reference(tensor, axis, cap, src, dst, start, stop, value):
    """Unit by unit, element by element along ``axis.dim``: copies from the old tensor, then the fill."""
    old = tensor.clone()
    out = tensor.clone()
    for s, d in zip(src.tolist(), dst.tolist()):
        for b in range(axis.blocks):
            for e in range(axis.unit):
                out.select(axis.dim, (b * cap + d) * axis.unit + e).copy_(
                    old.select(axis.dim, (b * cap + s) * axis.unit + e)
                )
    for u in range(start, stop):
        for b in range(axis.blocks):
            for e in range(axis.unit):
                out.select(axis.dim, (b * cap + u) * axis.unit + e).fill_(value)
    return out


CASES = {
    # name: (shape, axis, capacity)
    "columns (consumer, last dim)": ((37, 12), Axis(1, "in", CONSUMER), 12),
    "columns of a 3-D tensor": ((3, 5, 12), Axis(2, "in", CONSUMER), 12),
    "rows (producer)": ((12, 7), Axis(0, "out", PRODUCER), 12),
    "a bias": ((12,), Axis(0, "out", PRODUCER), 12),
    "heads of 2 rows, q k v stacked": ((3 * 6 * 2, 5), Axis(0, "heads", PRODUCER, unit=2, blocks=3), 6),
    "middle dim": ((4, 12, 3), Axis(1, "w", CONSUMER), 12),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("value", [0.0, 0.5])
@pytest.mark.parametrize("small_blocks", [False, True])
def test_moves_then_fill_equal_the_reference_exactly(name, value, small_blocks, monkeypatch):
    if small_blocks:  # several row blocks per tensor, the last one partial
        monkeypatch.setattr(protocol, "_BLOCK_BYTES", 5 * 12 * 8)
    shape, axis, cap = CASES[name]
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, dtype=torch.float64, generator=g)
    width = cap  # active before the shrink: all of it
    kept = torch.randperm(width, generator=g)[: width // 2].sort().values
    to = kept.numel()
    inside = torch.zeros(to, dtype=torch.bool)
    inside[kept[kept < to]] = True
    src, dst = kept[kept >= to], (~inside).nonzero().flatten()
    assert src.numel() > 0
    want = reference(t, axis, cap, src, dst, to, width, value)
    protocol.move_and_fill_units_(t, axis, cap, src, dst, to, width, value)
    assert torch.equal(t, want)  # copies and fills only: bit for bit


@pytest.mark.parametrize("name", list(CASES))
def test_a_permutation_reads_everything_before_writing(name, monkeypatch):
    monkeypatch.setattr(protocol, "_BLOCK_BYTES", 5 * 12 * 8)
    shape, axis, cap = CASES[name]
    g = torch.Generator().manual_seed(1)
    t = torch.randn(shape, dtype=torch.float64, generator=g)
    perm = torch.randperm(cap, generator=g)
    dst = torch.arange(cap)
    want = reference(t, axis, cap, perm, dst, 0, 0, 0.0)
    protocol.move_and_fill_units_(t, axis, cap, perm, dst, 0, 0)
    assert torch.equal(t, want)


def test_no_moves_only_fills_and_a_non_contiguous_tensor_takes_the_generic_path():
    base = torch.randn(12, 9, dtype=torch.float64)
    t = base.t()  # (9, 12), not contiguous: the units on its last dim
    axis = Axis(1, "in", CONSUMER)
    src, dst = torch.tensor([10, 11]), torch.tensor([1, 4])
    want = reference(t, axis, 12, src, dst, 6, 12, 0.0)
    protocol.move_and_fill_units_(t, axis, 12, src, dst, 6, 12)
    assert torch.equal(t, want)
    want = reference(t, axis, 12, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3, 6, 2.0)
    protocol.move_and_fill_units_(t, axis, 12, None, None, 3, 6, 2.0)
    assert torch.equal(t, want)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("scratch_elements", [1, 7, 30, 10_000])
def test_disjoint_moves_in_pieces_through_a_small_scratch(name, scratch_elements):
    """Moves that fill holes (sources all >= to > destinations) may go through a buffer smaller than them."""
    shape, axis, cap = CASES[name]
    g = torch.Generator().manual_seed(2)
    t = torch.randn(shape, dtype=torch.float64, generator=g)
    kept = torch.randperm(cap, generator=g)[: cap // 2].sort().values
    to = kept.numel()
    inside = torch.zeros(to, dtype=torch.bool)
    inside[kept[kept < to]] = True
    src, dst = kept[kept >= to], (~inside).nonzero().flatten()
    want = reference(t, axis, cap, src, dst, to, cap, 0.0)
    scratch = torch.full((scratch_elements,), float("nan"), dtype=torch.float64)
    protocol.move_and_fill_units_(t, axis, cap, src, dst, to, cap, disjoint=True, scratch=scratch)
    assert torch.equal(t, want)
    # A scratch of another dtype is not used (a buffer of the right one is made).
    t2 = torch.randn(shape, dtype=torch.float64, generator=g)
    want2 = reference(t2, axis, cap, src, dst, to, cap, 0.0)
    protocol.move_and_fill_units_(t2, axis, cap, src, dst, to, cap, scratch=torch.zeros(3, dtype=torch.float32))
    assert torch.equal(t2, want2)
