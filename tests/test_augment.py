"""Augmentation on the fly: what it does to an image, that it is seeded like the shuffle, and
that a resumed run (after an epoch or a mid-epoch Ctrl-C) continues exactly."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ctrl_c_at_step

from fastcnn import Conv2D, ConvNet, Dense, Flatten, ReLU
from fastcnn.augment import Augment


@pytest.mark.parametrize("spec, want", [
    ("crop", Augment(4, False)), ("crop=2", Augment(2, False)), ("flip", Augment(0, True)),
    ("crop,flip", Augment(4, True)), (" flip , crop=1 ", Augment(1, True)), ("none", None),
    (None, None), ("crop=0", None)])
def test_specs(spec, want):
    assert Augment.parse(spec) == want


@pytest.mark.parametrize("spec, match", [("rotate", "unknown 'rotate'"),
                                         ("crop=x", "not a whole number"),
                                         ("crop=-1", ">= 0"), ("flip=1", "unknown")])
def test_bad_specs_say_what_is_expected(spec, match):
    with pytest.raises(ValueError, match=match):
        Augment.parse(spec)


def test_crops_move_the_image_and_fill_with_zeros(rng):
    x = rng.random((64, 2, 6, 7)).astype(np.float32) + 1  # no zeros of its own
    out = Augment(crop=2).apply(x, np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    moved = 0
    for i in range(len(x)):
        found = None
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                want = np.zeros_like(x[i])
                src = x[i][:, max(dy, 0) : 6 + min(dy, 0), max(dx, 0) : 7 + min(dx, 0)]
                want[:, max(-dy, 0) : 6 + min(-dy, 0), max(-dx, 0) : 7 + min(-dx, 0)] = src
                if np.array_equal(out[i], want):
                    found = (dy, dx)
        assert found is not None, i  # every image is its own, translated by at most 2
        moved += found != (0, 0)
    assert moved > 40  # 24 of 25 moves are not the identity


def test_flips_mirror_about_half_the_images(rng):
    x = rng.random((200, 3, 4, 5)).astype(np.float32)
    out = Augment(flip=True).apply(x, np.random.default_rng(1))
    mirrored = [np.array_equal(out[i], x[i, :, :, ::-1]) for i in range(len(x))]
    kept = [np.array_equal(out[i], x[i]) for i in range(len(x))]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 70 < sum(mirrored) < 130


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_crop_and_flip_together_are_a_crop_of_the_padded_mirror_image(rng, dtype):
    # the formula written with padding, unlike the kernel: pad, mirror, then take a window
    x = rng.random((40, 3, 5, 8)).astype(dtype) + 1
    out = Augment(crop=3, flip=True).apply(x, np.random.default_rng(2))
    assert out.dtype == dtype
    padded = np.pad(x, ((0, 0), (0, 0), (3, 3), (3, 3)))
    kinds = set()
    for i in range(len(x)):
        windows = {(dy, dx, m): (padded[i, :, :, ::-1] if m else padded[i])[
            :, 3 + dy : 3 + dy + 5, 3 + dx : 3 + dx + 8]
            for dy in range(-3, 4) for dx in range(-3, 4) for m in (False, True)}
        found = [key for key, w in windows.items() if np.array_equal(out[i], w)]
        assert found, i
        kinds.add(found[0][2])
    assert kinds == {False, True}


def test_batches_made_ahead_on_the_thread_equal_those_made_in_turn(rng):
    from fastcnn.training import _BatchMaker

    class Run:  # what the batch maker reads of a Trainer
        x = (rng.random((30, 1, 6, 6)) * 255).astype(np.uint8)
        net = ConvNet([Flatten(), Dense(36, 2)], input_shape=(1, 6, 6))
        augment, augment_key = Augment(2, True), 12345
        dp = type("Rank", (), {"rank": 0})()

    order = rng.permutation(30)
    ahead, inline = _BatchMaker(Run, 10), _BatchMaker(Run, 10)
    try:
        for b in range(3):
            idx = order[10 * b : 10 * b + 10]
            nxt = order[10 * b + 10 : 10 * b + 20] if b < 2 else None
            want = inline.get(1, b, idx).copy()
            np.testing.assert_array_equal(ahead.get(1, b, idx, nxt), want)
            assert not np.array_equal(want, Run.net.prepare_batch(Run.x, idx))  # augmented
        # a batch asked for out of turn (a resumed epoch) is made then, the same
        np.testing.assert_array_equal(ahead.get(1, 0, order[:10]), inline.get(1, 0, order[:10]))
    finally:
        ahead.close()
        inline.close()


def test_a_crop_as_large_as_the_image_is_refused(rng):
    net = ConvNet([Flatten(), Dense(16, 2, rng=rng)], input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="crop=4 moves 4x4 images by their whole size"):
        net.fit(rng.random((4, 1, 4, 4)), rng.integers(0, 2, 4), augment="crop", verbose=False)


def small(seed=0):
    r = np.random.default_rng(seed)
    return ConvNet([Conv2D(1, 3, 3, rng=r), ReLU(), Flatten(), Dense(3 * 64, 4, rng=r)],
                   input_shape=(1, 8, 8))


def weights(net):
    return [p.copy() for _, p, _ in net.parameters()]


def test_the_same_seed_gives_the_same_weights_and_augmenting_changes_them(rng):
    x, y = rng.random((40, 1, 8, 8)).astype(np.float32), rng.integers(0, 4, 40)
    runs = {}
    for name, augment, seed in (("a", "crop,flip", 1), ("b", "crop,flip", 1),
                                ("c", "crop,flip", 2), ("plain", None, 1)):
        net = small()
        net.fit(x, y, epochs=2, batch_size=8, seed=seed, augment=augment, verbose=False)
        runs[name] = weights(net)
    for a, b in zip(runs["a"], runs["b"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, c) for a, c in zip(runs["a"], runs["c"], strict=True))
    assert not all(np.array_equal(a, p) for a, p in zip(runs["a"], runs["plain"], strict=True))


def test_resuming_an_augmented_run_continues_exactly(tmp_path, rng):
    """After a whole epoch, and after a Ctrl-C in the middle of one."""
    x, y = rng.random((40, 1, 8, 8)).astype(np.float32), rng.integers(0, 4, 40)
    whole = small()
    whole.fit(x, y, epochs=3, batch_size=8, seed=5, augment="crop=2,flip", verbose=False)
    ck = tmp_path / "ck.npz"
    net = small()
    net.gradient_hook = ctrl_c_at_step(7)  # epoch 2, batch 2 (5 batches an epoch)
    with pytest.raises(KeyboardInterrupt):
        net.fit(x, y, epochs=3, batch_size=8, seed=5, augment="crop=2,flip", checkpoint=ck,
                verbose=False)
    resumed = small()
    resumed.fit(x, y, epochs=3, batch_size=8, resume=ck, verbose=False)  # augment: the file's
    for a, b in zip(weights(whole), weights(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="augment='crop=2,flip'; resume it with the same"):
        small().fit(x, y, epochs=3, batch_size=8, resume=ck, augment="flip", verbose=False)


def test_a_checkpoint_with_a_bad_augment_record_is_refused(tmp_path, rng):
    from fastcnn.training import load_checkpoint

    x, y = rng.random((16, 1, 8, 8)).astype(np.float32), rng.integers(0, 4, 16)
    ck = tmp_path / "ck.npz"
    small().fit(x, y, epochs=1, batch_size=8, seed=1, augment="flip", checkpoint=ck,
                verbose=False)
    for change, match in ((lambda a: a.update(spec="twirl"), "augment.spec"),
                          (lambda a: a.update(key=-1), "augment.key"),
                          (lambda a: a.pop("key"), "augment must hold")):
        with np.load(ck) as z:
            arrays = {k: z[k] for k in z.files}
        arch = json.loads(arrays["architecture"].tobytes())
        change(arch["checkpoint"]["augment"])
        arrays["architecture"] = np.frombuffer(json.dumps(arch).encode(), np.uint8)
        bad = tmp_path / "bad.npz"
        np.savez(bad, **arrays)
        with pytest.raises(ValueError, match=match):
            load_checkpoint(ConvNet, bad)


def test_the_cli_trains_with_augmentation_and_refuses_a_bad_spec(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fastcnn.cli", "train", "--augment", "crop=2",
                          "--epochs", "1", "--limit", "300", "--test-limit", "100"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "test accuracy" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "fastcnn.cli", "train", "--augment", "spin"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown 'spin'" in bad.stderr
