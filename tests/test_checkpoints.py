"""Checkpoints: a run stopped (after an epoch, or by Ctrl-C mid-epoch) and resumed ends with
exactly the weights of the same run left alone; early stopping keeps the best weights."""

import os
import signal

import numpy as np
import pytest
from conftest import ctrl_c_at_step

from fastcnn import (
    BatchNorm1D,
    BatchNorm2D,
    Conv2D,
    ConvNet,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    ReLU,
    optim,
)
from fastcnn.training import load_checkpoint


def net_with_everything(seed):
    rng = np.random.default_rng(seed)
    return ConvNet([Conv2D(1, 4, 3, rng=rng), BatchNorm2D(4), ReLU(), MaxPool2D(2), Flatten(),
                    Dense(4 * 4 * 4, 16, rng=rng), BatchNorm1D(16), ReLU(), Dropout(0.3, rng=rng),
                    Dense(16, 5, rng=rng)], input_shape=(1, 8, 8))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (70, 1, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 5, 70)
    return x, y, (x[:20], y[:20])


# Every optimizer state a checkpoint must carry: Adam's moments and step count, SGD's velocity
# (plain momentum, and Nesterov's with weight decay), with schedules per batch and per epoch.
RECIPES = {
    "adamw-warmup-cosine": lambda: {"optimizer": optim.AdamW(3e-3), "schedule": optim.WarmupThen(
        5, optim.Cosine(20, per="batch"))},
    "sgd-momentum": lambda: {"optimizer": optim.SGD(0.05, momentum=0.9)},
    "sgd-nesterov-step": lambda: {"optimizer": optim.SGD(0.05, momentum=0.9, nesterov=True,
                                                         weight_decay=1e-3),
                                  "schedule": optim.StepDecay(2, 0.5)},
}


@pytest.fixture(params=RECIPES)
def recipe(request):
    """Makes a fresh optimizer and schedule each time it is called."""
    return RECIPES[request.param]


def weights(net):
    return [a.copy() for _, a, _ in net.parameters()] + [b.copy() for _, b in net.buffers()]


def assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def run_whole(data, tmp_path, recipe, epochs=4):
    x, y, val = data
    net = net_with_everything(1)
    history = net.fit(x, y, epochs=epochs, batch_size=8, seed=3, validation_data=val,
                      checkpoint=tmp_path / "whole.npz", **recipe())
    return net, history


def test_resumed_after_an_epoch_ends_with_the_same_weights(data, tmp_path, fast_backend_name,
                                                           recipe):
    whole, history = run_whole(data, tmp_path, recipe)
    x, y, val = data
    first = net_with_everything(1)
    first.fit(x, y, epochs=2, batch_size=8, seed=3, validation_data=val,
              checkpoint=tmp_path / "part.npz", **recipe())
    other = net_with_everything(99)  # other initial weights: everything comes from the file
    resumed = other.fit(x, y, epochs=4, batch_size=8, validation_data=val,
                        resume=tmp_path / "part.npz")
    assert_same(weights(other), weights(whole))
    assert resumed["loss"] == history["loss"] and resumed["lr"] == history["lr"]


def test_ctrl_c_mid_epoch_writes_a_checkpoint_that_resumes_exactly(data, tmp_path, capsys,
                                                                   recipe):
    whole, _ = run_whole(data, tmp_path, recipe)
    x, y, val = data
    net = net_with_everything(1)
    net.gradient_hook = ctrl_c_at_step(13)  # epoch 2, batch 4 (9 batches an epoch)
    with pytest.raises(KeyboardInterrupt):
        net.fit(x, y, epochs=4, batch_size=8, seed=3, validation_data=val,
                checkpoint=tmp_path / "ck.npz", **recipe())
    err = capsys.readouterr().err
    assert f"wrote a checkpoint to {tmp_path / 'ck.npz'} (epoch 2, after batch 4)" in err
    _, state, arrays = load_checkpoint(ConvNet, tmp_path / "ck.npz")
    assert (state["epoch"], state["batch"], state["steps"]) == (1, 4, 13)
    assert "order" in arrays
    other = net_with_everything(5)
    other.fit(x, y, epochs=4, batch_size=8, validation_data=val, resume=tmp_path / "ck.npz")
    assert_same(weights(other), weights(whole))


