"""Execute the tour's notebooks, writing their outputs into them.

    python docs/tour/run.py            # every chapter at full size, in place (minutes)
    python docs/tour/run.py 5 6        # chapters 5 and 6 only
    python docs/tour/run.py --quick    # tiny sizes (FASTCNN_TOUR_QUICK=1), as CI runs them

Stops at the first cell that raises, naming the notebook. The kernel is this Python
(sys.executable), whatever other Jupyter kernels are installed; tests/test_tour.py runs the
same `execute` on copies of the notebooks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent


def notebooks(chapters=None):
    """The tour's notebooks in chapter order (those whose number is in ``chapters``)."""
    found = sorted(HERE.glob("[0-9]-*.ipynb"))
    return [p for p in found if not chapters or int(p.name.split("-")[0]) in chapters]


@contextmanager
def _this_python_kernel(quick):
    """A kernelspec "python3" that starts this interpreter, found first (JUPYTER_PATH), and the
    size switch, both in the environment that the kernel inherits."""
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "FASTCNN_TOUR_QUICK")}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp, "kernels", "python3")
        spec.mkdir(parents=True)
        spec.joinpath("kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python"}))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            [tmp] + ([saved["JUPYTER_PATH"]] if saved["JUPYTER_PATH"] else []))
        os.environ["FASTCNN_TOUR_QUICK"] = "1" if quick else "0"
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def execute(path, quick=False, out=None, cell_timeout=900):
    """Run every cell of notebook ``path`` in a fresh kernel, in the notebook's folder, and
    write it with its outputs to ``out`` (default: in place). Raises on the first error."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    with _this_python_kernel(quick):
        client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3",
                                record_timing=False,
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    nbformat.write(nb, out or path)
    return nb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("chapters", nargs="*", type=int, help="chapter numbers (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (FASTCNN_TOUR_QUICK=1): checks that every cell runs")
    args = p.parse_args(argv)
    start = time.perf_counter()
    for path in notebooks(args.chapters):
        t0 = time.perf_counter()
        print(f"{path.name} ...", end=" ", flush=True)
        execute(path, quick=args.quick)
        print(f"{time.perf_counter() - t0:.1f} s", flush=True)
    print(f"all done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
