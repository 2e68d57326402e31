"""IDX parsing and dataset verification, on files the tests write and on real MNIST."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MNIST_DIR, needs_mnist
from tests.datasets import idx_bytes, write_dataset
from trainer import data


@pytest.mark.parametrize("compress", [True, False])
def test_reads_written_idx_files(tmp_path: Path, compress: bool) -> None:
    write_dataset(tmp_path, compress=compress)
    split = data.load_split(tmp_path, "train")
    assert split.images.shape == (20, 28, 28) and split.images.dtype == np.uint8
    assert split.labels.shape == (20,)
    rng = np.random.default_rng(0)
    assert np.array_equal(split.images, rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8))


def test_missing_file_is_named(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DatasetError, match="t10k-labels-idx1-ubyte"):
        data.load_split(tmp_path, "test")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.load_split(tmp_path / "nope", "train")


def test_truncated_idx_is_reported(tmp_path: Path) -> None:
    write_dataset(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data.DatasetError, match="train-images-idx3-ubyte: truncated"):
        data.load_split(tmp_path, "train")


def test_corrupt_gzip_is_reported(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(data.DatasetError, match=r"train-images-idx3-ubyte\.gz: corrupt or truncated gzip"):
        data.load_split(tmp_path, "train")


def test_not_idx_is_reported(tmp_path: Path) -> None:
    write_dataset(tmp_path, compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(data.DatasetError, match="bad magic number"):
        data.load_split(tmp_path, "train")


def test_label_count_mismatch(tmp_path: Path) -> None:
    write_dataset(tmp_path, compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(data.DatasetError, match="3 labels for 20 images"):
        data.load_split(tmp_path, "train")


def test_known_dataset_checksum_mismatch(tmp_path: Path) -> None:
    write_dataset(tmp_path)  # random bytes are not MNIST
    with pytest.raises(data.DatasetError, match="checksum mismatch for mnist"):
        data.load_split(tmp_path, "train", "mnist")


def test_download_tries_mirrors_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: urlopen is replaced. The first mirror fails, the second serves content whose
    md5 we register as the known one, so the checksum path is exercised end to end."""
    (tmp_path / "src").mkdir()
    write_dataset(tmp_path / "src")
    contents = {
        stem: gzip.decompress((tmp_path / "src" / f"{stem}.gz").read_bytes())
        for split in data.SPLIT_FILES.values()
        for stem in split
    }
    monkeypatch.setitem(data.KNOWN_MD5, "toy", {s: hashlib.md5(c).hexdigest() for s, c in contents.items()})
    monkeypatch.setitem(data.MIRRORS, "toy", ["https://bad.example/", "https://good.example/"])
    requested = []

    def fake_urlopen(url: str, timeout: float):
        requested.append(url)
        if url.startswith("https://bad.example/"):
            raise OSError("connection refused")
        stem = url.rsplit("/", 1)[1].removesuffix(".gz")
        return io.BytesIO(gzip.compress(contents[stem]))

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    data.download("toy", tmp_path / "dst")
    assert data.load_split(tmp_path / "dst", "train", "toy").images.shape == (20, 28, 28)
    assert any(u.startswith("https://bad.example/") for u in requested)
    assert not list((tmp_path / "dst").glob("*.part"))


def test_download_rejects_bad_checksums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(data.MIRRORS, "mnist", ["https://evil.example/"])
    monkeypatch.setattr(
        data.urllib.request,
        "urlopen",
        lambda url, timeout: io.BytesIO(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00")),
    )
    with pytest.raises(data.DatasetError, match="checksum mismatch"):
        data.download("mnist", tmp_path)


@needs_mnist
def test_real_mnist_parses_and_verifies() -> None:
    train = data.load_split(MNIST_DIR, "train", "mnist")
    test = data.load_split(MNIST_DIR, "test", "mnist")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist()[:2] == [5923, 6742]  # the published class counts
    assert train.images.max() == 255 and train.images.min() == 0
