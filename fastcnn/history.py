"""A training run's history on disk: JSON (everything, with the run's configuration) and CSV (one
row per epoch, for spreadsheets), both written atomically.

``fit`` returns the history as a dict of lists: per epoch ``loss``, ``accuracy``, ``val_loss``,
``val_accuracy`` (with validation data), ``lr`` (at the epoch's first batch), ``seconds``,
``images_per_second`` and ``threads``; per batch ``batch_loss`` (the loss of each batch before its
update). ``fastcnn train --save m.npz`` writes ``m.history.json`` and ``m.history.csv`` beside
the model.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from . import __version__, atomic

FORMAT = "fastcnn-history"
EPOCH_COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds",
                 "images_per_second", "threads")


def paths_beside(model_path):
    """(JSON, CSV) paths beside a model file: ``m.npz`` -> ``m.history.json``, ``.csv``."""
    p = Path(model_path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(stem + ".history.json"), p.with_name(stem + ".history.csv")


def _number(v):
    if v is None or isinstance(v, bool):
        return v
    v = float(v)
    return v if math.isfinite(v) else None  # JSON has no NaN; a diverged run raised anyway


def save(history, json_path, csv_path=None, config=None):
    """Write ``history`` (as ``fit`` returns it) and the run's ``config`` (a JSON-able dict:
    model, backend, recipe, seed, ...; the fastcnn version is added)."""
    epochs = len(history.get("loss", []))
    record = {"format": FORMAT, "fastcnn": __version__, "config": dict(config or {}),
              "epochs": epochs}
    for key, values in history.items():
        if isinstance(values, list):
            record[key] = [_number(v) for v in values]
        else:
            record[key] = values  # best_epoch, stopped_epoch
    text = json.dumps(record, indent=1)
    atomic.atomic_write(json_path, lambda f: f.write(text.encode()))
    if csv_path is not None:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        columns = [c for c in EPOCH_COLUMNS if len(history.get(c, [])) == epochs]
        w.writerow(["epoch", *columns])
        for e in range(epochs):
            w.writerow([e + 1, *(_cell(history[c][e]) for c in columns)])
        atomic.atomic_write(csv_path, lambda f: f.write(out.getvalue().encode()))


def _cell(v):
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else v


MAX_BYTES = 64 << 20  # a history of 10,000 epochs of 6,000 batches is about 30 MB
# per-epoch columns: their least value (None: any); accuracies are at most 1
_LEAST = {"loss": 0, "accuracy": 0, "val_loss": 0, "val_accuracy": 0, "lr": 0, "seconds": 0,
          "images_per_second": 0, "threads": 1}


def load(path):
    """A history written by ``save``: (history dict of lists, config dict). Checks what it
    reads (JSON of at most ``MAX_BYTES``, finite numbers in their ranges, one per epoch in
    every per-epoch list, a config whose dataset is a name): a file that is not one is a
    ValueError naming the file and what is wrong."""
    path = Path(path)
    try:
        return _load(path)
    except RecursionError:
        raise ValueError(f"{path} is not a fastcnn history file: its JSON is nested too "
                         "deeply") from None


def _reject_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def _load(path):
    with open(path, "rb") as f:
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise ValueError(f"{path} is larger than a fastcnn history file can be ({MAX_BYTES:,} "
                         "bytes)")
    try:
        record = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not a fastcnn history file (not JSON: {e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastcnn history file (no 'format': '{FORMAT}')")
    history = {}
    epochs = record.get("epochs", len(record.get("loss", [])))
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"{path}: 'epochs' must be a whole number, got {str(epochs)[:40]}")
    for key in (*EPOCH_COLUMNS, "batch_loss"):
        if key not in record and key not in ("loss", "accuracy"):  # optional: a column absent
            history[key] = []
            continue
        values = record.get(key, [])
        least = _LEAST.get(key, 0)
        if not isinstance(values, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and least <= v and
                (v <= 1 or not key.endswith("accuracy")) for v in values):
            raise ValueError(f"{path}: '{key}' must be a list of numbers >= {least}"
                             + (" and <= 1" if key.endswith("accuracy") else ""))
        lengths = (0, epochs) if key.startswith("val_") else (epochs,)
        if key != "batch_loss" and len(values) not in lengths:
            raise ValueError(f"{path}: '{key}' has {len(values)} entries, the history has "
                             f"{epochs} epochs")
        history[key] = values
    config = record.get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"{path}: 'config' must be an object")
    for key in ("dataset", "data_dir", "model"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise ValueError(f"{path}: config '{key}' must be a name, got "
                             f"{str(config[key])[:40]!r}")
    return history, config
