"""The `vaelab` command: `vaelab compare` (the comparison report), `vaelab bench` (the speed benchmark),
`vaelab slurm` (a grid as a Slurm job array) and `vaelab ui-link` (the MLflow UI page to open, which `make ui`
prints)."""
from __future__ import annotations

import sys

USAGE = "usage: vaelab {compare,bench,slurm,ui-link} [options]   (vaelab COMMAND --help for its options)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("compare", "bench", "slurm", "ui-link"):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    from vaelab.stages import StageError

    if argv[0] == "ui-link":
        from vaelab.store import ui_link

        link = ui_link()
        print(f"Open the experiment's runs: {link}" if "#/experiments/" in link else
              f"No runs in mlflow.db yet (run `dvc repro` first); the MLflow UI: {link}")
        return
    try:
        if argv[0] == "compare":
            from vaelab.compare import main as command
        elif argv[0] == "slurm":
            from vaelab.slurm import main as command
        else:
            from vaelab.bench import main as command
        command(argv[1:])
    except StageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
