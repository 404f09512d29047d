"""MNIST: fetch the four original files (md5-verified), parse them, split, and save compact tensors."""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

# The mirrors and checksums torchvision uses (torchvision.datasets.MNIST).
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MIRROR_ENV = "VAELAB_MNIST_MIRROR"
SPLITS = ("train", "val", "test")


class DataError(RuntimeError):
    """A missing, corrupt or unreadable MNIST file; the message names it."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8, (n, 28, 28)
    labels: torch.Tensor  # int64, (n,)


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sources(mirror: str | None) -> list[str]:
    return [mirror] if mirror else list(MIRRORS)


def _copy_from(source: str, name: str, target: Path) -> None:
    """Copy `name` from a folder, a file:// URL or an http(s) URL to `target`."""
    if "://" not in source:
        shutil.copyfile(Path(source).expanduser() / name, target)
        return
    url = source.rstrip("/") + "/" + name
    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out)


def fetch(raw_dir: Path, mirror: str | None = None) -> dict[str, Path]:
    """Make sure the four verified files are in `raw_dir`; download the missing or corrupt ones.

    `mirror` (default: $VAELAB_MNIST_MIRROR) is a folder or URL holding the four files;
    without one, torchvision's mirrors are tried in turn.
    """
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    raw_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, expected in FILES.items():
        path = raw_dir / name
        if not (path.exists() and md5(path) == expected):
            errors = []
            for source in _sources(mirror):
                with tempfile.NamedTemporaryFile(dir=raw_dir, suffix=".part", delete=False) as part:
                    part_path = Path(part.name)
                try:
                    _copy_from(source, name, part_path)
                    actual = md5(part_path)
                    if actual != expected:
                        raise DataError(f"md5 {actual}, expected {expected} (corrupt or truncated)")
                    part_path.replace(path)
                    break
                except (OSError, DataError) as error:
                    errors.append(f"  {source}: {error}")
                finally:
                    part_path.unlink(missing_ok=True)
            else:
                raise DataError(f"MNIST file {name} could not be fetched:\n" + "\n".join(errors))
        paths[name] = path
    return paths


def _read_idx(path: Path, magic: int, dims: int) -> torch.Tensor:
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as error:
        raise DataError(f"{path.name}: not a readable gzip file ({error})") from None
    header = 4 * (1 + dims)
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"{path.name}: not an IDX file with magic number {magic}")
    shape = [int.from_bytes(data[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(dims)]
    count = 1
    for size in shape:
        count *= size
    if len(data) != header + count:
        raise DataError(f"{path.name}: {len(data) - header} bytes of data, expected {count} for shape {shape}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def read_mnist(paths: dict[str, Path]) -> dict[str, Split]:
    """Parse the IDX files into the original train and test sets."""
    sets = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"], 2051, 3)
        labels = _read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"], 2049, 1).long()
        if len(images) != len(labels):
            raise DataError(f"{prefix}: {len(images)} images but {len(labels)} labels")
        sets[part] = Split(images, labels)
    return sets


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Hold a seeded random `val_size` images out of the training set."""
    order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(seed))
    val, rest = order[:val_size].sort().values, order[val_size:].sort().values
    return Split(train.images[rest], train.labels[rest]), Split(train.images[val], train.labels[val])


def prepare(raw_dir: Path, val_size: int, seed: int, mirror: str | None = None) -> dict[str, Split]:
    """Fetch, parse and split MNIST into train, val and test."""
    sets = read_mnist(fetch(raw_dir, mirror))
    train, val = split_validation(sets["train"], val_size, seed)
    return {"train": train, "val": val, "test": sets["test"]}


def save_split(split: Split, path: Path) -> None:
    torch.save({"images": split.images, "labels": split.labels}, path)


def load_split(data_dir: Path, name: str) -> Split:
    saved = torch.load(Path(data_dir) / f"{name}.pt", weights_only=True)
    return Split(saved["images"], saved["labels"])


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 28, 28) -> float32 (n, 784) in [0, 1], as the seed scales pixels."""
    return images.reshape(len(images), -1).float().div_(255.0)


# One fixed binarization per split, the same for every run, so binarized runs are compared on the same data.
BINARIZATION_SEEDS = {"train": 1, "val": 2, "test": 3}


def model_inputs(images: torch.Tensor, binarize: str, split: str) -> torch.Tensor:
    """What the model sees of a split: grayscale (the seed, `none`), or pixels drawn once as Bernoulli(pixel)
    with a fixed seed. With `dynamic` the training set stays grayscale here and the training loop draws
    a new binarization of every batch; its validation and test sets are the fixed ones."""
    pixels = to_float(images)
    if binarize == "none" or (binarize == "dynamic" and split == "train"):
        return pixels
    return torch.bernoulli(pixels, generator=torch.Generator().manual_seed(BINARIZATION_SEEDS[split]))
