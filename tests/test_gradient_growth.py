"""GradMax and TINY initialisations (growdense.gradient_growth) against direct float64 computations."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from growdense import GrowLinear, Wiring
from growdense import gradient_growth as gg

D = torch.float64


class Net(torch.nn.Module):
    """x -> producer (relu) -> [c1 (relu), c2 (linear)] -> a fixed readout; width 'h' has two consumers."""

    def __init__(self, seed=0, act="relu", width=4, cap=12, p=6):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.producer = GrowLinear(p, width, capacity_out=cap, activation=None if act == "none" else act, dtype=D)
        self.c1 = GrowLinear(width, 5, capacity_in=cap, activation="relu", dtype=D)
        self.c2 = GrowLinear(width, 3, capacity_in=cap, dtype=D)
        with torch.no_grad():
            for layer in (self.producer, self.c1, self.c2):
                layer.active_weight.copy_(torch.randn(layer.active_weight.shape, generator=g, dtype=D))
                layer.active_bias.copy_(0.1 * torch.randn(layer.active_bias.shape, generator=g, dtype=D))
        self.r1 = torch.randn(5, 2, generator=g, dtype=D)
        self.r2 = torch.randn(3, 2, generator=g, dtype=D)
        self.x = torch.randn(40, p, generator=g, dtype=D)
        self.t = torch.randn(40, 2, generator=g, dtype=D)

    def forward(self, x):
        h = self.producer(x)
        return self.c1(h) @ self.r1 + self.c2(h) @ self.r2

    def loss(self):
        return F.mse_loss(self(self.x), self.t)

    def wiring(self):
        w = Wiring()
        w.add("h", self.producer, [self.c1, self.c2])
        return w

    def reference(self):
        """Per-sample a, h, delta (stacked c1, c2) and the loss, with plain torch ops on copies."""
        P, pb = self.producer.active_weight.detach(), self.producer.active_bias.detach()
        a = self.x
        u = a @ P.T + pb
        h = u if self.producer.activation == "none" else F.relu(u)
        z1 = (h @ self.c1.active_weight.detach().T + self.c1.active_bias.detach()).requires_grad_(True)
        z2 = (h @ self.c2.active_weight.detach().T + self.c2.active_bias.detach()).requires_grad_(True)
        loss = F.mse_loss(F.relu(z1) @ self.r1 + z2 @ self.r2, self.t)
        d1, d2 = torch.autograd.grad(loss, (z1, z2))
        return a, h, torch.cat([d1, d2], 1), float(loss.detach())


def test_statistics_M_matches_direct():
    net = Net()
    calls = []

    def closure():
        calls.append(1)
        return net.loss()

    stats = gg.collect_statistics(net.producer, [net.c1, net.c2], closure, tiny=True)
    a, h, d, loss = net.reference()
    ht = torch.cat([h, torch.ones(len(h), 1, dtype=D)], 1)
    # float64 throughout: the two computations differ by summation order only
    torch.testing.assert_close(stats.M, d.T @ a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(stats.S, a.T @ a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.G, d.T @ ht, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(stats.C, a.T @ ht, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.S_h, ht.T @ ht, rtol=1e-12, atol=1e-12)
    assert stats.loss == pytest.approx(loss, rel=1e-14)
    assert len(calls) == 1


def _grads(net):
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("bias", [0.0, 0.25])
def test_gradmax_grow_spans_top_singular_directions(bias):
    net = Net()
    # .grad as a user left it: some set, the output's value must stay
    net.loss().backward()
    net.producer.bias.grad = None
    before_grads = _grads(net)
    wiring = net.wiring()
    a, h, d, _ = net.reference()
    M = d.T @ a  # (5 + 3) x 6
    U, s, _ = torch.linalg.svd(M)
    assert s[2] - s[3] > 1e-3 * s[0]  # distinct: the top-3 subspace is well defined
    out_before = net(net.x).detach()
    calls = []

    def closure():
        calls.append(1)
        return net.loss()

    wiring.grow("h", 3, init="gradmax", closure=closure, bias=bias)
    assert len(calls) == 1
    assert net.producer.out_features == 7 and net.c1.in_features == 7 and net.c2.in_features == 7
    new_cols = torch.cat([net.c1.weight[:5, 4:7], net.c2.weight[:3, 4:7]], 0)
    # spans the top-3 left singular directions: equal orthogonal projectors (float64 SVDs of the same M)
    Q, _ = torch.linalg.qr(new_cols)
    torch.testing.assert_close(Q @ Q.T, U[:, :3] @ U[:, :3].T, rtol=0, atol=1e-8)
    # GradMax's scale: every new column has the mean norm of the existing (stacked) columns
    existing = torch.cat([net.c1.weight[:5, :4], net.c2.weight[:3, :4]], 0).norm(dim=0).mean()
    torch.testing.assert_close(new_cols.norm(dim=0), existing.expand(3), rtol=1e-12, atol=0)
    assert torch.all(net.producer.weight[4:7] == 0)
    assert torch.all(net.producer.bias[4:7] == bias)
    # output unchanged: exactly the same sum when bias = 0; to rounding with the compensated bias
    torch.testing.assert_close(net(net.x).detach(), out_before, rtol=0, atol=1e-12)
    after = _grads(net)
    for b, g in zip(before_grads, after):
        if b is None:
            assert g is None
        else:  # untouched where the user had a gradient; the new slices zero (as every growth)
            torch.testing.assert_close(g[tuple(slice(0, n) for n in b.shape)], b, rtol=0, atol=0)


def test_gradmax_more_neurons_than_directions():
    net = Net()
    wiring = net.wiring()
    # M is 8 x 6: at most 6 singular directions; the 2 others are random, same norm
    wiring.grow("h", 8, init="gradmax", closure=net.loss, generator=torch.Generator().manual_seed(1))
    cols = torch.cat([net.c1.weight[:5, 4:12], net.c2.weight[:3, 4:12]], 0)
    norms = cols.norm(dim=0)
    torch.testing.assert_close(norms, norms[0].expand(8), rtol=1e-12, atol=0)


def test_gradmax_relu_neurons_learn_only_with_bias():
    for bias, alive in ((0.0, False), (0.5, True)):
        net = Net()
        net.wiring().grow("h", 2, init="gradmax", closure=net.loss, bias=bias)
        net.zero_grad()
        net.loss().backward()
        assert bool(net.producer.weight.grad[4:6].abs().sum() > 0) == alive


def _direct_tiny(net, n, project=True):
    """TINY's optimum by a different route: lstsq for dW*, Cholesky whitening, rank-n SVD truncation."""
    a, h, d, _ = net.reference()
    ht = torch.cat([h, torch.ones(len(h), 1, dtype=D)], 1)
    v = -d
    if project:
        dW = torch.linalg.lstsq(ht, v).solution.T  # argmin ||v - ht dW^T||
        v = v - ht @ dW.T
    L = torch.linalg.cholesky(a.T @ a)
    # min ||v - a B^T||, B = Omega A^T rank n: with a = Q R (R = L^T), best rank-n of Q^T v
    Q = a @ torch.linalg.inv(L.T)
    Uq, sq, Vq = torch.linalg.svd(Q.T @ v, full_matrices=False)
    Bt = torch.linalg.solve(L.T, (Uq[:, :n] * sq[:n]) @ Vq[:n])  # p x c
    return Bt.T, sq[:n], v


