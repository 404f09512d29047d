"""What every stage script shares: a clean exit on bad input, and outputs that appear whole or not at all."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from vaelab.config import ParamsError
from vaelab.data import DataError

EXIT_BAD_INPUT = 2


def run_stage(main: Callable[[list[str]], None]) -> None:
    """Run a stage's `main(argv)`; a known error prints one clear line and exits non-zero, no traceback."""
    try:
        main(sys.argv[1:])
    except (ParamsError, DataError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class StageError(RuntimeError):
    """A problem the user can fix (wrong usage, missing device, unwritable folder)."""


def paths(argv: list[str], *names: str) -> list[Path]:
    if len(argv) != len(names):
        raise StageError(f"expected {len(names)} arguments ({' '.join(names)}), got {len(argv)}: {argv}")
    return [Path(arg) for arg in argv]


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it becomes `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


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
