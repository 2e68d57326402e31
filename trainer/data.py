"""IDX datasets (MNIST, Fashion-MNIST, anything in the same four-file layout).

A dataset directory holds four files, gzip-compressed or not:
    train-images-idx3-ubyte  train-labels-idx1-ubyte
    t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte
Known datasets are verified against the md5 of their *uncompressed* content: the
.gz files themselves are often re-compressed by mirrors, so their own checksums
vary while the content does not.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# md5 of the uncompressed files, as published with each dataset.
KNOWN_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

MIRRORS = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ],
}

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(Exception):
    """The data directory is missing a file, or a file is corrupt: the message says which."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # int64 [N]


def find_file(data_dir: Path, stem: str) -> Path:
    if not data_dir.is_dir():
        raise DatasetError(f"data directory {data_dir} does not exist")
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"missing data file: expected {data_dir / stem} or {data_dir / stem}.gz")


def read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    return raw


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parses the IDX format: 2 zero bytes, a dtype code, the number of dimensions, the
    dimensions as big-endian uint32, then the values in row-major order."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{source}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in IDX_DTYPES:
        raise DatasetError(f"{source}: unknown IDX data type 0x{dtype_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{source}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[dtype_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(
            f"{source}: truncated or oversized IDX file: header says shape {shape} "
            f"({expected} bytes of data), file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def load_split(data_dir: Path | str, split: str, dataset: str | None = None) -> Split:
    """Loads one split; when `dataset` is a known name its files are checksum-verified."""
    data_dir = Path(data_dir)
    arrays = []
    for stem in SPLIT_FILES[split]:
        path = find_file(data_dir, stem)
        data = read_bytes(path)
        known = KNOWN_MD5.get(dataset or "", {})
        if stem in known and hashlib.md5(data).hexdigest() != known[stem]:
            raise DatasetError(
                f"{path}: checksum mismatch for {dataset} (md5 of content "
                f"{hashlib.md5(data).hexdigest()}, expected {known[stem]}); re-download it"
            )
        arrays.append(parse_idx(data, str(path)))
    images, labels = arrays
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DatasetError(f"{data_dir}: images must be uint8 [N, 28, 28], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(f"{data_dir}: {len(labels)} labels for {len(images)} images in the {split} split")
    return Split(images=images, labels=labels.astype(np.int64))


def dataset_fingerprint(data_dir: Path | str) -> str:
    """sha256 over the uncompressed content of all four files, in a fixed order."""
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for stem in SPLIT_FILES[split]:
            digest.update(read_bytes(find_file(Path(data_dir), stem)))
    return digest.hexdigest()


def download(dataset: str, data_dir: Path | str, timeout: float = 60.0) -> Path:
    """Downloads a known dataset into data_dir, trying each mirror in turn and verifying
    every file's checksum. Only ever called when the user asks for it."""
    if dataset not in MIRRORS:
        raise DatasetError(f"no download source for {dataset!r}; known: {sorted(MIRRORS)}")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for stem, md5 in KNOWN_MD5[dataset].items():
        target = data_dir / f"{stem}.gz"
        if target.is_file() and hashlib.md5(read_bytes(target)).hexdigest() == md5:
            continue
        errors = []
        for mirror in MIRRORS[dataset]:
            url = f"{mirror}{stem}.gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    payload = response.read()
                content = gzip.decompress(payload)
            except Exception as exc:  # any network or gzip failure: try the next mirror
                errors.append(f"{url}: {exc}")
                continue
            if hashlib.md5(content).hexdigest() != md5:
                errors.append(f"{url}: checksum mismatch")
                continue
            partial = target.with_suffix(".gz.part")
            partial.write_bytes(payload)
            partial.replace(target)
            break
        else:
            raise DatasetError(f"could not download {stem} for {dataset}:\n  " + "\n  ".join(errors))
    return data_dir
