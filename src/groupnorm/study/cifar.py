"""CIFAR-10 / CIFAR-100 in the folder layout torchvision downloads, read without torchvision.

Layout under ``--data-dir``::

    cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/     train, test, meta

Each file is a Python pickle (protocol 2, bytes keys) of a dict with ``b"data"`` (uint8,
(n, 3072), channel-major 3 x 32 x 32) and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"``
(CIFAR-100). Every file is checked against its published MD5 sum before it is unpickled (an
unpickled file can run code; a checked one is the file Krizhevsky published). ``download``
fetches the archive, checks the archive's MD5 and unpacks it.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CIFAR", "CifarSpec", "download", "md5sum", "read_cifar"]


@dataclass(frozen=True)
class CifarSpec:
    """One CIFAR variant: its folder, archive, files with their MD5 sums, label key."""

    folder: str
    url: str
    archive: str
    archive_md5: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    md5: Mapping[str, str]
    label_key: bytes
    num_classes: int


# The published sums (https://www.cs.toronto.edu/~kriz/cifar.html; the same torchvision checks).
CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": CifarSpec(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=("train",),
        test=("test",),
        meta="meta",
        md5={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
        label_key=b"fine_labels",
        num_classes=100,
    ),
}


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checked(path: Path, expected: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: --data-dir must hold the folder "
            f"{path.parent.name}/ as torchvision downloads it (or pass "
            f"--download)"
        )
    got = md5sum(path)
    if got != expected:
        raise ValueError(
            f"{path}: MD5 {got} does not match the published {expected}; the file "
            f"is damaged or not the official one (delete it and use --download)"
        )
    return path


def _load_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def read_cifar(
    data_dir: Path, name: str, *, md5: Mapping[str, str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """``(train_x, train_y, test_x, test_y, num_classes)``, images uint8 (n, 3, 32, 32).

    ``md5`` replaces the published sums (file name -> sum), for tests that write small files.
    """
    if name not in CIFAR:
        raise ValueError(f"unknown CIFAR variant {name!r}; expected one of {list(CIFAR)}")
    spec = CIFAR[name]
    sums = spec.md5 if md5 is None else md5
    folder = Path(data_dir) / spec.folder
    _checked(folder / spec.meta, sums[spec.meta])

    def load(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_load_batch(_checked(folder / f, sums[f]), spec.label_key) for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    train_x, train_y = load(spec.train)
    test_x, test_y = load(spec.test)
    return train_x, train_y, test_x, test_y, spec.num_classes


def download(
    data_dir: Path, name: str, *, url: str | None = None, archive_md5: str | None = None
) -> Path:
    """Fetch ``name``'s archive (from ``url`` if given), check its MD5, unpack it into
    ``data_dir``; return the folder. An archive already present with the right sum is reused."""
    if name not in CIFAR:
        raise ValueError(f"unknown CIFAR variant {name!r}; expected one of {list(CIFAR)}")
    spec = CIFAR[name]
    expected = archive_md5 or spec.archive_md5
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / spec.archive
    if not archive.exists() or md5sum(archive) != expected:
        partial = archive.with_suffix(".part")
        with (
            urllib.request.urlopen(url or spec.url, timeout=60) as response,
            open(partial, "wb") as f,
        ):
            shutil.copyfileobj(response, f)
        got = md5sum(partial)
        if got != expected:
            partial.unlink()
            raise ValueError(
                f"downloaded {spec.archive} from {url or spec.url} has MD5 {got}, "
                f"not the published {expected}; nothing was unpacked"
            )
        partial.replace(archive)
    with tarfile.open(archive, "r:gz") as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.split("/")[0] == spec.folder and m.isfile() and ".." not in m.name.split("/")
        ]
        tar.extractall(data_dir, members=members, filter="data")
    return data_dir / spec.folder