def test_resume_refuses_other_data_or_another_network(data, tmp_path):
    x, y, val = data
    net_with_everything(1).fit(x, y, epochs=1, batch_size=8, checkpoint=tmp_path / "ck.npz")
    with pytest.raises(ValueError, match="other data"):
        net_with_everything(1).fit(x[:60], y[:60], epochs=2, batch_size=8,
                                   resume=tmp_path / "ck.npz")
    with pytest.raises(ValueError, match="batch_size=8"):
        net_with_everything(1).fit(x, y, epochs=2, batch_size=4, resume=tmp_path / "ck.npz")
    small = ConvNet([Flatten(), Dense(64, 5, rng=0)], input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="another architecture"):
        small.fit(x, y, epochs=2, batch_size=8, resume=tmp_path / "ck.npz")
    net_with_everything(1).save(tmp_path / "model.npz")
    with pytest.raises(ValueError, match="model.npz is not a valid fastcnn checkpoint: it is "
                                         "a model file"):
        net_with_everything(1).fit(x, y, epochs=2, batch_size=8, resume=tmp_path / "model.npz")
    assert ConvNet.load(tmp_path / "ck.npz").num_params() == net_with_everything(0).num_params()


def test_a_checkpoint_is_written_after_every_epoch_atomically(data, tmp_path):
    x, y, _ = data
    net = net_with_everything(1)
    net.fit(x, y, epochs=2, batch_size=8, checkpoint=tmp_path / "ck.npz")
    _, state, _ = load_checkpoint(ConvNet, tmp_path / "ck.npz")
    assert state["epoch"] == 2 and state["batch"] == 0 and len(state["history"]["loss"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]


def test_early_stopping_keeps_the_best_weights(data, tmp_path):
    x, y, val = data
    net = net_with_everything(1)
    kept = {}
    evaluate = net.evaluate

    def scripted(xv, yv, batch_size=64):  # validation losses: best at epoch 2, then worse
        result = evaluate(xv, yv, batch_size)
        epoch = len(kept) + 1
        kept[epoch] = weights(net)
        return {**result, "loss": {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 0.5}[epoch]}

    net.evaluate = scripted
    history = net.fit(x, y, epochs=8, batch_size=8, validation_data=val, early_stopping=2,
                      optimizer=optim.Adam(1e-2))
    assert history["best_epoch"] == 2 and history["stopped_epoch"] == 4
    assert len(history["loss"]) == 4
    assert_same(weights(net), kept[2])
    with pytest.raises(ValueError, match="pass validation_data"):
        net.fit(x, y, early_stopping=2)


def test_ctrl_c_between_epochs_resumes_exactly(data, tmp_path, recipe):
    """Ctrl-C during validation: the next epoch's order is already drawn when the checkpoint
    is written, so it must be saved with it (a resume that drew again would differ)."""
    whole, _ = run_whole(data, tmp_path, recipe)
    x, y, val = data
    net = net_with_everything(1)
    evaluate = net.evaluate
    calls = []

    def interrupt_during_first_validation(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kw)

    net.evaluate = interrupt_during_first_validation
    with pytest.raises(KeyboardInterrupt):
        net.fit(x, y, epochs=4, batch_size=8, seed=3, validation_data=val,
                checkpoint=tmp_path / "ck.npz", **recipe())
    _, state, arrays = load_checkpoint(ConvNet, tmp_path / "ck.npz")
    assert (state["epoch"], state["batch"]) == (1, 0) and "order" in arrays
    other = net_with_everything(2)
    other.fit(x, y, epochs=4, batch_size=8, validation_data=val, resume=tmp_path / "ck.npz")
    assert_same(weights(other), weights(whole))


def test_a_run_whose_last_batch_is_folded_in_resumes_exactly(tmp_path):
    """65 images in batches of 8 leave one: BatchNorm1D trains it with the batch before, so an
    epoch has 8 batches, and a checkpoint says so."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (65, 1, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 5, 65)
    whole = net_with_everything(1)
    whole.fit(x, y, epochs=3, batch_size=8, seed=3, optimizer=optim.Adam(1e-3), verbose=False)
    first = net_with_everything(1)
    history = first.fit(x, y, epochs=1, batch_size=8, seed=3, optimizer=optim.Adam(1e-3),
                        checkpoint=tmp_path / "ck.npz", verbose=False)
    assert len(history["batch_loss"]) == 8
    _, state, _ = load_checkpoint(ConvNet, tmp_path / "ck.npz")
    assert state["batches"] == 8 and state["steps"] == 8
    other = net_with_everything(5)
    other.fit(x, y, epochs=3, batch_size=8, resume=tmp_path / "ck.npz", verbose=False)
    assert_same(weights(other), weights(whole))
