"""Training's checkpoints: everything `training.train` needs to continue a stopped run bit for bit (weights,
optimizer state, random number generators, history and snapshots), written whole or not at all."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from vaelab.data import DamagedInput, load_archive
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