def test_tiny_matches_direct_solution():
    net = Net(p=6, width=4)
    new = gg.tiny_slices(net.producer, [net.c1, net.c2], 3, net.loss)
    B = torch.cat(new.outgoing, 0) @ new.incoming  # (c x n)(n x p)
    B_ref, lam_ref, _ = _direct_tiny(net, 3)
    torch.testing.assert_close(B, B_ref, rtol=0, atol=1e-8 * B_ref.abs().max())
    torch.testing.assert_close(torch.tensor(new.info["eigenvalues"], dtype=D), lam_ref, rtol=1e-9, atol=0)
    assert new.predicted == pytest.approx(float(lam_ref.pow(2).sum()), rel=1e-9)
    # without the projection: the gradient alone
    new = gg.tiny_slices(net.producer, [net.c1, net.c2], 2, net.loss, project=False)
    B_ref, _, _ = _direct_tiny(net, 2, project=False)
    torch.testing.assert_close(torch.cat(new.outgoing, 0) @ new.incoming, B_ref, rtol=0, atol=1e-8 * B_ref.abs().max())


@pytest.mark.parametrize("act", ["relu", "none"])
def test_tiny_loss_change_matches_first_order_as_scale_vanishes(act):
    net = Net(act=act)
    producer, consumers = net.producer, [net.c1, net.c2]
    new = gg.tiny_slices(producer, consumers, 2, net.loss)
    loss0 = float(net.loss().detach())
    producer.grow_out(2, "zero")
    for c in consumers:
        c.grow_in(2, "zero")
    gg._write(producer, consumers, 4, new, 1.0)
    coef = gg.first_order_coefficient(producer, consumers, 4, 6, net.loss)
    # the strategy's own prediction (per-neuron signs chosen from it) is that coefficient
    assert coef == pytest.approx(new.info["first_order"], rel=1e-10)
    if act == "none":  # linear producer: TINY's linear model is exact
        assert coef == pytest.approx(new.info["linear_first_order"], rel=1e-10)
    assert coef > 0  # a decrease
    errors = []
    for gamma in (1e-1, 1e-2, 1e-3):
        with torch.no_grad():
            gg._write(producer, consumers, 4, new, gamma)
        change = loss0 - float(net.loss().detach())
        errors.append(abs(change / (gamma**2 * coef) - 1))
    # the ratio tends to 1 (error O(gamma^2)); float64 keeps the smallest step's change
    # (about 1e-6 of the loss) far above rounding
    assert errors[2] < 1e-3 and errors[2] < errors[1] < errors[0]


