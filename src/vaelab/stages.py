"""What every stage script shares: a clean exit on bad input or a signal, output folders checked before
any work, and outputs that appear whole or not at all."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from vaelab.config import ParamsError
from vaelab.data import DataError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class StageError(RuntimeError):
    """A problem the user can fix (wrong usage, an unwritable folder, an unreachable tracking server)."""


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def run_stage(main: Callable[[list[str]], None]) -> None:
    """Run a stage's `main(argv)`. A known error prints one clear line and exits 2, with no traceback;
    Ctrl-C and SIGTERM unwind cleanly (the MLflow run is marked KILLED) and exit 130."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main(sys.argv[1:])
    except (ParamsError, DataError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({interrupt or 'Ctrl-C'}); run the stage again to resume", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


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
    """Yield a temporary path beside `path`; it becomes `path` only if the block succeeds.

    The temporary file has `path`'s own name, in a temporary folder: `torch.save` records the file name
    inside the archive, and the same data must give the same bytes (and DVC hash) on every run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield folder / path.name
        os.replace(folder / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield temporary
        if path.exists():
            shutil.rmtree(path)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def write_rows(rows: list[dict], path: Path) -> None:
    """A table as CSV with a header, for `dvc plots` (learning curves, per-digit and per-dimension values)."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_history(path: Path) -> list[dict[str, float]]:
    """The train stage's history CSV back as rows: the epoch an int, the rest floats."""
    with open(path, newline="") as file:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(file)]
