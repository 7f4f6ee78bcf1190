"""``growdense.optim.Adam``/``AdamW(fused=True)`` on the CPU: growdense's one-pass kernel
(``growdense.ops.adam_step_``) over the active blocks.

The reference is Adam written out here in float64 (Kingma and Ba's update with torch's
bias correction and eps placement), and growdense's unfused optimizer, which
tests/test_active_steps.py holds bit-identical to torch's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from growdense import GrowLinear, Wiring, ops
from growdense.optim import Adam, AdamW

LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8


def reference_adam(p, grads, *, wd=0.0, decoupled=False, maximize=False):
    """Adam (AdamW with ``decoupled``) over a sequence of gradients, in float64."""
    p = p.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    b1, b2 = BETAS
    for t, g in enumerate(grads, start=1):
        g = -g.double() if maximize else g.double()
        if wd and decoupled:
            p = p * (1 - LR * wd)
        elif wd:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - LR / (1 - b1**t) * m / (v.sqrt() / (1 - b2**t) ** 0.5 + EPS)
    return p, m, v


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("wd, decoupled, maximize", [(0.0, False, False), (0.1, False, True), (0.1, True, False)])
def test_the_op_is_adam_on_a_strided_block_and_leaves_the_rest(dtype, tol, wd, decoupled, maximize):
    # Tolerances: float64 to rounding; float32 a few ulps of weights of order 1 after five
    # steps; bfloat16 (8-bit mantissa: ulp 2^-7 near 1) a few of its ulps.
    g = torch.Generator().manual_seed(0)
    start = torch.randn(5, 13, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, 13, generator=g, dtype=torch.float64) for _ in range(5)]
    cap = torch.full((9, 20), 7.0, dtype=dtype)  # outside the block: must stay 7
    cap[:5, :13] = start.to(dtype)
    m, v, grad = torch.zeros_like(cap), torch.zeros_like(cap), torch.full_like(cap, 3.0)
    for t, gr in enumerate(grads, start=1):
        grad[:5, :13] = gr.to(dtype)
        ops.adam_step_([cap[:5, :13]], [grad[:5, :13]], [m[:5, :13]], [v[:5, :13]], [t], lr=LR, beta1=BETAS[0],
                       beta2=BETAS[1], weight_decay=wd, eps=EPS, maximize=maximize, decoupled_weight_decay=decoupled)
    p_ref, m_ref, v_ref = reference_adam(start.to(dtype), [gr.to(dtype) for gr in grads], wd=wd,
                                         decoupled=decoupled, maximize=maximize)
    torch.testing.assert_close(cap[:5, :13].double(), p_ref, rtol=0, atol=tol)
    torch.testing.assert_close(m[:5, :13].double(), m_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(v[:5, :13].double(), v_ref, rtol=tol, atol=tol)
    assert (cap[5:] == 7).all() and (cap[:, 13:] == 7).all()
    assert not m[5:].any() and not m[:, 13:].any() and not v[5:].any() and not v[:, 13:].any()


def test_one_dimensional_and_scalar_blocks_each_with_its_step():
    g = torch.Generator().manual_seed(1)
    vec, scalar = torch.randn(33, generator=g, dtype=torch.float64), torch.randn((), generator=g, dtype=torch.float64)
    gv, gs = torch.randn(33, generator=g, dtype=torch.float64), torch.randn((), generator=g, dtype=torch.float64)
    tensors = [vec.clone(), scalar.clone()]
    moments = [torch.zeros_like(t) for t in tensors], [torch.zeros_like(t) for t in tensors]
    # steps 1 and 3: a block three steps old with zero moments takes a smaller first step
    ops.adam_step_(tensors, [gv, gs], *moments, [1, 3], lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=0.0,
                   eps=EPS)
    b1, b2 = BETAS
    for t, start, grad, step in zip(tensors, (vec, scalar), (gv, gs), (1, 3)):
        m, v = (1 - b1) * grad, (1 - b2) * grad * grad
        want = start - LR / (1 - b1**step) * m / (v.sqrt() / (1 - b2**step) ** 0.5 + EPS)
        torch.testing.assert_close(t, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda b: b.update(grads=[b["grads"][0][:2]]), "shape"),
        (lambda b: b.update(exp_avgs=[b["exp_avgs"][0].double()]), "dtype"),
        (lambda b: b.update(params=[b["params"][0].long()]), "float32, float64"),
        (lambda b: b.update(steps=[1.0, 2.0]), "one entry per block"),
        (lambda b: b.update(steps=[0.0]), "at least 1"),
        (lambda b: b.update(params=[b["params"][0].t()], grads=[b["grads"][0].t()], exp_avgs=[b["exp_avgs"][0].t()],
                            exp_avg_sqs=[b["exp_avg_sqs"][0].t()]), "contiguous columns"),
        (lambda b: [b[k].__setitem__(0, b[k][0].view(2, 2, 3)) for k in ("params", "grads", "exp_avgs",
                                                                           "exp_avg_sqs")], "at most 2-D"),
    ],
)
def test_bad_blocks_are_refused_before_anything_changes(change, match):
    blocks = {k: [torch.ones(4, 3)] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs")}
    blocks["steps"] = [1.0]
    change(blocks)
    before = {k: [t.clone() for t in v] if k != "steps" else list(v) for k, v in blocks.items()}
    with pytest.raises(RuntimeError, match=match):
        ops.adam_step_(blocks["params"], blocks["grads"], blocks["exp_avgs"], blocks["exp_avg_sqs"], blocks["steps"],
                       lr=LR, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=EPS)
    for k in ("params", "exp_avgs", "exp_avg_sqs"):
        assert all(torch.equal(a, b) for a, b in zip(blocks[k], before[k]))


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(GrowLinear(10, 6, capacity_out=24, activation="relu"),
                               GrowLinear(6, 3, capacity_in=24, capacity_out=8))


def run(net, opt, steps=8, grow_at=4):
    wiring = Wiring(optimizer=opt)
    wiring.add("h", net[0], [net[1]])
    for step in range(steps):
        if step == grow_at:
            wiring.grow("h", 5, generator=torch.Generator().manual_seed(5), optimizer_state="keep")
        opt.zero_grad()
        x = torch.randn(7, 10, generator=torch.Generator().manual_seed(step))
        net(x).pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("make, kwargs", [(Adam, {}), (Adam, {"weight_decay": 0.1, "maximize": True}),
                                          (AdamW, {"weight_decay": 0.05})])
def test_fused_counts_each_neurons_age_as_the_unfused_optimizer_does(make, kwargs):
    # A growth under optimizer_state="keep" gives the new neurons their own step count; the
    # unfused optimizer (bit-identical to torch's, test_active_steps.py) is the reference.
    # 8 steps of lr 1e-2 on float32 weights of order 1: 1e-6 absolute bounds the rounding.
    # The moments follow gradients taken at weights a rounding apart, which moves a small
    # gradient by more than its own ulps: 1e-5 of the largest moment.
    a, b = model(), model()
    oa, ob = make(a.parameters(), lr=LR, **kwargs), make(b.parameters(), lr=LR, fused=True, **kwargs)
    run(a, oa)
    run(b, ob)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
        for key in ("exp_avg", "exp_avg_sq"):
            want = oa.state[p][key]
            torch.testing.assert_close(ob.state[q][key], want, rtol=0, atol=1e-5 * want.abs().max().item())
        assert torch.equal(ob.state[q]["step"].float(), oa.state[p]["step"].float())
    assert b[0].out_features == 11 and not b[0].weight[11:].any() and not ob.state[b[0].weight]["exp_avg"][11:].any()


def test_hooks_run_once_per_step_and_other_groups_step_as_torchs():
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # torch wraps its own Adam.step with the hooks
    net = model()
    conv = torch.nn.Conv2d(2, 3, 3)  # a 4-D weight: stepped as one flat block
    odd = torch.nn.Parameter(torch.randn(6, 5).t())  # columns not contiguous: torch's single-tensor update
    ref_net, ref_conv, ref_odd = copy.deepcopy(net), copy.deepcopy(conv), torch.nn.Parameter(odd.detach().clone())
    groups = lambda n, c, o: [{"params": n.parameters()}, {"params": [*c.parameters(), o], "fused": False}]  # noqa
    ours = Adam(groups(net, conv, odd), lr=LR, fused=True)
    ref = torch.optim.Adam(groups(ref_net, ref_conv, ref_odd), lr=LR, foreach=False)
    calls = []
    ours.register_step_post_hook(lambda *args: calls.append(1))
    for step in range(3):
        for n, c, o, opt in ((net, conv, odd, ours), (ref_net, ref_conv, ref_odd, ref)):
            opt.zero_grad()
            x = torch.randn(4, 10, generator=torch.Generator().manual_seed(step))
            img = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(step))
            (n(x).pow(2).sum() + c(img).pow(2).sum() + o.pow(3).sum()).backward()
            opt.step()
    assert len(calls) == 3
    for p, q in zip([*conv.parameters(), odd], [*ref_conv.parameters(), ref_odd]):
        assert torch.equal(p, q)  # the unfused group is torch's own update
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_leftover_strided_tensors_in_a_fused_group():
    odd = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64).t())  # no contiguous columns
    flat = torch.nn.Parameter(torch.randn(2, 3, 4, dtype=torch.float64))
    ref = [torch.nn.Parameter(t.detach().clone()) for t in (odd, flat)]
    ours = Adam([odd, flat], lr=LR, fused=True)
    theirs = torch.optim.Adam(ref, lr=LR, foreach=False)
    for step in range(3):
        for ps, opt in (([odd, flat], ours), (ref, theirs)):
            opt.zero_grad()
            sum(p.sin().sum() for p in ps).backward()
            opt.step()
    for p, q in zip([odd, flat], ref):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        assert ours.state[p]["step"].item() == 3