def test_tiny_grow_line_search_never_increases_loss():
    for seed in range(4):
        net = Net(seed=seed)
        loss0 = float(net.loss().detach())
        calls = []

        def closure():
            calls.append(1)
            return net.loss()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            net.wiring().grow("h", 3, init="tiny", closure=closure)
        assert float(net.loss()) <= loss0
        assert 2 <= len(calls) <= 1 + 8


def test_failed_closure_changes_nothing():
    net = Net()
    wiring = net.wiring()
    state = {k: v.clone() for k, v in net.state_dict().items() if torch.is_tensor(v)}

    def bad():
        loss = net.loss()
        loss.backward()
        return loss

    net.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="backward"):
        wiring.grow("h", 2, init="gradmax", closure=bad)
    assert wiring.width("h") == 4
    for k, v in net.state_dict().items():
        if torch.is_tensor(v):
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="closure"):
        wiring.grow("h", 2, init="tiny")
    with pytest.raises(TypeError, match="unexpected option"):
        wiring.grow("h", 2, init="gradmax", closure=net.loss, lr=1)

    n = [0]

    def fails_later():  # the TINY line search's second call raises: the growth is undone
        n[0] += 1
        if n[0] > 1:
            raise KeyError("data")
        return net.loss()

    with pytest.raises(KeyError):
        wiring.grow("h", 2, init="tiny", closure=fails_later)
    assert wiring.width("h") == 4
    for k, v in net.state_dict().items():
        if torch.is_tensor(v):
            torch.testing.assert_close(v, state[k], rtol=0, atol=0)


