"""The guided tour (docs/tour): every notebook runs, and what is committed came from a clean run.

The notebooks are executed at tiny sizes (FASTCNN_TOUR_QUICK=1) on copies in a temporary folder,
with docs/tour/run.py's own `execute`, so that the committed notebooks are never modified. The
committed outputs are only read: they must hold no error, come from one run of every code cell,
and name the CPU they were measured on.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

TOUR = Path(__file__).resolve().parents[1] / "docs" / "tour"
NOTEBOOKS = sorted(TOUR.glob("[0-9]-*.ipynb"))
CHAPTERS = 6

nbformat = pytest.importorskip("nbformat")


def _run_module():
    spec = importlib.util.spec_from_file_location("tour_run", TOUR / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text(output):
    if output["output_type"] == "stream":
        return output["text"]
    return output.get("data", {}).get("text/plain", "")


def test_the_tour_has_its_six_chapters():
    assert [int(p.name.split("-")[0]) for p in NOTEBOOKS] == list(range(1, CHAPTERS + 1))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_quick_sizes(path, tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    work = tmp_path / "tour"
    work.mkdir()
    shutil.copy(TOUR / "tour.py", work)
    copy = shutil.copy(path, work)
    before = path.read_bytes()
    nb = _run_module().execute(copy, quick=True, cell_timeout=300)  # raises on any cell's error
    assert path.read_bytes() == before, "running the tour must not touch the committed notebook"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o["output_type"] == "error"]
    first = "".join(_text(o) for o in code[0].outputs)
    assert "CPU: " in first and "QUICK run" in first
    pictures = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert pictures >= 1, "every chapter draws at least one picture"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_are_clean_and_name_the_cpu(path):
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert None not in counts, f"{path.name}: some cells were not run: python docs/tour/run.py"
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: not from one run, in order"
    errors = [o for c in code for o in c.outputs if o["output_type"] == "error"]
    assert not errors, f"{path.name}: committed with an error: {errors[0].get('ename')}"
    assert "CPU: " in _first_output(path), f"{path.name}: its first cell must name the CPU"


def _first_output(path):
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    return "".join(_text(o) for o in first.get("outputs", []))


def test_committed_outputs_come_from_a_full_run():
    quick = [p.name for p in NOTEBOOKS if "QUICK run" in _first_output(p)]
    for p in NOTEBOOKS:
        if p.name not in quick:
            assert "full run" in _first_output(p), p.name
    if quick:
        pytest.skip(f"committed outputs of {', '.join(quick)} are from a QUICK run; "
                    "python docs/tour/run.py writes the full one")
