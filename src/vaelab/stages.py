"""What every stage script shares: a clean exit on bad input or a signal, output folders checked before
any work, and outputs that appear whole or not at all."""
from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from vaelab.config import ParamsError
from vaelab.data import NOT_FOUND, DamagedInput, DataError, load_archive

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class StageError(RuntimeError):
    """A problem the user can fix (wrong usage, an unwritable folder, an unreachable tracking server)."""


def interrupt_on_signal(signum, frame):
    """SIGTERM as Ctrl-C: a killed stage or tool unwinds as an interrupted one does."""
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def run_stage(main: Callable[[list[str]], None]) -> None:
    """Run a stage's `main(argv)` and say how long it took. A known error prints one clear line and exits 2, with
    no traceback; Ctrl-C and SIGTERM unwind cleanly (the MLflow run is marked KILLED) and exit 130."""
    signal.signal(signal.SIGTERM, interrupt_on_signal)
    try:
        main(sys.argv[1:])
        print(f"{Path(sys.argv[0]).stem}: done in {process_seconds():.1f} s", file=sys.stderr)
    except (ParamsError, DataError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({interrupt or 'Ctrl-C'}); run the stage again to resume", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def process_seconds() -> float:
    """How long this process has run, Python's and PyTorch's start-up included (Linux's /proc; elsewhere from the
    import of this module): `vaelab slurm timings` tells a stage's time from DVC's own with it."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()


def busy_cores(seconds: float = 0.5) -> float | None:
    """How many of this process's cores other work kept busy over `seconds`, from Linux's /proc/stat (None
    elsewhere). Call it while this process waits, so that the figure is the others' alone."""
    cores = {f"cpu{core}" for core in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else set()

    def busy_and_total() -> tuple[int, int]:
        busy = total = 0
        with open("/proc/stat") as stat:
            for line in stat:
                name, *ticks = line.split()
                if name in cores:  # user nice system idle iowait irq softirq steal (guest is inside user)
                    numbers = [int(tick) for tick in ticks[:8]]
                    busy, total = busy + sum(numbers) - numbers[3] - numbers[4], total + sum(numbers)
        return busy, total

    try:
        busy_before, total_before = busy_and_total()
        time.sleep(seconds)
        busy_after, total_after = busy_and_total()
    except OSError:
        return None
    if total_after <= total_before:
        return None
    return len(cores) * (busy_after - busy_before) / (total_after - total_before)


def oversubscription(threads: int, cores: int, busy: float) -> str | None:
    """The warning for PyTorch's `threads` on `cores` of which other work keeps `busy` busy, or None when
    its threads fit the idle ones. Its threads wait for each other at every operation, so one that lost its
    core holds them all up."""
    idle = cores - busy
    if threads == 1 or busy < 0.5 or threads <= idle + 0.5:
        return None
    return (f"warning: {busy:.1f} of {cores} CPU cores are busy elsewhere, so {threads} PyTorch threads stall "
            f"(docs/speed.md); use OMP_NUM_THREADS={max(1, round(idle))}")


def warn_if_cores_busy(device: torch.device) -> None:
    """Say in one line when a CPU stage's threads do not fit the idle cores. The thread count stays: it
    changes float rounding, so only the user may change it (OMP_NUM_THREADS)."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1 and (busy := busy_cores()) is not None:
        if warning := oversubscription(threads, len(os.sched_getaffinity(0)), busy):
            print(warning, file=sys.stderr, flush=True)


def project_root() -> Path:
    """The repository root. Under `dvc exp run --queue`, DVC_ROOT names the user's repository rather than
    the temporary copy the experiment runs in, so stores and checkpoints are shared by every run."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def paths(argv: list[str], *names: str) -> list[Path]:
    if len(argv) != len(names):
        raise StageError(f"expected {len(names)} arguments ({' '.join(names)}), got {len(argv)}: {argv}")
    return [Path(arg) for arg in argv]


def check_writable(*outputs: Path) -> None:
    """Fail before any work if an output could not be created; leaves nothing behind."""
    for output in outputs:
        path = Path(os.path.abspath(output))
        ancestor = path if path.is_dir() else path.parent  # an existing file is replaced: its folder must be writable
        while not ancestor.exists():
            ancestor = ancestor.parent
        try:
            if not ancestor.is_dir():
                raise NotADirectoryError(f"{ancestor} is a file")
            tempfile.TemporaryDirectory(dir=ancestor).cleanup()
        except OSError as error:
            raise StageError(f"cannot write the output {output}: {error}") from None


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it becomes `path` only if the block succeeds, and reaches the disk
    (fsync of the file, then of its folder) before it replaces the old one.

    The temporary file has `path`'s own name, in a temporary folder: `torch.save` records the file name
    inside the archive, and the same data must give the same bytes (and DVC hash) on every run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield folder / path.name
        _sync(folder / path.name)
        os.replace(folder / path.name, path)
        _sync(path.parent)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds, its files on the
    disk first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield temporary
        for folder, _, files in os.walk(temporary):
            for name in files:
                _sync(Path(folder, name))
            _sync(Path(folder))
        if path.exists():
            shutil.rmtree(path)
        os.replace(temporary, path)
        _sync(path.parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _sync(path: Path) -> None:
    """Make `path` (a file, or a folder's list of names) reach the disk before what depends on it: a rename is
    only as durable as the data it points to, and after a power cut the renamed file would read empty."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_rows(rows: list[dict], path: Path) -> None:
    """A table as CSV with a header, for `dvc plots` (learning curves, per-digit and per-dimension values)."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


HISTORY_COLUMNS = ("epoch", "train_neg_elbo", "val_neg_elbo", "train_reconstruction", "val_reconstruction",
                   "train_kl", "val_kl")  # those the learning curves draw


def read_history(path: Path) -> list[dict[str, float]]:
    """The train stage's history CSV back as rows: the epoch an int, the rest floats. A missing, truncated or foreign
    file is a DamagedInput that names it; DVC does not cache the file (dvc.yaml), so its cure is to train again."""

    def damaged(problem: str) -> DamagedInput:
        return DamagedInput(path, problem, "train", cached=False)

    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise damaged(NOT_FOUND) from None
    except IsADirectoryError:
        raise damaged("is a folder, not a file") from None
    except OSError as error:
        raise damaged(f"cannot be read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise damaged("is not a CSV text (a binary file)") from None
    if not text.endswith("\n"):  # csv writes whole lines: a file cut anywhere else ends without one
        raise damaged("is empty" if not text else "is truncated (its last line is cut short)")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if missing := [column for column in HISTORY_COLUMNS if column not in (reader.fieldnames or [])]:
        raise damaged(f"is not a training history (no column {missing[0]}{', ...' if len(missing) > 1 else ''})")
    rows = []
    for row in reader:
        if None in row or None in row.values():  # more fields than the header names, or fewer
            fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
            header = len(reader.fieldnames)
            raise damaged(f"is damaged (line {reader.line_num} has {fields} fields, its header {header})")
        try:
            rows.append({k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()})
        except ValueError:
            raise damaged(f"is damaged (line {reader.line_num} holds a value that is not a number)") from None
    if not rows:
        raise damaged("holds no epochs (only its header)")
    return rows


SNAPSHOT_KEYS = ("epochs", "manifolds", "latent_means", "reconstructions", "labels")  # train's snapshots.pt


def read_snapshots(path: Path) -> dict[str, torch.Tensor]:
    """The train stage's snapshots: the epochs, the manifold, the latent means and the reconstructions at each, the
    means' labels. A missing, damaged or foreign file is a DamagedInput that names it."""
    saved = load_archive(path, "train")
    tensors = saved if isinstance(saved, dict) else {}
    if missing := [key for key in SNAPSHOT_KEYS if not isinstance(tensors.get(key), torch.Tensor)]:
        raise DamagedInput(path, f"is not a snapshots file (no {missing[0]}{', ...' if len(missing) > 1 else ''})",
                           "train")
    epochs, manifolds, means, reconstructions, labels = (saved[k] for k in SNAPSHOT_KEYS)
    if not (epochs.dim() == 1 and len(epochs) and manifolds.dim() in (3, 4) and means.dim() == 3 and labels.dim() == 1
            and reconstructions.dim() == 4 and len(manifolds) == len(means) == len(reconstructions) == len(epochs)
            and means.shape[1] == len(labels)):
        raise DamagedInput(path, "holds snapshots whose parts do not match", "train")
    return saved