# ---- schedules, the trigger, the Lightning callback ------------------------------------------
from growdense import GrowthEvent, GrowthSchedule  # noqa: E402
from growdense.triggers import GradientTrigger  # noqa: E402


def test_schedule_applies_gradmax_with_closure():
    net = Net()
    wiring = net.wiring()
    schedule = GrowthSchedule({"h": 4}, [GrowthEvent(1, grow_by={"h": 3})])
    out = net(net.x).detach()
    with pytest.raises(ValueError, match="closure"):
        schedule.apply(1, wiring, init="gradmax")
    assert wiring.width("h") == 4
    assert schedule.apply(1, wiring, init="gradmax", closure=net.loss)
    assert wiring.width("h") == 7
    torch.testing.assert_close(net(net.x).detach(), out, rtol=0, atol=1e-12)


def test_trigger_gradmax_score_and_budget():
    net = Net()
    wiring = net.wiring()
    trigger = GradientTrigger({"h": 3}, {"h": 10}, threshold=0.0, max_growths=5)
    # the score: per-neuron gradient energy of GradMax's new neurons over that of the existing ones
    from growdense.triggers import gradmax_score

    a, h, d, _ = net.reference()
    M = d.T @ a
    s = torch.linalg.svdvals(M)
    cols = torch.cat([net.c1.weight[:5, :4], net.c2.weight[:3, :4]], 0)
    m = cols.norm(dim=0).mean()
    net.zero_grad()
    net.loss().backward()
    existing = net.producer.weight.grad[:4, :6].pow(2).sum() / 4
    expected = float((s[:3].pow(2).sum() * m**2 / 3) / existing)
    net.zero_grad(set_to_none=True)
    assert gradmax_score(wiring, "h", 3, net.loss) == pytest.approx(expected, rel=1e-10)
    widths = []
    for epoch in range(6):
        trigger.apply(epoch, wiring, closure=net.loss)
        widths.append(wiring.width("h"))
    assert widths == [7, 10, 10, 10, 10, 10]  # threshold 0: grows whenever it can, up to the target
    assert trigger.growths == 2 and trigger.exhausted(wiring)
    high = GradientTrigger({"h": 3}, {"h": 10}, threshold=1e30)
    net2 = Net()
    assert not high.apply(0, net2.wiring(), closure=net2.loss)


def test_trigger_plateau_and_cooldown():
    net = Net()
    wiring = net.wiring()
    trigger = GradientTrigger({"h": 2}, {"h": 8}, criterion="plateau", threshold=0.05, patience=2, cooldown=2,
                              init="zero_out")
    grew = [trigger.apply(e, wiring, loss=v) for e, v in enumerate([10.0, 8.0, 6.0, 5.9, 5.85, 5.8, 5.79])]
    # 10 -> 6 over two checks: no plateau; 8 -> 5.9 no; 6 -> 5.85 (2.5%) grows at epoch 4; then the
    # history restarts and cooldown holds epoch 5
    assert grew == [False, False, False, False, True, False, False]
    assert wiring.width("h") == 6
    state = trigger.state_dict()
    other = GradientTrigger({"h": 2}, {"h": 8}, criterion="plateau", init="zero_out")
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_lightning_callback_with_gradmax_and_trigger(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from growdense.lightning import GrowthCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Net()
            self.wiring = self.net.wiring()

        def training_step(self, batch, batch_idx):
            loss = self.net.loss()
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=2)
    calls = []

    def closure_of(trainer, module):
        def closure():
            calls.append(trainer.current_epoch)
            return module.net.loss()

        return closure

    for schedule, init in ((GrowthSchedule({"h": 4}, [GrowthEvent(1, grow_by={"h": 2})]), "gradmax"),
                           (GradientTrigger({"h": 2}, {"h": 6}, threshold=0.0), "gradmax")):
        module = Module()
        calls.clear()
        callback = GrowthCallback(schedule, init=init, closure=closure_of, bias=0.1)
        if isinstance(schedule, GradientTrigger):
            callback = GrowthCallback(schedule, closure=closure_of)
        pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False,
                   callbacks=[callback]).fit(module, data)
        assert module.wiring.width("h") == 6, (type(schedule).__name__, calls, getattr(schedule, "history", None))
        assert calls  # the closure ran at the growths


