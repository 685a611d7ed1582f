"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; MIT licence) read from its idx files.

70,000 grey 28 x 28 photos of ten kinds of clothing: 60,000 for training, 10,000 for testing.
Debian ships them offline (``apt-get install dataset-fashion-mnist``) in
``/usr/share/datasets/fashion-mnist``, the default ``--data-dir``. A folder may hold the files
gzipped (``train-images-idx3-ubyte.gz``, as published and as Debian ships them) or unpacked
(no ``.gz``).

The idx format: a big-endian header (two zero bytes, a type byte, 0x08 for uint8, the number of
dimensions d), d big-endian uint32 sizes, then the values in C order. Every file's decompressed
bytes are checked against their SHA-256 before they are used; the sums are of the content, not
of a compressed file, because the published ``.gz`` MD5 sums do not survive recompression
(Debian's ``.gz`` files differ from Zalando's, with the same content).
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_DIR", "FILES", "parse_idx", "read_fashion_mnist"]

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = (
    "Fashion-MNIST installs offline on Debian and Ubuntu: `sudo apt-get install "
    "dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), or put the four idx "
    "files from https://github.com/zalandoresearch/fashion-mnist (gzipped or not) in a folder "
    "and pass --data-dir FOLDER"
)
# SHA-256 of each file's decompressed content.
FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
NUM_CLASSES = 10


def parse_idx(data: bytes, name: str = "idx data") -> np.ndarray:
    """The uint8 array an idx byte string holds, shape from its header."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{name}: not an idx file (it must start with two zero bytes)")
    if data[2] != 0x08:
        raise ValueError(f"{name}: idx type 0x{data[2]:02x}; only unsigned bytes (0x08) are read")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise ValueError(f"{name}: idx header with {ndim} dimensions is truncated")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(data) != header + size:
        raise ValueError(
            f"{name}: header says shape {shape} ({size} values) but {len(data) - header} "
            f"bytes follow it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _read(folder: Path, stem: str, sha256: dict[str, str]) -> np.ndarray:
    plain, packed = folder / stem, folder / f"{stem}.gz"
    if packed.exists():
        try:
            data = gzip.decompress(packed.read_bytes())
        except (OSError, EOFError, zlib.error) as e:  # not gzip, cut short, corrupt data
            raise ValueError(
                f"{packed}: not a readable gzip file ({e}); the file is damaged: delete it "
                f"and download or install it again. {INSTALL_HINT}"
            ) from None
        path = packed
    elif plain.exists():
        data, path = plain.read_bytes(), plain
    else:
        raise FileNotFoundError(
            f"Fashion-MNIST: {folder} has neither {stem}.gz nor {stem}. {INSTALL_HINT}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256[stem]:
        raise ValueError(
            f"{path}: content SHA-256 {digest} is not Fashion-MNIST's {sha256[stem]}; the file "
            f"is damaged or a different data set. {INSTALL_HINT}"
        )
    return parse_idx(data, str(path))


def read_fashion_mnist(
    folder: Path | str = DEFAULT_DIR, *, sha256: dict[str, str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images (60000, 28, 28) uint8, train labels (60000,) int64, test images, test
    labels), every file checked against ``sha256`` (default: Fashion-MNIST's :data:`FILES`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST: no folder {folder}. {INSTALL_HINT}")
    sums = FILES if sha256 is None else sha256
    tx = _read(folder, "train-images-idx3-ubyte", sums)
    ty = _read(folder, "train-labels-idx1-ubyte", sums).astype(np.int64)
    vx = _read(folder, "t10k-images-idx3-ubyte", sums)
    vy = _read(folder, "t10k-labels-idx1-ubyte", sums).astype(np.int64)
    for x, y, split in ((tx, ty, "train"), (vx, vy, "t10k")):
        if x.ndim != 3 or len(x) != len(y):
            raise ValueError(
                f"Fashion-MNIST {split}: images {x.shape} and labels {y.shape} do not pair up"
            )
        if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise ValueError(f"Fashion-MNIST {split}: labels outside 0..{NUM_CLASSES - 1}")
    return tx, ty, vx, vy
