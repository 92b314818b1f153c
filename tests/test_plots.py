"""The pictures of fastcnn.plots and `fastcnn plot`: valid PNGs of the expected size, that change
with what they show; and the history files they read."""

import json
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")

from fastcnn import ConvNet, Dense, Flatten, datasets, history, models, plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails if the file is not a PNG."""
    data = open(path, "rb").read(32)
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def trained():
    (x, y), (x_test, y_test) = datasets.load("mnist-sample", raw=True)
    net = models.build("simple", seed=0)
    record = net.fit(x[:1500], y[:1500], epochs=2, batch_size=10, seed=0,
                     validation_data=(x[7000:7300], y[7000:7300]), verbose=False)
    return net, record, x_test[:300], y_test[:300]


def test_fit_records_a_loss_per_batch(trained):
    _, record, _, _ = trained
    assert len(record["batch_loss"]) == 2 * 150  # 1500 images in batches of 10, 2 epochs
    first, second = record["batch_loss"][:150], record["batch_loss"][150:]
    assert np.mean(first) == pytest.approx(record["loss"][0], rel=1e-5)
    assert np.mean(second) == pytest.approx(record["loss"][1], rel=1e-5)


def test_every_picture_is_a_png_of_the_expected_size(trained, tmp_path):
    net, record, x_test, y_test = trained
    written = plots.save_all(net, x_test, y_test, tmp_path / "pics", history=record)
    assert [p.name for p in written] == list(plots.FILES)
    sizes = {p.name: png_size(p) for p in written}
    # figure size (inches) x 100 dpi
    assert sizes["learning_curves.png"] == (1000, 400)
    assert sizes["confusion_matrix.png"] == (750, 650)
    assert sizes["misclassified.png"][0] == 8 * 145
    for width, height in sizes.values():
        assert 300 <= width <= 2000 and 100 <= height <= 2000


def test_pictures_change_with_what_they_show(trained, tmp_path):
    net, record, x_test, y_test = trained
    fresh = models.build("simple", seed=1)
    pairs = [
        (lambda m, p: plots.conv_filters(m, p), (net, fresh)),
        (lambda m, p: plots.confusion_matrix(m, x_test, y_test, path=p), (net, fresh)),
        (lambda m, p: plots.misclassified(m, x_test, y_test, path=p), (net, fresh)),
        (lambda i, p: plots.feature_maps(net, x_test[i], p), (0, 1)),
        (lambda h, p: plots.learning_curves(h, p),
         (record, {**record, "val_loss": [v * 2 for v in record["val_loss"]]})),
    ]
    for k, (draw, (a, b)) in enumerate(pairs):
        draw(a, tmp_path / f"{k}a.png")
        draw(b, tmp_path / f"{k}b.png")
        assert (tmp_path / f"{k}a.png").read_bytes() != (tmp_path / f"{k}b.png").read_bytes()


def test_the_confusion_counts_are_right():
    counts = plots.confusion_counts([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    np.testing.assert_array_equal(counts, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_class_names_must_match_the_model(trained):
    net, _, x_test, y_test = trained
    with pytest.raises(ValueError, match="3 names, the model has 10 classes"):
        plots.confusion_matrix(net, x_test, y_test, class_names=["a", "b", "c"])
    fig = plots.confusion_matrix(net, x_test, y_test,
                                 class_names=datasets.class_names("fashion-mnist"))
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[0] == "T-shirt/top" and labels[-1] == "Ankle boot"


def test_an_empty_history_is_a_clear_error():
    with pytest.raises(ValueError, match="no epochs"):
        plots.learning_curves({"loss": []})


def test_history_files_round_trip_and_refuse_what_they_are_not(trained, tmp_path):
    _, record, _, _ = trained
    j, c = history.paths_beside(tmp_path / "m.npz")
    assert (j.name, c.name) == ("m.history.json", "m.history.csv")
    history.save(record, j, c, {"model": "simple", "seed": 0})
    loaded, config = history.load(j)
    assert config["model"] == "simple" and json.loads(j.read_text())["fastcnn"]
    for key in ("loss", "val_accuracy", "lr", "batch_loss", "threads"):
        assert loaded[key] == pytest.approx(record[key])
    rows = c.read_text().splitlines()
    assert rows[0].startswith("epoch,loss,accuracy,val_loss,val_accuracy,lr")
    assert len(rows) == 3 and rows[2].startswith("2,")
    bad = tmp_path / "bad.json"
    for text, message in [("{", "not JSON"), ("[1, 2]", "not a fastcnn history"),
                          ('{"format": "fastcnn-history", "loss": ["x"]}', "'loss' must be")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            history.load(bad)


H = '{"format": "fastcnn-history", "epochs": 2, '


@pytest.mark.parametrize("text, message", [
    # each of these gave a matplotlib or Python message without the file's name
    (H + '"loss": [NaN, 0.5], "accuracy": [0.5, 0.6]}', "not JSON: NaN is not a number JSON "
                                                        "allows"),
    (H + '"loss": [Infinity, 0.5], "accuracy": [0.5, 0.6]}', "Infinity is not a number"),
    (H + '"loss": [null, null], "accuracy": [0.5, 0.6]}', "'loss' must be a list of numbers"),
    (H + '"loss": [0.9, 0.5], "accuracy": [0.5]}', "'accuracy' has 1 entries, the history has 2"),
    (H + '"loss": [0.9, 0.5], "accuracy": [0.5, 1.5]}', "'accuracy' must be a list of numbers "
                                                        ">= 0 and <= 1"),
    (H + '"loss": [0.9, 0.5], "accuracy": [0.5, 0.6], "config": {"dataset": 7}}',
     "config 'dataset' must be a name, got '7'"),
    ("[" * 100_000 + "]" * 100_000, "its JSON is nested too deeply"),
])
def test_a_damaged_history_file_is_named_with_what_is_wrong(tmp_path, text, message):
    bad = tmp_path / "run.history.json"
    bad.write_text(text)
    with pytest.raises(ValueError, match=f"{bad}.*{re.escape(message)}"):
        history.load(bad)


def test_a_history_file_too_large_to_be_one_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(history, "MAX_BYTES", 100)
    big = tmp_path / "big.json"
    big.write_text(H + '"loss": [' + ", ".join(["0.5"] * 50) + "]}")
    with pytest.raises(ValueError, match="larger than a fastcnn history file can be"):
        history.load(big)


def test_fastcnn_plot_and_train_plot_from_the_command_line(tmp_path):
    def fastcnn(*args):
        return subprocess.run([sys.executable, "-m", "fastcnn.cli", *args], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)

    run = fastcnn("train", "--limit", "600", "--test-limit", "200", "--epochs", "2", "--save",
                  "m.npz", "--plot", "during")
    assert run.returncode == 0, run.stderr
    for name in ("m.history.json", "m.history.csv"):
        assert (tmp_path / name).is_file()
    for name in (*plots.FILES, "history.json", "history.csv"):
        assert (tmp_path / "during" / name).is_file(), name
    run = fastcnn("plot", "m.npz", "--out", "after", "--test-limit", "200", "--image", "5")
    assert run.returncode == 0, run.stderr
    for name in plots.FILES:
        png_size(tmp_path / "after" / name)
    # the same model, history and test images: the same confusion matrix
    assert ((tmp_path / "after" / "confusion_matrix.png").read_bytes()
            == (tmp_path / "during" / "confusion_matrix.png").read_bytes())
    run = fastcnn("plot", "m.npz", "--image", "5000", "--test-limit", "200")
    assert run.returncode == 1 and "image_index 5000 is outside the 200 test images" in run.stderr


def test_pictures_of_a_colour_residual_model(tmp_path, rng):
    """Every picture of a 3x32x32 ResNet trained with normalisation: the images in colour,
    the feature maps fed what the model was trained on (normalised)."""
    x = rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, 40)
    net = models.build("resnet", input_shape=(3, 32, 32)).set_normalization(x=x)
    record = net.fit(x, y, epochs=1, batch_size=20, verbose=False)
    written = plots.save_all(net, x, y, tmp_path / "pics", history=record,
                             class_names=datasets.class_names("cifar-10"))
    assert [p.name for p in written] == list(plots.FILES)
    for path in written:
        width, height = png_size(path)
        assert 300 <= width <= 2000 and 100 <= height <= 2000
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plots._show_image(ax, x[0])
    shown = ax.get_images()[0].get_array()
    assert shown.shape == (32, 32, 3)  # in colour
    np.testing.assert_allclose(shown, np.transpose(x[0], (1, 2, 0)) / 255)
    plt.close(fig)


def test_feature_maps_show_each_convolution_and_residual_block():
    """One row per top-level layer that is or holds a convolution, after the BatchNorm and
    ReLU that follow it: the stem and the six blocks of the ResNet, the two convolutions of
    the seed's complex model; each row is the model's own output there."""
    from fastcnn import layers as L

    net = models.build("resnet", input_shape=(3, 12, 12), seed=3)
    x = np.random.default_rng(0).random((1, 3, 12, 12)).astype(np.float32)
    rows = plots.feature_rows(net, x)
    residuals = [i for i, layer in enumerate(net.layers) if isinstance(layer, L.Residual)]
    assert [first for first, _, _ in rows] == [0, *residuals]
    assert [last for _, last, _ in rows] == [2, *(i + 1 for i in residuals)]  # the ReLU after
    net.eval()
    y = x
    for layer in net.layers[: rows[3][1] + 1]:
        y = layer.forward(y)
    np.testing.assert_array_equal(rows[3][2], y[0])
    assert rows[-1][2].shape == (64, 3, 3)
    complex_rows = plots.feature_rows(models.build("complex"), np.zeros((1, 1, 28, 28),
                                                                         np.float32))
    assert [(a, b) for a, b, _ in complex_rows] == [(0, 1), (2, 3), (5, 6), (7, 8)]
    with pytest.raises(ValueError, match="no convolution"):
        plots.feature_rows(ConvNet([Flatten(), Dense(4, 2)], input_shape=(1, 2, 2)),
                           np.zeros((1, 1, 2, 2)))