# ---- several widths at once: one pass of the closure --------------------------------------
from growdense.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from grow_helpers import TinyEncoder, assert_same, reference_forward, snapshot  # noqa: E402


def _encoder(seed=0):
    torch.manual_seed(seed)
    model = TinyEncoder(d_in=6, h1=4, h2=3, latent=2, cap1=9, cap2=8, dtype=D)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(30, 6, generator=g, dtype=D)
    t = torch.randn(30, 4, generator=g, dtype=D)
    return model, x, t


def _encoder_M(model, x, t):
    """M of h1 and h2 by plain float64 autograd on hand-written pre-activations (no hooks)."""
    def lin(layer, v):
        return F.linear(v, layer.weight[: layer.out_features, : layer.in_features].detach(),
                        layer.bias[: layer.out_features].detach())

    h1 = F.relu(lin(model.enc1, x))
    z2 = lin(model.enc2, h1).requires_grad_(True)  # h1's consumer's pre-activation
    h2 = F.relu(z2)
    zm, zl = lin(model.mu, h2), lin(model.logvar, h2)  # the heads' pre-activations (linear)
    loss = F.mse_loss(torch.cat([zm, zl], -1), t)
    d2, dm, dl = torch.autograd.grad(loss, (z2, zm, zl))
    return {"h1": d2.T @ x, "h2": torch.cat([dm, dl], 1).T @ h1}


def _projector(cols):
    q, _ = torch.linalg.qr(cols)
    return q @ q.T


def test_grow_many_gradmax_takes_every_width_from_one_pass():
    model, x, t = _encoder()
    wiring = model.wiring()
    M = _encoder_M(model, x, t)
    out_before = reference_forward(model, x).detach()
    calls = []

    def closure():
        calls.append(1)
        return F.mse_loss(model(x), t)

    wiring.grow_many({"h1": 2, "h2": 3}, init="gradmax", closure=closure, bias=0.1)
    assert len(calls) == 1  # one pass for both widths (growing one after the other takes two)
    assert wiring.widths() == {"h1": 6, "h2": 6}
    # h1: the new columns of enc2 over its rows from before the event (3) span the top-2 left
    # singular directions of M1 (independent float64 SVD; projectors agree to 1e-8)
    U1 = torch.linalg.svd(M["h1"]).U
    torch.testing.assert_close(_projector(model.enc2.weight[:3, 4:6]), U1[:, :2] @ U1[:, :2].T, rtol=0, atol=1e-8)
    # h2: the heads' new columns, stacked, span the top-3 of M2
    U2 = torch.linalg.svd(M["h2"]).U
    cols = torch.cat([model.mu.weight[:2, 3:6], model.logvar.weight[:2, 3:6]], 0)
    torch.testing.assert_close(_projector(cols), U2[:, :3] @ U2[:, :3].T, rtol=0, atol=1e-8)
    # new incoming weights zero, biases 0.1; the block joining new h1 and new h2 units zero
    assert torch.all(model.enc1.weight[4:6] == 0) and torch.all(model.enc1.bias[4:6] == 0.1)
    assert torch.all(model.enc2.weight[3:6] == 0) and torch.all(model.enc2.bias[3:6] == 0.1)
    # the function is unchanged: the consumers' biases compensate (float64 rounding only)
    torch.testing.assert_close(reference_forward(model, x).detach(), out_before, rtol=0, atol=1e-12)


