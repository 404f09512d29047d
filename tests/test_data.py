"""MNIST fetching, verification, parsing and the validation split, on the real files."""
import gzip

import pytest
import torch

from vaelab import data


def test_parses_the_original_files(mnist):
    train, test = mnist["train"], mnist["test"]
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.labels.bincount().tolist()[:3] == [5923, 6742, 5958]  # the published class counts
    assert test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert train.images.max() == 255 and train.images.min() == 0


def test_validation_split_is_seeded_and_disjoint(mnist):
    train, val = data.split_validation(mnist["train"], 5000, seed=0)
    again, val_again = data.split_validation(mnist["train"], 5000, seed=0)
    _, other = data.split_validation(mnist["train"], 5000, seed=1)
    assert len(train.labels) == 55000 and len(val.labels) == 5000
    assert torch.equal(val.images, val_again.images) and not torch.equal(val.images, other.images)
    as_rows = lambda split: {bytes(img.numpy()) for img in split.images[:2000]}
    assert not as_rows(train) & as_rows(val)


def test_fetch_from_a_mirror_folder_verifies_and_reuses(mnist_dir, tmp_path):
    paths = data.fetch(tmp_path / "raw", mirror=str(mnist_dir))
    assert {p.name for p in paths.values()} == set(data.FILES)
    assert all(data.md5(p) == data.FILES[p.name] for p in paths.values())
    data.fetch(tmp_path / "raw", mirror=str(tmp_path / "nowhere"))  # verified files are not fetched again


@pytest.mark.parametrize("damage", ["truncated", "changed"])
def test_a_corrupt_file_is_named(damaged_mirror, tmp_path, damage):
    mirror = damaged_mirror("t10k-labels-idx1-ubyte.gz", damage)
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz.*\n.*md5"):
        data.fetch(tmp_path / "raw", mirror=str(mirror))
    assert not any(p.suffix == ".part" for p in (tmp_path / "raw").iterdir())


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz could not be fetched"):
        data.fetch(tmp_path / "raw", mirror=str(tmp_path))


def test_a_malformed_idx_file_is_named(tmp_path):
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress((2049).to_bytes(4, "big") + (10).to_bytes(4, "big") + b"\x01\x02"))
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz: 2 bytes of data, expected 10"):
        data._read_idx(bad, 2049, 1)
