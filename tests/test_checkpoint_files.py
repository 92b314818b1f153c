"""Checkpoints are read like model files: a crafted or damaged one is refused with one error that
names the file and the field, instead of resuming silently into a different run. Each case
edits one thing in a real checkpoint."""

import json
import tracemalloc

import numpy as np
import pytest
from conftest import ctrl_c_at_step

from fastcnn import BatchNorm1D, Conv2D, ConvNet, Dense, Dropout, Flatten, MaxPool2D, ReLU, optim
from fastcnn.checkpoint import read
from fastcnn.training import load_checkpoint


def small_net(seed=1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return ConvNet([Conv2D(1, 4, 3, rng=rng, dtype=dtype), ReLU(), MaxPool2D(2), Flatten(),
                    Dense(4 * 4 * 4, 16, rng=rng, dtype=dtype), BatchNorm1D(16, dtype=dtype),
                    ReLU(), Dropout(0.3, rng=rng), Dense(16, 5, rng=rng, dtype=dtype)],
                   input_shape=(1, 8, 8))


def data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (70, 1, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 5, 70)
    return x, y, (x[:20], y[:20])


def adam_run():  # after 2 of 4 epochs: Adam's moments, a schedule, early stopping's best
    return {"optimizer": optim.AdamW(3e-3),
            "schedule": optim.WarmupThen(5, optim.Cosine(20, per="batch")),
            "early_stopping": 3}


def momentum_run():  # Ctrl-C mid-epoch: SGD's velocity and the epoch's order
    return {"optimizer": optim.SGD(0.05, momentum=0.9, nesterov=True)}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{"adam": path, "momentum": path}: real checkpoints, written once for all cases."""
    folder = tmp_path_factory.mktemp("checkpoints")
    x, y, val = data()
    small_net().fit(x, y, epochs=2, batch_size=8, seed=3, validation_data=val,
                    checkpoint=folder / "adam.npz", verbose=False, **adam_run())
    net = small_net()
    net.gradient_hook = ctrl_c_at_step(13)  # epoch 2, batch 4 (9 batches an epoch)
    with pytest.raises(KeyboardInterrupt):
        net.fit(x, y, epochs=4, batch_size=8, seed=3, checkpoint=folder / "momentum.npz",
                verbose=False, **momentum_run())
    return {"adam": folder / "adam.npz", "momentum": folder / "momentum.npz"}


def edit(source, target, record=None, members=None, compressed=False):
    """A copy of checkpoint ``source`` at ``target``, its record and members changed in place
    by ``record(dict)`` and ``members(dict)``."""
    with np.load(source) as z:
        arrays = {k: z[k] for k in z.files}
    arch = json.loads(arrays["architecture"].tobytes())
    if record is not None:
        record(arch["checkpoint"])
    arrays["architecture"] = np.frombuffer(json.dumps(arch).encode(), np.uint8)
    if members is not None:
        members(arrays)
    (np.savez_compressed if compressed else np.savez)(target, **arrays)
    return target


def resume(path, kind, net=None, **kw):
    x, y, val = data()
    net = net or small_net(7)
    return net.fit(x, y, epochs=4, batch_size=8, validation_data=val, resume=path,
                   verbose=False, **kw)


def setitem(key, value):
    return lambda d: d.__setitem__(key, value)


def at(path, value):
    """Set a nested field, path "a.b.c"."""
    def change(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return change


def poke(member, index, value):
    def change(arrays):
        arrays[member] = arrays[member].copy()
        arrays[member][index] = value
    return change


def drop(*prefixes):
    def change(arrays):
        for key in [k for k in arrays if k.startswith(prefixes)]:
            del arrays[key]
    return change


W = "optimizer.layer0.weight"
# (checkpoint, what is changed, record edit, members edit, the message names)
CASES = [
    ("adam", "Adam's v = inf", None, poke(f"{W}.v", (0, 0, 0, 0), np.inf),
     rf"{W}.v holds 1 NaN or infinite values"),
    ("adam", "NaN in Adam's m", None, poke(f"{W}.m", (0, 0, 0, 0), np.nan),
     rf"{W}.m holds 1 NaN"),
    ("adam", "a moment of another shape", None, setitem(f"{W}.m", np.zeros(3, np.float32)),
     rf"{W}.m is float32\(3,\), the checkpoint record says float32\(4, 1, 3, 3\)"),
    ("adam", "a moment of another dtype", None,
     lambda a: a.__setitem__(f"{W}.v", a[f"{W}.v"].astype(np.float64)), rf"{W}.v is float64"),
    ("adam", "every optimizer member missing", None, drop("optimizer."),
     r"lacks 16 arrays that its record calls for, e.g. 'optimizer\.layer0\.weight\.m'"),
    ("adam", "one moment missing", None, drop(f"{W}.v"), rf"lacks 1 arrays .*'{W}.v'"),
    ("adam", "schedule: null", setitem("schedule", None), None, r"schedule is null"),
    ("adam", "another schedule", setitem("schedule", {"type": "Cosine", "total": 5,
                                                      "min_factor": 0.0, "per": "batch"}),
     None, r"history.lr\[0\] is .* the schedule .* give"),
    ("adam", "epoch 10", setitem("epoch", 10), None, r"epoch must be an int in \[0, 2\]"),
    ("adam", "epoch -1", setitem("epoch", -1), None, r"epoch must be an int in \[0, 2\]"),
    ("adam", "batch 100", setitem("batch", 100), None, r"batch must be an int in \[0, 8\]"),
    ("adam", "steps -100", setitem("steps", -100), None, r"steps must be an int >= 0"),
    ("adam", "steps off by one", setitem("steps", 17), None,
     r"steps is 17, but 2 epochs of 9 batches and 0 more make 18"),
    ("adam", "stopped_early: true", setitem("stopped_early", True), None,
     r"stopped_early is true"),
    ("adam", "the divergence watch's start NaN", at("watch.start", float("nan")), None,
     r"watch.start must be a finite number"),
    ("adam", "best weights NaN", None, poke("best.layer0.weight", (0, 0, 0, 0), np.nan),
     r"best.layer0.weight holds 1 NaN"),
    ("adam", "best weights of shape (1,)", None,
     setitem("best.layer0.weight", np.zeros(1, np.float32)),
     r"best.layer0.weight is float32\(1,\)"),
    ("adam", "best of another epoch", at("best.epoch", 7), None,
     r"best.epoch must be an int in \[1, 2\]"),
    ("adam", "a best loss the history does not have", at("best.loss", 0.001), None,
     r"best.loss is 0.001, but the history's validation loss of epoch"),
    ("adam", "a patience run out without stopping",
     lambda r: (r.update(patience=1), r["best"].update(epoch=1, loss=r["history"]["val_loss"][0])),
     None,
     r"stopped_early is false, but the validation loss has not improved for 1 epochs"),
    ("adam", "no optimizer record", lambda r: r.pop("optimizer"), None,
     r"its checkpoint record lacks optimizer"),
    ("adam", "no steps", lambda r: r.pop("steps"), None, r"its checkpoint record lacks steps"),
    ("adam", "no data", lambda r: r.pop("data"), None, r"its checkpoint record lacks data"),
    ("adam", "no partial seconds", lambda r: r["partial"].pop("seconds"), None,
     r"has no partial.seconds"),
    ("adam", "Adam's settings on SGD", at("optimizer.type", "SGD"), None,
     r"optimizer: the hyperparameters of SGD are lr, momentum, nesterov, weight_decay; got"),
    ("adam", "an unknown optimizer", at("optimizer.type", "Lion"), None,
     r"optimizer: unknown optimizer 'Lion'"),
    ("adam", "another generator", at("rng.bit_generator", "MT19937"), None,
     r"rng must be the state of a PCG64 generator"),
    ("adam", "a generator state that is not one", at("rng.state", "x"), None, r"rng: "),
    ("adam", "a generator for a layer without one", at("layer_rngs.5", {}), None,
     r"layer_rngs names layers \['5', '7'\]"),
    ("adam", "history lists of different lengths", lambda r: r["history"]["loss"].pop(), None,
     r"history.loss has 1 entries, 2 expected"),
    ("adam", "a NaN loss in the history", lambda r: r["history"]["val_loss"].__setitem__(
        0, float("nan")), None, r"history.val_loss\[0\] must be a finite number"),
    ("adam", "a string for a number", setitem("batch_size", "8"), None,
     r"batch_size must be an int >= 1, got '8'"),
    ("adam", "an unknown field", setitem("hack", 1), None, r"unknown fields \['hack'\]"),
    ("adam", "an order after the last epoch", None, setitem("order", np.arange(70)),
     r"a member the checkpoint record does not call for: 'order.npy'"),
    ("adam", "a member nobody asked for", None, setitem("extra", np.zeros(2)),
     r"a member the checkpoint record does not call for: 'extra.npy'"),
    ("momentum", "an order of zeros mid-epoch", None, setitem("order", np.zeros(70, np.int64)),
     r"order is not a permutation"),
    ("momentum", "no order mid-epoch", None, drop("order"), r"lacks 1 arrays .*'order'"),
    ("momentum", "SGD's velocity dropped", None, drop("optimizer."),
     r"lacks 8 arrays .*'optimizer\.layer0\.weight\.velocity'"),
    ("momentum", "the images seen mid-epoch", at("partial.seen", 40), None,
     r"partial.seen is 40, but 4 batches of 8 images make 32"),
    ("momentum", "more right than seen", at("partial.correct", 33), None,
     r"partial.correct must be an int in \[0, 32\], got 33"),
    ("momentum", "a rate without a schedule that changed", at("optimizer.lr", 0.5), None,
     r"history.lr\[0\] is 0.05 and optimizer.lr 0.5, but schedule is null"),
]


@pytest.mark.parametrize("kind, what, record, members, message", CASES,
                         ids=[c[1] for c in CASES])
def test_a_changed_checkpoint_is_refused_naming_the_file_and_the_field(
        written, tmp_path, kind, what, record, members, message):
    path = edit(written[kind], tmp_path / "changed.npz", record, members)
    with pytest.raises(ValueError, match=rf"changed.npz is not a valid fastcnn checkpoint: "
                                         rf".*{message}"):
        resume(path, kind)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(ConvNet, path)


@pytest.mark.parametrize("kind", ["adam", "momentum"])
def test_an_unchanged_copy_resumes(written, tmp_path, kind):
    """The cases above edit real checkpoints: the same copy, unedited, is accepted."""
    path = edit(written[kind], tmp_path / "copy.npz")
    history = resume(path, kind)
    assert len(history["loss"]) == 4


def test_a_deflate_bomb_is_refused_before_it_is_inflated(written, tmp_path):
    """A small file with a deflated member that would expand to 160 MB: its header is checked
    against the parameter's shape before anything is read."""
    path = edit(written["adam"], tmp_path / "bomb.npz",
                members=setitem(f"{W}.m", np.zeros(40_000_000, np.float32)), compressed=True)
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"{W}.m is float32\(40000000,\)"):
            read(ConvNet, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000


def test_a_float64_network_does_not_resume_from_a_float32_checkpoint(written):
    with pytest.raises(ValueError, match="holds a float32 network and this one is float64"):
        resume(written["adam"], "adam", net=small_net(7, np.float64))


def test_early_stopping_resumes_with_validation_data_only(written):
    x, y, _ = data()
    with pytest.raises(ValueError, match="early stopping: resume it with validation_data"):
        small_net(7).fit(x, y, epochs=4, batch_size=8, resume=written["adam"], verbose=False)


def test_a_model_file_is_not_a_checkpoint(tmp_path):
    small_net().save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="m.npz is not a valid fastcnn checkpoint: it is a model "
                                         "file"):
        resume(tmp_path / "m.npz", "adam")
