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
    out = {s: predict.to_model_input(pic, style=s) for s in predict.INK_STYLES}
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


def a_digit_photo(x_test, i=0):
    """Real test digit ``i`` as a photo in [0, 1]: dark pen on light paper, upscaled 4x."""
    digit = np.kron(x_test[i, 0] / 255, np.ones((4, 4)))
    return np.clip(0.9 - 0.8 * np.pad(digit, 10), 0, 1)


@needs_pillow
@pytest.mark.parametrize("depth", ["png16", "tiff32", "tiff-float"])
def test_deep_grey_pictures_keep_their_grey_levels(model_and_photos, tmp_path, depth):
    """A 16-bit PNG was clipped to two grey levels (it answered '2 57.7%' where the 8-bit
    picture gives '6 99.9%'); 32-bit TIFFs likewise."""
    from PIL import Image

    _, net, _, x_test, _ = model_and_photos
    photo = a_digit_photo(x_test)
    Image.fromarray((photo * 255).round().astype(np.uint8)).save(tmp_path / "eight.png")
    deep = {"png16": ((photo * 65535).round().astype(np.uint16), "png"),
            "tiff32": ((photo * 65535).round().astype(np.int32), "tif"),
            "tiff-float": (photo.astype(np.float32), "tif")}
    array, suffix = deep[depth]
    Image.fromarray(array).save(tmp_path / f"deep.{suffix}")
    gray = predict.read_gray(tmp_path / f"deep.{suffix}")
    assert gray.dtype == np.float32 and len(np.unique(gray)) > 50
    np.testing.assert_allclose(gray, predict.read_gray(tmp_path / "eight.png"), atol=1 / 255)
    assert predict.top_classes(net, tmp_path / f"deep.{suffix}", top=1)[0][0] == \
        predict.top_classes(net, tmp_path / "eight.png", top=1)[0][0]


@needs_pillow
def test_a_photo_is_turned_upright_as_its_exif_says(model_and_photos, tmp_path):
    """A phone stores a portrait photo sideways with an EXIF orientation; it was read sideways
    ('9 99.4%' for an upright 6)."""
    from PIL import Image

    _, _, _, x_test, _ = model_and_photos
    upright = Image.fromarray((a_digit_photo(x_test) * 255).round().astype(np.uint8))
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show it"
    upright.rotate(90, expand=True).save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    got, want = (predict.read_gray(tmp_path / n) for n in ("sideways.jpg", "upright.png"))
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 0.02  # JPEG's loss only


@needs_pillow
def test_huge_pictures_are_refused_before_they_are_decoded(tmp_path):
    """A 38 KB PNG of 3 x 13,000,000 pixels took 13.8 s and 4.7 GB."""
    import zlib


    def png(path, w, h):  # a grey PNG of w x h zeros, written without holding the pixels
        import struct

        def chunk(kind, data):
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        raw = zlib.compress(b"\0" * ((w + 1) * h), 9)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8,
                                                                             0, 0, 0, 0))
                         + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
        return path

    strip = png(tmp_path / "strip.png", 13_000_000, 3)
    assert strip.stat().st_size < 100_000
    with pytest.raises(ValueError, match=r"strip.png is 13000000x3 pixels; fastcnn reads "
                                         r"pictures of at most 25,000,000 pixels and 30,000 on a"):
        predict.read_gray(strip)
    big = png(tmp_path / "big.png", 6_000, 6_000)
    with pytest.raises(ValueError, match="big.png is 6000x6000 pixels"):
        predict.read_gray(big)
    # past Pillow's own bomb limit, which refuses it while opening: the file is named too
    bomb = png(tmp_path / "bomb.png", 20_000, 20_000)
    with pytest.raises(ValueError, match="bomb.png is larger than fastcnn reads .*bomb"):
        predict.read_gray(bomb)


