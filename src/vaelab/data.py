"""MNIST: fetched, md5-verified and parsed by torchvision, split, and saved as compact tensors."""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")  # what a mirror folder holds; torchvision knows their md5 sums
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


def load_mnist(raw_dir: Path, mirror: str | None = None) -> dict[str, Split]:
    """The original train and test sets, through `torchvision.datasets.MNIST`: it downloads the four files
    into `raw_dir`/MNIST/raw (a cache: verified files are not fetched again), checks their md5 sums and
    parses them. `mirror` (default: $VAELAB_MNIST_MIRROR), a folder or URL holding the four files, replaces
    torchvision's own mirrors. A failure is one DataError naming the file; a corrupt download is removed."""
    from torchvision.datasets import MNIST  # here, so that the training core imports with PyTorch alone

    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    folder, expected_md5 = Path(raw_dir) / "MNIST" / "raw", dict(MNIST.resources)  # torchvision's cache
    mirrors = MNIST.mirrors
    if mirror and ("://" not in mirror or mirror.startswith("file://")):
        # torchvision downloads over http(s) only: a folder's files are copied into its cache, where it finds
        # them verified and does not fetch them
        local = Path(url2pathname(urlparse(mirror).path)) if "://" in mirror else Path(mirror).expanduser()
        _copy_verified(local, folder, expected_md5)
        mirrors = [local.resolve().as_uri() + "/"]
    elif mirror:
        mirrors = [mirror.rstrip("/") + "/"]
    source = type("MNIST", (MNIST,), {"mirrors": mirrors})  # named MNIST, so that it uses the same folder
    try:
        sets = {part: source(str(raw_dir), train=part == "train", download=True) for part in ("train", "test")}
    except (OSError, RuntimeError) as error:
        raise DataError(_failure(folder, expected_md5, mirror, error)) from None
    # .clone(): torchvision's tensors are views into the whole file, header included; saved, they would differ
    return {part: Split(mnist.data.clone(), mnist.targets) for part, mnist in sets.items()}


def _copy_verified(mirror: Path, folder: Path, expected_md5: dict[str, str]) -> None:
    """Copy each of the four files that the cache lacks (or holds corrupt) from the folder `mirror`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = folder / name
        if (folder / name.removesuffix(".gz")).exists() or (target.exists() and md5(target) == expected_md5[name]):
            continue
        partial = target.with_name(name + ".part")
        try:
            shutil.copyfile(mirror / name, partial)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise DataError(f"MNIST file {name} could not be fetched from {mirror}: {error.strerror}") from None
        if (actual := md5(partial)) != expected_md5[name]:
            partial.unlink()
            raise DataError(_corrupt(name, mirror, actual, expected_md5[name]))
        partial.replace(target)


def _corrupt(name: str, where: object, actual: str, expected: str) -> str:
    return f"MNIST file {name} from {where}: md5 {actual}, expected {expected} (corrupt or truncated)"


def _failure(folder: Path, expected_md5: dict[str, str], mirror: str | None, error: Exception) -> str:
    """One line naming the first of the four files that is missing or corrupt, and where it was fetched from."""
    where = mirror or "torchvision's mirrors"
    for name in FILES:
        path = folder / name
        if path.exists() and (actual := md5(path)) != expected_md5[name]:
            path.unlink()
            return _corrupt(name, where, actual, expected_md5[name])
        if not path.exists():
            reason = [line for line in str(error).splitlines() if line.strip()][-1].strip()
            return f"MNIST file {name} could not be fetched from {where}: {reason}"
    return f"MNIST files in {folder} could not be read: {error}"


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Hold a seeded random `val_size` images out of the training set."""
    order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(seed))
    val, rest = order[:val_size].sort().values, order[val_size:].sort().values
    return Split(train.images[rest], train.labels[rest]), Split(train.images[val], train.labels[val])


def prepare(raw_dir: Path, val_size: int, seed: int, mirror: str | None = None) -> dict[str, Split]:
    """Fetch, parse and split MNIST into train, val and test."""
    sets = load_mnist(raw_dir, mirror)
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
