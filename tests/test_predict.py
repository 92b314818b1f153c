"""Predicting your own pictures: the MNIST-style preparation, and `fastcnn predict` on files."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from fastcnn import datasets, models, predict


def synthetic_seven(light_ink_on_dark, size=(120, 90), paper=0.9, ink=0.1):
    """A '7' drawn with thick strokes, off-centre, on a picture of ``size``."""
    h, w = size
    img = np.zeros(size)
    img[20:30, 15:70] = 1  # the bar
    for r in range(30, 100):  # the stem, slanting left as it goes down
        c = 70 - (r - 30) // 2
        img[r, c - 6: c + 4] = 1
    if light_ink_on_dark:
        return 0.05 + 0.9 * img
    return paper - (paper - ink) * img


def test_dark_on_light_and_light_on_dark_give_the_same_input():
    a = predict.to_model_input(synthetic_seven(True))
    b = predict.to_model_input(synthetic_seven(False))
    assert a.shape == (1, 28, 28) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.max() == pytest.approx(1.0) and a.min() == 0.0
    assert a[0, 0].max() == 0 and a[0, -1].max() == 0  # a black border: the digit is inside


def test_the_digit_is_fitted_in_20x20_and_centred_by_its_centre_of_mass():
    x = predict.to_model_input(synthetic_seven(False))[0]
    rows = np.flatnonzero(x.max(axis=1) > 0.05)
    cols = np.flatnonzero(x.max(axis=0) > 0.05)
    assert max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) in (20, 21)  # (+ a blurred edge)
    cy = (x.sum(axis=1) * np.arange(28)).sum() / x.sum()
    cx = (x.sum(axis=0) * np.arange(28)).sum() / x.sum()
    assert abs(cy - 13.5) <= 0.5 and abs(cx - 13.5) <= 0.5


def test_area_resizing_keeps_the_mean_and_is_exact_on_whole_ratios():
    rng = np.random.default_rng(0)
    img = rng.random((60, 40))
    small = predict._resize_area(img, 20, 10)
    assert small.mean() == pytest.approx(img.mean())
    np.testing.assert_allclose(small[0, 0], img[:3, :4].mean())
    np.testing.assert_allclose(predict._resize_area(img, 60, 40), img)


def test_bad_pictures_are_clear_errors():
    with pytest.raises(ValueError, match="no ink"):
        predict.to_model_input(np.full((30, 30), 0.5))
    with pytest.raises(ValueError, match="2-D grey array"):
        predict.to_model_input(np.zeros((3, 30, 30)))
    with pytest.raises(ValueError, match="style must be"):
        predict.to_model_input(synthetic_seven(True), style="photo")
    with pytest.raises(ValueError, match="finite"):
        predict.to_model_input(np.full((30, 30), np.nan))


def test_the_three_styles_differ_and_all_fill_28x28():
    pic = synthetic_seven(False)
    out = {s: predict.to_model_input(pic, style=s) for s in predict.STYLES}
    assert all(v.shape == (1, 28, 28) for v in out.values())
    assert not np.allclose(out["digit"], out["fashion"])
    # fashion: the longer side fills the whole field
    rows = np.flatnonzero(out["fashion"][0].max(axis=1) > 0.05)
    assert rows[-1] - rows[0] + 1 >= 27


needs_pillow = pytest.mark.skipif(importlib.util.find_spec("PIL") is None,
                                  reason="the image extra (Pillow) is not installed")


@pytest.fixture(scope="module")
def model_and_photos(tmp_path_factory):
    """A model trained on mnist-sample, and 'photos' of real test digits: dark pen on grey
    paper, upscaled 8x, off-centre, with noise; PNG and JPEG."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("predict")
    (x, y), (x_test, y_test) = datasets.load("mnist-sample", raw=True)
    net = models.build("simple", seed=0)
    net.fit(x, y, epochs=2, batch_size=10, seed=0, verbose=False)
    net.save(folder / "m.npz")
    rng = np.random.default_rng(0)
    photos = []
    for i in range(12):
        digit = np.kron(x_test[i, 0] / 255, np.ones((8, 8)))
        digit = np.pad(digit, ((30, 50), (60, 20)))
        photo = np.clip(0.85 - 0.7 * digit + rng.normal(0, 0.03, digit.shape), 0, 1)
        path = folder / f"digit{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray((photo * 255).astype(np.uint8)).save(path)
        photos.append(path)
    return folder, net, photos, x_test[:12], y_test[:12]


@needs_pillow
def test_photos_of_digits_get_the_models_answer_on_the_originals(model_and_photos):
    folder, net, photos, x_test, y_test = model_and_photos
    on_originals = net.predict(x_test)
    answers = [predict.top_classes(net, p, top=3)[0][0] for p in photos]
    agree = np.mean(np.array(answers) == on_originals)
    assert agree >= 10 / 12, (answers, on_originals.tolist())
    ranked = predict.top_classes(net, photos[0], top=3)
    assert len(ranked) == 3 and ranked[0][2] >= ranked[1][2] >= ranked[2][2]
    assert sum(p for _, _, p in predict.top_classes(net, photos[0], top=10)) == pytest.approx(1)


@needs_pillow
def test_fastcnn_predict_prints_the_top_classes(model_and_photos):
    folder, net, photos, _, _ = model_and_photos
    run = subprocess.run([sys.executable, "-m", "fastcnn.cli", "predict", "m.npz",
                          photos[0].name, photos[1].name, "--top", "2"],
                         capture_output=True, text=True, timeout=300, cwd=folder)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{photos[0].name}: ")
    assert lines[0].count("%") == 2
    expected = predict.top_classes(net, photos[0], top=1)[0][1]
    assert lines[0].split(": ")[1].startswith(f"{expected} ")


@needs_pillow
def test_unreadable_pictures_are_one_error_line(model_and_photos, tmp_path):
    folder, _, _, _, _ = model_and_photos
    (tmp_path / "notes.png").write_text("not a picture")
    for name, message in [("notes.png", "is not a picture Pillow can read"),
                          ("missing.png", "no picture at")]:
        run = subprocess.run([sys.executable, "-m", "fastcnn.cli", "predict",
                              str(folder / "m.npz"), str(tmp_path / name)],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 1 and message in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1