def test_schedule_event_grows_with_one_pass_and_a_failing_closure_changes_nothing():
    model, x, t = _encoder()
    wiring = model.wiring()
    schedule = GrowthSchedule({"h1": 4, "h2": 3}, [GrowthEvent(1, grow_by={"h1": 2, "h2": 2})])
    before = snapshot(model)

    def broken():
        F.mse_loss(model(x), t)
        raise KeyError("no data")

    with pytest.raises(KeyError):
        schedule.apply(1, wiring, init="gradmax", closure=broken)
    assert_same(snapshot(model), before)
    assert wiring.widths() == {"h1": 4, "h2": 3}
    calls = []

    def closure():
        calls.append(1)
        return F.mse_loss(model(x), t)

    assert schedule.apply(1, wiring, init="gradmax", closure=closure, bias=0.1)
    assert len(calls) == 1 and wiring.widths() == {"h1": 6, "h2": 5}
    # the options are checked before anything changes
    other, _, _ = _encoder()
    w2 = other.wiring()
    snap = snapshot(other)
    with pytest.raises(TypeError, match="unexpected option"):
        schedule.apply(1, w2, init="gradmax", closure=closure, lr=0.1)
    with pytest.raises(ValueError, match="bias"):
        schedule.apply(1, w2, init="gradmax", closure=closure, bias=-1.0)
    assert_same(snapshot(other), snap)


def test_checkpoint_round_trip_after_gradmax_growth(tmp_path):
    from growdense.optim import Adam

    def run(stop_after=None, path=None, resume_from=None):
        model, x, t = _encoder()
        optimizer = Adam(model.parameters(), lr=1e-2)
        wiring = model.wiring(optimizer)
        schedule = GrowthSchedule({"h1": 4, "h2": 3}, [GrowthEvent(2, grow_by={"h1": 3, "h2": 2})])
        start = 0
        if resume_from is not None:
            start = load_checkpoint(resume_from, model, optimizer, wiring=wiring)["epoch"]
        losses = []
        for epoch in range(start, 5):
            closure = lambda: F.mse_loss(model(x), t)  # noqa: E731
            schedule.apply(epoch, wiring, init="gradmax", closure=closure, bias=0.1)
            for batch in range(2):
                optimizer.zero_grad()
                loss = F.mse_loss(model(x[batch::2]), t[batch::2])
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
            if epoch == stop_after:
                save_checkpoint(path, model, optimizer, wiring=wiring, extra={"epoch": epoch + 1})
                return losses, None
        return losses, snapshot(model, optimizer)

    full, end = run()
    path = tmp_path / "gradmax.pt"
    first, _ = run(stop_after=2, path=path)  # right after the GradMax growth and an epoch on it
    assert torch.equal(torch.stack(first), torch.stack(full[:6]))
    resumed, end2 = run(resume_from=path)
    assert torch.equal(torch.stack(resumed), torch.stack(full[6:]))  # bit-exact
    assert_same(end2, end)


def test_grow_many_without_apply_many_is_grow_per_width_and_validates_all_first():
    a, _, _ = _encoder()
    b, _, _ = _encoder()
    wa, wb = a.wiring(), b.wiring()
    wa.grow_many({"h1": 2, "h2": 3}, init="he", generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    wb.grow("h1", 2, init="he", generator=g)
    wb.grow("h2", 3, init="he", generator=g)
    assert_same(snapshot(a), snapshot(b))  # the same draws in the same order: bit-identical
    c, x, t = _encoder()
    wc = c.wiring()
    snap = snapshot(c)
    for init, options in (("he", {}), ("gradmax", {"closure": lambda: F.mse_loss(c(x), t)})):
        with pytest.raises(ValueError, match="capacity"):  # h2's capacity is 8: checked before h1 grows
            wc.grow_many({"h1": 2, "h2": 6}, init=init, **options)
        assert_same(snapshot(c), snap)
    with pytest.raises(TypeError, match="mapping"):
        wc.grow_many([("h1", 2)])
