"""growdense::normal_block_ on the CPU: torch's values, bit for bit, and torch's generator state after.

The reference is growdense.protocol.draw_normal_, pure torch: torch's normal_ of the block,
in contiguous chunks where the block is not contiguous. growdense draws float32 chunks of
16 values or more with its own kernel where that kernel gives torch's values (checked once
per process against torch); every comparison here is exact (torch.equal), since the
promise is the same values, not close ones.
"""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import growdense  # noqa: F401  (loads the operators)
from growdense import ops, protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def both(shape, rows, cols, std, seed, skip, dtype=torch.float32):
    """``(growdense's tensor, the reference's)`` and whether the generators end in the same state."""
    g_ours, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for g in (g_ours, g_ref):  # start anywhere within the engine's 624 words
        torch.empty(skip).uniform_(generator=g)
    ours, ref = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    ops.normal_block_(ours, rows, cols, std, g_ours)
    protocol.draw_normal_(ref[rows[0]:rows[1], cols[0]:cols[1]], std, g_ref)
    return ours, ref, torch.equal(g_ours.get_state(), g_ref.get_state())


@pytest.mark.parametrize(
    "shape, rows, cols",
    [
        ((512, 128), (256, 512), (0, 128)),  # whole rows: one contiguous draw (a GrowLinear's new rows)
        ((128, 512), (64, 128), (0, 256)),  # part of each row: chunks of whole rows, copied in
        ((37, 53), (3, 30), (5, 41)),  # neither dimension a multiple of 16: the tail of each chunk
        ((1, 16), (0, 1), (0, 16)),  # exactly 16 values
        ((1, 17), (0, 1), (0, 17)),  # 17: the last 16 drawn again
        ((5, 3), (0, 5), (0, 3)),  # under 16 values: torch's own serial path
        ((700, 700), (1, 699), (0, 700)),  # several regenerations of the engine's words
        ((4, 5000), (1, 3), (0, 4999)),  # a row longer than a chunk
    ],
)
@pytest.mark.parametrize("skip", [0, 1, 623, 624, 1000])
def test_normal_block_gives_torchs_values_and_generator_state(shape, rows, cols, skip):
    ours, ref, same_state = both(shape, rows, cols, 0.3, seed=7, skip=skip)
    assert torch.equal(ours, ref)
    assert same_state


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 70), cols=st.integers(1, 300), r0=st.integers(0, 5), c0=st.integers(0, 9),
    skip=st.integers(0, 2000), seed=st.integers(0, 2**31 - 1), std=st.floats(0.0, 3.0),
)
def test_normal_block_gives_torchs_values_for_any_block(rows, cols, r0, c0, skip, seed, std):
    shape = (rows + r0 + 2, cols + c0 + 3)
    ours, ref, same_state = both(shape, (r0, r0 + rows), (c0, c0 + cols), std, seed, skip)
    assert torch.equal(ours, ref)
    assert same_state


def test_other_dtypes_and_the_default_generator_are_torchs():
    for dtype in (torch.float64, torch.bfloat16):  # torch draws these
        ours, ref, same_state = both((40, 40), (2, 38), (0, 33), 1.0, seed=3, skip=5, dtype=dtype)
        assert torch.equal(ours, ref) and same_state
    torch.manual_seed(11)
    ours = torch.zeros(64, 64)
    ops.normal_block_(ours, (8, 64), (0, 64), 0.5)
    after_ours = torch.get_rng_state()
    torch.manual_seed(11)
    ref = torch.zeros(64, 64)
    protocol.draw_normal_(ref[8:64], 0.5)
    assert torch.equal(ours, ref)
    assert torch.equal(after_ours, torch.get_rng_state())


def test_the_draws_are_growdenses_where_aten_runs_avx2():
    """Where ATen's kernels are AVX2 (and growdense built and runs its AVX2 kernels), the
    float32 draws are growdense's: the faster kernel is not silently off."""
    if "avx2" not in ops.cpu_capabilities() or not torch.backends.cpu.get_cpu_capability().startswith("AVX2"):
        pytest.skip("ATen does not run its AVX2 kernels here")
    assert ops.cpu_normal_draws() == "avx2"


def test_with_aten_lowered_to_its_default_kernels_the_values_are_still_torchs():
    code = (
        "import torch, growdense\n"
        "from growdense import ops, protocol\n"
        "g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)\n"
        "a, b = torch.zeros(300, 77), torch.zeros(300, 77)\n"
        "ops.normal_block_(a, (3, 290), (0, 77), 0.5, g1)\n"
        "protocol.draw_normal_(b[3:290], 0.5, g2)\n"
        "assert torch.equal(a, b) and torch.equal(g1.get_state(), g2.get_state())\n"
        "print(ops.cpu_normal_draws())\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    env.pop("GROWDENSE_CPU_CAPABILITY", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("default", "torch")


@pytest.mark.parametrize("index", [(slice(3, 30), slice(5, 41)), (slice(None), slice(2, None)),
                                   (slice(-10, None), slice(None, -4)), (slice(5, 5), slice(0, 9))])
def test_block_normal_reads_an_index_as_tensor_indexing_does(index):
    """growdense.ops.block_normal_ (the kernel modules declare) fills exactly ``tensor[index]``, with the
    reference's values: open and negative bounds included, an empty block drawing nothing."""
    g_ours, g_ref = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    ours, ref = torch.zeros(37, 53), torch.zeros(37, 53)
    ops.block_normal_(ours, index, 0.7, g_ours)
    protocol.normal_(ref, index, 0.7, g_ref)
    assert torch.equal(ours, ref)
    assert torch.equal(g_ours.get_state(), g_ref.get_state())
