"""Optimizers and schedules: torch.optim's formulas on every backend, modes, and fit's seams."""

import numpy as np
import pytest

from fastcnn import ConvNet, Dense, Flatten, optim
from fastcnn.models import simple_cnn


class FakeNet:
    """Just the parameter walk an optimizer uses."""

    def __init__(self, params):
        self.params = params
        self.grads = {k: None for k in params}

    def parameters(self):
        for name, p in self.params.items():
            yield name, p, self.grads[name]


OPTIMIZERS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("name, kwargs", OPTIMIZERS)
def test_optimizers_match_torch_over_several_steps(backend_name, rng, name, kwargs):
    torch = pytest.importorskip("torch")
    shapes = {"layer0.weight": (4, 3, 3, 3), "layer0.bias": (4,), "layer2.weight": (5, 7)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    ours = getattr(optim, name)(**kwargs)
    theirs = getattr(torch.optim, name)(list(tparams.values()), **kwargs)
    net = FakeNet(params)
    for _ in range(5):
        grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
        net.grads = grads
        ours.step(net)
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        theirs.step()
    for k, t in tparams.items():
        np.testing.assert_allclose(params[k], t.detach().numpy(), rtol=1e-10, atol=1e-12,
                                   err_msg=k)
    assert ours.steps == 5


def test_plain_sgd_is_still_the_seeds_update(rng):
    p = rng.standard_normal(6)
    g = rng.standard_normal(6)
    expected = p - 0.05 * g
    net = FakeNet({"layer0.weight": p})
    net.grads = {"layer0.weight": g}
    optim.SGD(0.05).step(net)
    np.testing.assert_allclose(p, expected, rtol=1e-15)
    assert optim.SGD(0.05).state == {}


@pytest.mark.parametrize("bad", [
    lambda: optim.SGD(lr=0), lambda: optim.SGD(momentum=1.0), lambda: optim.SGD(momentum=-0.1),
    lambda: optim.SGD(nesterov=True), lambda: optim.SGD(weight_decay=-1),
    lambda: optim.Adam(betas=(1.0, 0.9)), lambda: optim.Adam(betas=0.9),
    lambda: optim.Adam(eps=float("nan")), lambda: optim.AdamW(lr=True)])
def test_bad_hyperparameters_are_named(bad):
    with pytest.raises(ValueError, match="lr|momentum|nesterov|weight_decay|beta|eps"):
        bad()


@pytest.mark.parametrize("make, error, message", [
    # a string is not a bool: "no" would have turned Nesterov on
    (lambda: optim.SGD(momentum=0.9, nesterov="no"), TypeError,
     "nesterov must be True or False, got 'no'"),
    (lambda: optim.SGD(momentum=0.9, nesterov=1), TypeError, "nesterov must be True or False"),
    # eps divides: 0 gave ZeroDivisionError on numba and "diverged" on the others
    (lambda: optim.Adam(eps=0), ValueError, "eps must be a positive finite number, got 0"),
    (lambda: optim.AdamW(eps=-1e-8), ValueError, "eps must be a positive finite number"),
    # a warm-up rises to the rate: torch's LinearLR refuses a start above 1 too
    (lambda: optim.LinearWarmup(5, start_factor=3), ValueError,
     r"start_factor must be <= 1.0, got 3"),
    (lambda: optim.WarmupThen(3, "cosine"), TypeError,
     "then must be a fastcnn.optim schedule, e.g. optim.Cosine"),
    (lambda: optim.StepDecay(1.5), TypeError, "step_size must be an int, got 1.5"),
    (lambda: optim.Cosine(0), ValueError, "total must be >= 1, got 0"),
])
def test_settings_that_would_train_otherwise_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()
    assert optim.SGD(momentum=0.9, nesterov=np.True_).nesterov is True
    assert optim.LinearWarmup(5, start_factor=1).factor(0) == 1.0


def test_state_dict_round_trip_continues_identically(rng):
    shapes = {"layer0.weight": (3, 4), "layer1.bias": (4,)}
    start = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(6)]

    def run(split):
        params = {k: v.copy() for k, v in start.items()}
        net = FakeNet(params)
        opt = optim.AdamW(lr=0.01)
        for i, g in enumerate(grads):
            if i == split:
                record, arrays = opt.state_dict()
                opt = optim.optimizer_from_record(record)
                opt.load_state_dict(record, {k: v.copy() for k, v in arrays.items()})
            net.grads = g
            opt.step(net)
        return params

    straight, resumed = run(None), run(3)
    for k in shapes:
        np.testing.assert_array_equal(straight[k], resumed[k])


