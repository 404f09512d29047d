"""The `vaelab` command: `vaelab compare` (the comparison report) and `vaelab bench` (the speed benchmark)."""
from __future__ import annotations

import sys

USAGE = "usage: vaelab {compare,bench} [options]   (vaelab COMMAND --help for its options)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("compare", "bench"):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    from vaelab.stages import StageError

    try:
        if argv[0] == "compare":
            from vaelab.compare import main as command
        else:
            from vaelab.bench import main as command
        command(argv[1:])
    except StageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
