"""Image classification data for the network experiment: Fashion-MNIST, or scikit-learn's digits.

Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; 60 000 training and 10 000 test images of
28x28 grey levels, 10 classes) is read from the idx files of the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``), parsed with
NumPy; nothing is downloaded. When the files are missing, the experiment falls back to
scikit-learn's bundled 8x8 digits (1 797 images, 10 classes), split deterministically into
a training and a test part; :attr:`ImageData.name` says which one is loaded.

Images are scaled to ``[0, 1]`` and standardised with the training set's mean and standard
deviation (one scalar each, the usual ``Normalize`` of MNIST-like data).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .names import DATASETS

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "ImageData",
    "fashion_mnist_available",
    "load_data",
    "load_digits",
    "load_fashion_mnist",
    "read_idx",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs the idx files
#: (overridable with the environment variable ``SPARSEFACT_FASHION_MNIST``).
FASHION_MNIST_DIR = Path(os.environ.get("SPARSEFACT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))

_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ImageData:
    """A classification data set as float32 image tensors ``(N, 1, H, W)`` and int64 labels.

    Attributes
    ----------
    name : str
        ``"fashion-mnist"`` or ``"digits"``.
    x_train, y_train, x_test, y_test : torch.Tensor
        Standardised images (``(N, 1, H, W)``, float32) and labels (``(N,)``, int64).
    n_classes : int
    source : str
        Where the data came from (a directory, or ``sklearn.datasets.load_digits``).
    note : str
        Why this data set was chosen (e.g. the fallback reason), empty if asked for by name.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    source: str
    note: str = ""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image."""
        return tuple(int(s) for s in self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def n_features(self) -> int:
        """Pixels per image (the input size of an MLP)."""
        c, h, w = self.image_shape
        return c * h * w

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> ImageData:
        """A copy with the first ``n_train`` / ``n_test`` examples of a fixed shuffle (all if None)."""
        gen = torch.Generator().manual_seed(int(seed))

        def pick(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            if n is None or n >= len(y):
                return x, y
            idx = torch.randperm(len(y), generator=gen)[: int(n)].sort().values
            return x[idx], y[idx]

        x_tr, y_tr = pick(self.x_train, self.y_train, n_train)
        x_te, y_te = pick(self.x_test, self.y_test, n_test)
        return ImageData(self.name, x_tr, y_tr, x_te, y_te, self.n_classes, self.source, self.note)

    def describe(self) -> str:
        """One line: name, sizes, image shape, source."""
        c, h, w = self.image_shape
        return (f"{self.name}: {len(self.y_train)} training / {len(self.y_test)} test images of "
                f"{c}x{h}x{w}, {self.n_classes} classes (from {self.source})")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one (optionally gzipped) idx file (LeCun's MNIST format) into a NumPy array.

    The header is two zero bytes, a type code (``0x08`` = uint8, ...), the number of
    dimensions, then one big-endian uint32 per dimension; the data follow in C order.

    Raises
    ------
    ValueError
        A malformed header or a data size that does not match it.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: {len(raw) - header} data bytes, the header announces {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    """Whether the four Fashion-MNIST idx files are present in ``root``."""
    root = FASHION_MNIST_DIR if root is None else Path(root)
    return all((root / f).is_file() for f in _FILES.values())


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mean = float(x_train.mean())
    std = float(x_train.std()) or 1.0
    return (torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
            torch.from_numpy(((x_test - mean) / std).astype(np.float32)))


def load_fashion_mnist(root: str | os.PathLike | None = None) -> ImageData:
    """Fashion-MNIST from the Debian package's idx files (see :data:`FASHION_MNIST_DIR`).

    Raises
    ------
    FileNotFoundError
        If a file is missing.
    """
    root = FASHION_MNIST_DIR if root is None else Path(root)
    arrays = {}
    for key, fname in _FILES.items():
        path = root / fname
        if not path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} not found (apt install dataset-fashion-mnist)")
        arrays[key] = read_idx(path)
    x_tr = arrays["train_images"].astype(np.float32)[:, None] / 255.0
    x_te = arrays["test_images"].astype(np.float32)[:, None] / 255.0
    x_tr_t, x_te_t = _standardise(x_tr, x_te)
    return ImageData(
        "fashion-mnist", x_tr_t, torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        x_te_t, torch.from_numpy(arrays["test_labels"].astype(np.int64)), 10, str(root),
    )


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> ImageData:
    """scikit-learn's bundled 8x8 digits, split into training and test parts by a fixed shuffle."""
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    x_tr, x_te = _standardise(x[train], x[test])
    return ImageData("digits", x_tr, torch.from_numpy(y[train]), x_te, torch.from_numpy(y[test]), 10,
                     "sklearn.datasets.load_digits")


def load_data(dataset: str = "auto", root: str | os.PathLike | None = None) -> ImageData:
    """Load ``"fashion-mnist"``, ``"digits"``, or ``"auto"``: Fashion-MNIST if its files exist, else digits.

    Raises
    ------
    ValueError
        An unknown ``dataset``.
    FileNotFoundError
        ``"fashion-mnist"`` asked for by name and its files are missing.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if dataset == "digits":
        return load_digits()
    if dataset == "fashion-mnist" or fashion_mnist_available(root):
        return load_fashion_mnist(root)
    data = load_digits()
    where = FASHION_MNIST_DIR if root is None else Path(root)
    data.note = f"Fashion-MNIST not found in {where}: fell back to scikit-learn's digits"
    return data