# -- schedules against torch.optim.lr_scheduler --------------------------------------------------


def torch_lrs(make, steps):
    torch = pytest.importorskip("torch")
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.5)
    sched = make(torch.optim.lr_scheduler, opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


# torch's cosine goes back up after T_max; ours stays at its floor, so compare up to T_max
@pytest.mark.parametrize("ours, theirs, steps", [
    (optim.StepDecay(3, 0.5), lambda s, o: s.StepLR(o, step_size=3, gamma=0.5), 14),
    (optim.Cosine(10), lambda s, o: s.CosineAnnealingLR(o, T_max=10), 11),
    (optim.Cosine(7, min_factor=0.1), lambda s, o: s.CosineAnnealingLR(o, T_max=7, eta_min=0.05),
     8),
    (optim.LinearWarmup(5, 0.2), lambda s, o: s.LinearLR(o, start_factor=0.2, total_iters=5), 14),
    (optim.WarmupThen(4, optim.Cosine(8), 0.25),
     lambda s, o: s.SequentialLR(o, [s.LinearLR(o, start_factor=0.25, total_iters=4),
                                     s.CosineAnnealingLR(o, T_max=8)], milestones=[4]), 13),
])
def test_schedules_match_torch(ours, theirs, steps):
    want = torch_lrs(theirs, steps)
    got = [0.5 * ours.factor(t) for t in range(steps)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_cosine_stays_at_its_floor_after_its_length():
    assert optim.Cosine(5, 0.1).factor(5) == optim.Cosine(5, 0.1).factor(50) == pytest.approx(0.1)


def test_schedules_round_trip_through_their_config():
    for s in (optim.StepDecay(2, 0.3, per="batch"), optim.Cosine(9, 0.2),
              optim.WarmupThen(3, optim.StepDecay(4)), optim.Constant()):
        back = optim.schedule_from_config({"type": type(s).__name__, **s.config()})
        assert [back.factor(t) for t in range(20)] == [s.factor(t) for t in range(20)]
        assert back.per == s.per


# -- fit's seams -------------------------------------------------------------------------------


def tiny(rng, n=60):
    return rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def test_fit_with_adam_and_a_schedule_records_the_learning_rate(rng):
    x, y = tiny(rng)
    net = simple_cnn(seed=0)
    opt = optim.Adam(lr=1e-3)
    history = net.fit(x, y, epochs=4, batch_size=10, optimizer=opt,
                      schedule=optim.StepDecay(2, 0.1), seed=0)
    np.testing.assert_allclose(history["lr"], [1e-3, 1e-3, 1e-4, 1e-4])
    assert history["loss"][-1] < history["loss"][0]
    assert opt.steps == 24 and len(opt.state) == 4


def test_a_per_batch_schedule_moves_every_batch(rng):
    x, y = tiny(rng, 30)
    net = simple_cnn(seed=0)
    seen = []
    opt = optim.SGD(0.1)
    step = net.train_step
    net.train_step = lambda xb, yb, o: (seen.append(o.lr), step(xb, yb, o))[1]
    net.fit(x, y, epochs=2, batch_size=10, optimizer=opt,
            schedule=optim.LinearWarmup(4, 0.2, per="batch"))
    np.testing.assert_allclose(seen, [0.02, 0.04, 0.06, 0.08, 0.1, 0.1])


def test_fit_refuses_two_learning_rates_and_foreign_optimizers(rng):
    x, y = tiny(rng, 10)
    net = simple_cnn(seed=0)
    with pytest.raises(ValueError, match="give the learning rate to the optimizer"):
        net.fit(x, y, lr=0.1, optimizer=optim.SGD(0.1))
    with pytest.raises(TypeError, match="fastcnn.optim optimizer"):
        net.fit(x, y, optimizer="adam")
    with pytest.raises(TypeError, match="fastcnn.optim schedule"):
        net.fit(x, y, schedule=lambda t: 1.0)


def test_modes_and_the_parameter_walk():
    net = ConvNet([Flatten(), Dense(4, 3, rng=0)], input_shape=(1, 2, 2))
    assert net.training
    assert net.eval() is net and not net.training
    assert [name for name, _, _ in net.parameters()] == ["layer1.weight", "layer1.bias"]
    net.train()
    with net.mode(False):
        assert not any(layer.training for layer in net.layers)
    assert all(layer.training for layer in net.layers)
    net.predict(np.zeros((2, 1, 2, 2), np.float32))
    assert net.training  # predicting infers, and leaves the mode as it was
