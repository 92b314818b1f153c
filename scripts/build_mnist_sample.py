"""Build fastcnn/data/mnist-sample/ from the real MNIST test digits.

    python scripts/build_mnist_sample.py [SOURCE_DIR]

SOURCE_DIR (default ../shared/data/mnist) holds t10k-images-idx3-ubyte.gz and
t10k-labels-idx1-ubyte.gz, the 10,000 digits of the official MNIST test set. Their decompressed
SHA-256 is checked against the published one, then a seeded permutation splits them into 8,000
training and 2,000 test digits, written as gzip IDX files with no timestamp: running the script
again gives the same bytes.
"""

import hashlib
import sys
from pathlib import Path

import numpy as np

from fastcnn.idx import read_idx, write_idx

SHA256 = {
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
N_TRAIN = 8000
SEED = 0


def main(source):
    import gzip

    for name, sha in SHA256.items():
        got = hashlib.sha256(gzip.decompress((source / name).read_bytes())).hexdigest()
        if got != sha:
            sys.exit(f"{source / name}: SHA-256 of the payload is {got}, expected {sha}")
    images = read_idx(source / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(source / "t10k-labels-idx1-ubyte.gz")
    order = np.random.default_rng(SEED).permutation(len(images))
    out = Path(__file__).resolve().parent.parent / "fastcnn" / "data" / "mnist-sample"
    out.mkdir(parents=True, exist_ok=True)
    parts = {"train": order[:N_TRAIN], "t10k": order[N_TRAIN:]}
    for prefix, idx in parts.items():
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[idx])
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels[idx])
        print(f"{prefix}: {len(idx)} digits, label counts {np.bincount(labels[idx]).tolist()}")
    total = sum(f.stat().st_size for f in out.glob("*.gz"))
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
