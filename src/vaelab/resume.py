"""Training's checkpoints: everything `training.train` needs to continue a stopped run bit for bit (weights,
optimizer state, random number generators, history and snapshots), written whole or not at all, each in a folder
of its own that a training holds while it runs (`claim`)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import IO, Iterator

import torch

from vaelab.data import DamagedInput, load_archive, md5
from vaelab.stages import atomic_file

STATE_KEYS = ("epoch", "model", "optimizer", "rng", "cuda_rng", "shuffle_rng", "history", "snapshots")
SNAPSHOT_LISTS = ("epochs", "manifolds", "latent_means", "reconstructions")  # training.Snapshots' fields


@dataclass
class Checkpointing:
    """Where and how often `train` saves a checkpoint."""

    path: Path
    every_seconds: float = 60.0


def save(path: Path, epoch, model, optimizer, shuffle, history, snapshots) -> None:
    """Write the state `restore` reads back, whole or not at all."""
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if next(model.parameters()).is_cuda else torch.empty(0),
        "shuffle_rng": shuffle.get_state(),
        "history": history,
        "snapshots": {name: getattr(snapshots, name) for name in SNAPSHOT_LISTS},
    }
    with atomic_file(path) as partial:  # a kill mid-write leaves the previous checkpoint intact
        torch.save(state, partial)


def usable(path: Path) -> bool:
    """Whether `path` holds a whole checkpoint to continue from. A damaged one (a power cut, a full disk, another
    program's file) is said in one line and removed, and training starts afresh: a checkpoint is a cache, so
    nothing a user made is lost."""
    if not path.exists():
        return False
    try:
        state = load_archive(path, "train")
        whole = isinstance(state, dict) and all(key in state for key in STATE_KEYS) and all(
            name in state["snapshots"] for name in SNAPSHOT_LISTS)
        problem = None if whole else "is not a vaelab checkpoint of this version"
    except DamagedInput as damaged:
        problem = damaged.problem
    if problem is None:
        return True
    print(f"warning: the checkpoint {path} {problem}; training starts afresh", file=sys.stderr, flush=True)
    path.unlink()
    return False


def epoch_of(path: Path) -> int:
    """The last epoch a checkpoint holds: training continues after it."""
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def restore(path: Path, model, optimizer, shuffle, history, snapshots) -> int:
    """Load a checkpoint into the fresh objects `train` made; returns its epoch."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if len(state["cuda_rng"]):
        torch.cuda.set_rng_state(state["cuda_rng"])
    shuffle.set_state(state["shuffle_rng"])
    history.extend(state["history"])
    for name in SNAPSHOT_LISTS:
        getattr(snapshots, name).extend(state["snapshots"][name])
    return state["epoch"]


KEY_FILE, LOCK_FILE = "key.json", "lock"
CHECKPOINTS_ENV = "VAELAB_CHECKPOINTS"  # a folder every node sees: a requeued cluster task resumes on any node


def checkpoints_dir(root: Path) -> Path:
    """Where trainings keep their checkpoint folders: $VAELAB_CHECKPOINTS, else the project's .vaelab/checkpoints."""
    return Path(os.environ.get(CHECKPOINTS_ENV) or root / ".vaelab" / "checkpoints")


def training_key(params: dict, scripts: list[Path], data_files: list[Path]) -> dict:
    """What a checkpoint is only good for: these parameters, this code (each vaelab module this process has loaded,
    and the stage's `scripts`) and these data (the md5 DVC records for each file)."""
    modules = [module for name, module in sys.modules.items()
               if (name == "vaelab" or name.startswith("vaelab.")) and getattr(module, "__file__", None)]
    files = {f"src/vaelab/{Path(module.__file__).name}": Path(module.__file__) for module in modules}
    files |= {f"pipeline/{script.name}": script for script in scripts}
    code = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in sorted(files.items())}
    return {"params": params, "code": code, "data": {path.name: md5(path) for path in data_files}}


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _held(folder: Path) -> IO | None:
    """The folder's lock, taken without waiting, or None where another training holds it."""
    lock = open(folder / LOCK_FILE, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def _difference(saved: dict | None, key: dict) -> str:
    """In words, what made a checkpoint of the same parameters other: the first file of code or data that differs."""
    if saved is None:
        return "made before checkpoints recorded their code and data"
    for part, what in (("code", "other code"), ("data", "other data")):
        changed = sorted(name for name in saved[part].keys() | key[part].keys()
                         if saved[part].get(name) != key[part].get(name))
        if changed:
            return f"made by {what} ({changed[0]}{' and more' if len(changed) > 1 else ''} differs)"
    return "made by another training"


@contextmanager
def claim(checkpoints: Path, key: dict) -> Iterator[Path]:
    """A folder for this training's checkpoint, held while the block runs: the folder of an earlier, stopped training
    of the same key, else a new one. Two trainings of one key at once (the same grid queued twice) each get their
    own, so neither resumes, nor removes, the other's; a folder of these parameters made by other code or data is
    never resumed, said in one line, and left where it is (that code may run again)."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    prefix = _digest(key["params"])
    for old in [checkpoints / prefix, *sorted(checkpoints.glob(f"{prefix}-*"))]:
        if not (old / "state.pt").exists() or (lock := _held(old)) is None:
            continue
        saved = json.loads((old / KEY_FILE).read_text()) if (old / KEY_FILE).exists() else None
        if saved == key:
            with lock:
                yield old
            return
        lock.close()
        print(f"note: the checkpoint {old} of these parameters is not resumed: it was {_difference(saved, key)}; "
              "training starts afresh", file=sys.stderr, flush=True)
    for number in count(1):
        folder = checkpoints / f"{prefix}-{_digest(key)[:8]}-{number}"
        folder.mkdir(exist_ok=True)
        if (folder / "state.pt").exists() or (lock := _held(folder)) is None:
            continue
        with lock:
            with atomic_file(folder / KEY_FILE) as partial:
                partial.write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
            yield folder
        return
