"""MNIST: fetched, md5-verified and parsed by torchvision, split, and saved as compact tensors."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")  # what a mirror folder holds; torchvision knows their md5 sums
MIRROR_ENV = "VAELAB_MNIST_MIRROR"
SPLITS = ("train", "val", "test")
SPLIT_SETTINGS = "split.json"  # beside the prepare stage's splits: the val_size and seed that made them


class DataError(RuntimeError):
    """A missing, corrupt or unreadable data file (MNIST's, or a stage's input); the message names it."""


NOT_FOUND = "not found"


class DamagedInput(DataError):
    """A stage's input file that is missing, truncated, damaged or of another kind, in one line: the file, what is
    wrong with it, and the cure, which depends on the stage that writes the file and on whether DVC caches it
    (dvc.yaml): `dvc checkout` restores only what DVC caches, and keeps a changed file unless forced (-f)."""

    def __init__(self, path: Path | str, problem: str, stage: str, cached: bool = True):
        if not cached:
            cure = f"dvc repro {stage} makes it again"
        elif problem == NOT_FOUND:
            cure = f"dvc checkout {path} restores it, dvc repro {stage} makes it"
        else:
            cure = f"dvc checkout -f {path} restores it"
        super().__init__(f"{path} {problem}; {cure}")
        self.path, self.problem = Path(path), problem


ZIP_START = b"PK\x03\x04"  # how every file torch.save writes begins: it is a zip archive


def load_archive(path: Path | str, stage: str) -> object:
    """What torch.save wrote to `path` (one of `stage`'s outputs), loaded weights-only (no pickled code runs) onto
    the CPU. A missing, empty, truncated, damaged or foreign file is a DamagedInput. The archive's CRC-32 sums are
    checked first: torch.load does not check them, and a changed byte would load as a changed pixel or weight."""
    problem = _archive_problem(Path(path))
    if problem is None:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # what weights_only refuses: objects other than tensors and plain containers
            problem = "holds pickled Python objects, not tensors alone"
        except (RuntimeError, EOFError, KeyError, IndexError, ValueError):  # PyTorch's reader of the archive's layout
            problem = "is a zip archive that PyTorch did not write"
    raise DamagedInput(path, problem, stage)


def _archive_problem(path: Path) -> str | None:
    """What keeps `path` from being a whole PyTorch archive, or None."""
    try:
        with open(path, "rb") as file:
            start = file.read(len(ZIP_START))
        if not zipfile.is_zipfile(path):  # no end record: a zip cut short, or no zip at all
            if not start:
                return "is empty"
            if start == ZIP_START:
                return "is a truncated PyTorch archive"  # its start, without the end record
            return "is not a PyTorch archive"
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except FileNotFoundError:
        return NOT_FOUND
    except IsADirectoryError:
        return "is a folder, not a file"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    except (zipfile.BadZipFile, EOFError, zlib.error):  # its directory, or a member, cut or changed
        return "is a damaged PyTorch archive"
    return "is damaged (a checksum fails)" if damaged else None


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
    try:  # here, so that the training core imports with PyTorch alone
        from torchvision.datasets import MNIST
    except ImportError:  # a GPU box with PyTorch alone: it can use the prepare stage's splits, copied there
        raise DataError(f"reading MNIST into {raw_dir} needs torchvision (pip install torchvision); without it, "
                        "copy the prepare stage's splits here (data/prepared, made with the same val_size and "
                        "seed)") from None

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
    # the four files are whole: torchvision's unpacked copies beside them are damaged, and only a cache
    return f"MNIST files in {folder} could not be read ({error}); delete that folder (a download cache) and run again"


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


def load_or_prepare(data_dir: Path, val_size: int, seed: int, raw_dir: Path = Path("data/raw")) -> dict[str, Split]:
    """The prepare stage's splits from `data_dir` where its split.json says it made them with `val_size` and
    `seed`, or, for tools run where the stage has not (a GPU box, a fresh clone) or made them otherwise (the last
    `dvc exp run -S seed=1`), the same splits made from MNIST in `raw_dir` (fetched, or copied from
    $VAELAB_MNIST_MIRROR)."""
    if split_settings(data_dir) == {"val_size": val_size, "seed": seed}:
        return {name: load_split(data_dir, name) for name in SPLITS}
    return prepare(raw_dir, val_size=val_size, seed=seed)


def save_split_settings(path: Path, val_size: int, seed: int) -> None:
    Path(path).write_text(json.dumps({"val_size": val_size, "seed": seed}) + "\n")


def split_settings(data_dir: Path) -> dict | None:
    """What the splits in `data_dir` were made with; None where that is not known (no or an unreadable file)."""
    try:
        return json.loads((Path(data_dir) / SPLIT_SETTINGS).read_text())
    except (OSError, ValueError):
        return None


def save_split(split: Split, path: Path) -> None:
    torch.save({"images": split.images, "labels": split.labels}, path)


def load_split(data_dir: Path, name: str) -> Split:
    """A split that `prepare` saved; a missing, damaged or foreign file is a DamagedInput that names it."""
    path = Path(data_dir) / f"{name}.pt"
    saved = load_archive(path, "prepare")
    if problem := _split_problem(saved):
        raise DamagedInput(path, problem, "prepare")
    return Split(saved["images"], saved["labels"])


def _split_problem(saved: object) -> str | None:
    """Why `saved` is not a split that `save_split` wrote (MNIST digits and their labels), or None."""
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), torch.Tensor) for k in ("images", "labels")):
        return "holds no images/labels"
    images, labels = saved["images"], saved["labels"]
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or not len(images):
        return f"holds no MNIST images (a {str(images.dtype).removeprefix('torch.')} tensor {tuple(images.shape)})"
    if labels.dtype != torch.int64 or tuple(labels.shape) != (len(images),) or labels.min() < 0 or labels.max() > 9:
        return f"holds {len(images)} images but not as many labels from 0 to 9"
    return None


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