@needs_pillow
def test_a_blank_picture_among_several_is_named(model_and_photos, tmp_path):
    from PIL import Image

    folder, _, photos, _, _ = model_and_photos
    Image.fromarray(np.full((50, 50), 200, np.uint8)).save(tmp_path / "blank.png")
    run = subprocess.run([sys.executable, "-m", "fastcnn.cli", "predict", str(folder / "m.npz"),
                          str(photos[1]), str(tmp_path / "blank.png")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert f"{tmp_path / 'blank.png'}: the picture holds no ink" in run.stderr, run.stderr


def test_a_model_file_says_what_its_classes_are(tmp_path):
    """The dataset and class names travel in the model file: a history file beside it that
    names another dataset made predict answer 'Trouser 93.5%' for a digit."""
    import json

    from fastcnn import ConvNet

    net = models.build("simple")
    net.dataset, net.class_names = "mnist", datasets.class_names("mnist")
    net.save(tmp_path / "m.npz")
    back = ConvNet.load(tmp_path / "m.npz")
    assert back.dataset == "mnist" and back.class_names == datasets.class_names("mnist")
    (tmp_path / "m.history.json").write_text(json.dumps(
        {"format": "fastcnn-history", "epochs": 0, "config": {"dataset": "fashion-mnist"}}))
    image = tmp_path / "seven.npy"
    np.save(image, synthetic_seven(False))
    code = ("import sys, numpy as np; from fastcnn import cli, predict\n"
            "predict.read_gray = lambda p: np.load(p)\n"
            "sys.exit(cli.main(['predict', sys.argv[1], sys.argv[2], '--top', '10']))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.npz"), str(image)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Trouser" not in run.stdout and all(f"{d} " in run.stdout for d in "0123456789")
    simple = models.build("simple")
    simple.save(tmp_path / "plain.npz")
    assert ConvNet.load(tmp_path / "plain.npz").class_names is None  # none given, none made up
    for bad, message in [({"dataset": 5}, "its dataset must be a name"),
                         ({"class_names": ["a", "b"]}, "its class_names must be 10 names")]:
        with np.load(tmp_path / "m.npz") as z:
            arrays = {k: z[k] for k in z.files}
        arch = json.loads(arrays["architecture"].tobytes())
        arch.update(bad)
        arrays["architecture"] = np.frombuffer(json.dumps(arch).encode(), np.uint8)
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(ValueError, match=f"bad.npz is not a valid fastcnn model file: "
                                             f"{message}"):
            ConvNet.load(tmp_path / "bad.npz")


def test_photo_input_scales_the_whole_picture_to_the_models_shape(rng):
    picture = rng.random((64, 48, 3)).astype(np.float32)
    x = predict.photo_input(picture, (3, 32, 32))
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=(1, 2)), picture.mean(axis=(0, 1)), rtol=1e-5)
    grey = predict.photo_input((picture * 255).astype(np.uint8), (1, 16, 16))
    assert grey.shape == (1, 16, 16) and 0 <= grey.min() and grey.max() <= 1
    both = predict.photo_input(picture[:, :, 0], (3, 8, 8))  # grey picture, colour model
    np.testing.assert_array_equal(both[0], both[2])
    with pytest.raises(ValueError, match="1- or 3-channel"):
        predict.photo_input(picture, (2, 8, 8))
    with pytest.raises(ValueError, match="finite floats"):
        predict.photo_input(np.full((4, 4, 3), np.nan), (3, 8, 8))


@needs_pillow
def test_fastcnn_predict_on_a_colour_model_reads_the_photo_in_colour(tmp_path, rng):
    """A 3x32x32 model (CIFAR-10's shape) gets the picture scaled whole, in colour; a red
    picture and a blue one are told apart by a model that learned to."""
    from PIL import Image

    x = np.zeros((60, 3, 32, 32), np.uint8)
    y = np.arange(60) % 2
    x[y == 0, 0] = 220  # class 0: red
    x[y == 1, 2] = 220  # class 1: blue
    net = models.build("simple", input_shape=(3, 32, 32), classes=2)
    net.fit(x, y, epochs=3, batch_size=10, lr=0.1, verbose=False)
    net.class_names = ("red", "blue")
    net.save(tmp_path / "c.npz")
    for name, colour in (("r.png", (230, 10, 10)), ("b.jpg", (10, 10, 230))):
        Image.new("RGB", (90, 70), colour).save(tmp_path / name)
    run = subprocess.run([sys.executable, "-m", "fastcnn.cli", "predict", "c.npz", "r.png",
                          "b.jpg", "--top", "1"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("r.png: red ") and lines[1].startswith("b.jpg: blue ")


@needs_pillow
def test_show_input_writes_what_the_model_received_and_an_unsure_background_says_so(
        model_and_photos, tmp_path):
    from PIL import Image

    folder, net, photos, _, _ = model_and_photos
    # a drawn digit on paper, with a dark desk edge taking the left third of the frame
    photo = np.asarray(Image.open(photos[1]), dtype=np.float32) / 255
    photo[:, : photo.shape[1] // 3] = 0.05
    Image.fromarray((photo * 255).astype(np.uint8)).save(tmp_path / "desk.png")
    run = subprocess.run([sys.executable, "-m", "fastcnn.cli", "predict", str(folder / "m.npz"),
                          str(photos[1]), str(tmp_path / "desk.png"), "--show-input",
                          str(tmp_path / "seen")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    shown = np.asarray(Image.open(tmp_path / "seen" / f"{photos[1].name}.input.png"))
    assert shown.shape == (28, 28) and shown.dtype == np.uint8
    want = predict.model_input(net, photos[1])[0]
    np.testing.assert_allclose(shown / 255, want, atol=0.5 / 255 + 1e-6)
    assert (tmp_path / "seen" / "desk.png.input.png").is_file()
    assert "desk.png: note: the picture's border is" in run.stderr
    assert "--invert yes/no" in run.stderr
    assert f"{photos[1].name}: note" not in run.stderr  # a clear background: no note
    with pytest.warns(predict.AmbiguousBackground):
        predict.model_input(net, tmp_path / "desk.png")
