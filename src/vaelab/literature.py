"""The literature's comparisons (Burda et al. 2015) as runs of vaelab, and their record, reports/literature.json.

    python -m vaelab.literature run NAME [--device auto]   # train and evaluate one row; append its record
    python -m vaelab.literature table                       # the record as the Markdown table of docs/literature.md

A row stopped midway (Ctrl-C, a kill, the end of a session) continues from its checkpoint in .vaelab/literature/
when run again, with the result it would have had without the stop; its record says where it resumed.

Each row trains and evaluates as the train and evaluate stages do (the same `training.train` and
`metrics.test_results`): latent 50, dynamic binarization, Burda et al.'s learning-rate schedule over their 3280
epochs, the fixed binarized test set and K = 5000. vaelab trains on 55,000 images in batches of 500, so a row makes
360 k steps; `burda-vae-k1-paper` trains as the paper did, on 59,600 in batches of 20: 9.8 M steps. The record
says what each row did.
Importable with torch alone: `make gpu-literature` runs the rows on a GPU box (no MLflow, DVC or git there).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vaelab import bench, data, metrics, resume, training
from vaelab.config import MNIST_TRAIN_SIZE, Params, ParamsError
from vaelab.model import resolve_device
from vaelab.stages import EXIT_INTERRUPTED, atomic_file, interrupt_on_signal, warn_if_cores_busy

RECORD = Path("reports/literature.json")
CHECKPOINTS = Path(".vaelab/literature")
CHECKPOINT_SECONDS = 60.0  # a stop costs at most this much training again
# What every row shares: Burda et al.'s latent size, data, schedule and evaluation, without the seed's dropout
SHARED = dict(latent_dim=50, dropout=0.0, lr=1e-3, lr_schedule="burda", epochs=3280, binarize="dynamic",
              iwae_samples=5000)
BURDA = dict(architecture="burda", output_bias="data_mean")
# Burda et al.'s training: batches of 20 images, 400 of MNIST's 60,000 held out for validation (yburda/iwae's
# experiments.py and datasets.py)
PAPER_BATCH, PAPER_VALIDATION = 20, 400
WARMUP_EPOCHS = 200  # Sonderby et al. 2016 warm the KL weight up over the first 200 epochs on MNIST


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    changes: dict  # from SHARED
    reference: str  # the paper's figure for the same model and objective
    goal: float | None = None  # the bar: at most this many nats

    def params(self, device: str = "auto") -> Params:
        return Params(**{**SHARED, **self.changes, "device": device})

    def command(self) -> str:
        """The `dvc exp run` that trains and evaluates the same run through the pipeline."""
        settings = {**SHARED, **self.changes}
        return "dvc exp run " + " ".join(f"-S {key}={value}" for key, value in settings.items())


ROWS = [
    Row("seed-network", "the seed's network without dropout, zero output bias", {},
        "86.76 (Burda et al., VAE, k = 1)"),
    Row("seed-network-bias-warmup",
        f"the seed's network, data-mean output bias, KL warm-up over {WARMUP_EPOCHS} epochs",
        dict(output_bias="data_mean", kl_warmup_epochs=WARMUP_EPOCHS), "86.76 (Burda et al., VAE, k = 1)"),
    Row("burda-vae-k1", "Burda et al.'s network, ELBO, k = 1, data-mean output bias", BURDA,
        "86.76 (Burda et al.); 86.31 (nbip/IWAE)", 86.76),
    Row("burda-vae-k1-paper",
        f"Burda et al.'s network, ELBO, k = 1, data-mean output bias, the paper's batch of {PAPER_BATCH} and "
        f"{MNIST_TRAIN_SIZE - PAPER_VALIDATION:,} training images",
        {**BURDA, "batch_size": PAPER_BATCH, "val_size": PAPER_VALIDATION}, "86.76 (Burda et al.); 86.31 (nbip/IWAE)",
        86.76),
    Row("burda-iwae-k5", "Burda et al.'s network, IWAE, k = 5, data-mean output bias",
        {**BURDA, "objective": "iwae", "train_samples": 5}, "85.54 (Burda et al.); 85.18 (nbip/IWAE)", 85.54),
    Row("burda-iwae-k50", "Burda et al.'s network, IWAE, k = 50, data-mean output bias",
        {**BURDA, "objective": "iwae", "train_samples": 50}, "84.78 (Burda et al.); 84.59 (nbip/IWAE)", 84.78),
]
BY_NAME = {row.name: row for row in ROWS}
STAGE_ENDS = (1, 4, 13, 40, 121, 364, 1093, 3280)  # the last epoch of each of Burda et al.'s eight rates


def commit() -> str:
    """The code's commit: git's, or $VAELAB_COMMIT on a box that has a copy of the tree but no git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("VAELAB_COMMIT", "unknown")


def run(row: Row, splits: dict[str, data.Split], device: str = "auto", checkpoints: Path = CHECKPOINTS) -> dict:
    """Train and evaluate `row` as the stages do; returns its record. Prints the curve every 100 epochs.
    A checkpoint in `checkpoints` of an earlier, stopped run of the same row and settings is continued."""
    params = row.params(device)
    torch_device = resolve_device(params.device)
    inputs = {name: data.model_inputs(splits[name].images, params.binarize, name) for name in data.SPLITS}
    labels = tuple(splits[name].labels for name in ("train", "val")) + (
        splits["test"].labels[: training.SNAPSHOT_IMAGES],)
    folder = checkpoint_folder(row, params, checkpoints)
    checkpoint, progress_file = folder / "state.pt", folder / "progress.json"
    # the training seconds of earlier, stopped runs (epochs trained again after a stop included) and the epochs
    # they resumed at: only meaningful beside their checkpoint
    progress = {"train_s": 0.0, "resumed_at": []}
    if resume.usable(checkpoint):
        progress = json.loads(progress_file.read_text()) if progress_file.exists() else progress
        progress["resumed_at"].append(resume.epoch_of(checkpoint))
        print(f"{row.name}: continuing from its checkpoint {checkpoint} at epoch {progress['resumed_at'][-1]} "
              f"({progress['train_s']:.0f} s of training before)", flush=True)
    replayed = progress["resumed_at"][-1] if progress["resumed_at"] else 0
    train_s_before, start = progress["train_s"], time.perf_counter()

    def on_epoch(row_):
        if row_["epoch"] <= replayed:  # a resumed run first hands back the checkpoint's rows
            return
        progress["train_s"] = train_s_before + time.perf_counter() - start
        with atomic_file(progress_file) as path:  # a kill mid-write leaves the previous one whole
            path.write_text(json.dumps(progress))
        if row_["epoch"] % 100 == 0 or row_["epoch"] == params.epochs:
            print(f"{row.name}: epoch {row_['epoch']}/{params.epochs}, lr {row_['lr']:.2e}, val negative ELBO "
                  f"{row_['val_neg_elbo']:.3f}, {progress['train_s']:.0f} s", flush=True)

    result = training.train(params, inputs["train"], inputs["val"], inputs["test"][: training.SNAPSHOT_IMAGES],
                            on_epoch=on_epoch, labels=labels,
                            checkpointing=resume.Checkpointing(checkpoint, CHECKPOINT_SECONDS))
    train_s = train_s_before + time.perf_counter() - start
    model = result.model.to(torch_device)
    train_x = data.model_inputs(splits["train"].images, "static", "train").to(torch_device)
    start = time.perf_counter()
    results = metrics.test_results(model, inputs["test"].to(torch_device), splits["test"].labels.to(torch_device),
                                   train_x, splits["train"].labels.to(torch_device), params.seed, params.iwae_samples)
    return {
        "name": row.name, "what": row.what, "params": params.to_dict(), "epochs": params.epochs,
        "batch_size": params.batch_size, "steps": params.epochs * -(-len(inputs["train"]) // params.batch_size),
        "iwae_samples": params.iwae_samples,
        **{key: results[key] for key in ("test_iwae_nll", "test_neg_elbo", "test_active_units")},
        "device": bench.processor_name(torch_device), "train_s": round(train_s, 1),
        "evaluate_s": round(time.perf_counter() - start, 1), "commit": commit(),
        "date": datetime.date.today().isoformat(), "command": f"python -m vaelab.literature run {row.name}",
        "val_neg_elbo_at_stage_ends": {str(r["epoch"]): round(r["val_neg_elbo"], 3) for r in result.history
                                       if r["epoch"] in STAGE_ENDS},
        "resumed_at": progress["resumed_at"],  # the checkpoints' epochs it continued from, none for one go
    }


def checkpoint_folder(row: Row, params: Params, checkpoints: Path = CHECKPOINTS) -> Path:
    """Where a run of `row` keeps its checkpoint: a change of any training setting starts afresh."""
    return checkpoints / f"{row.name}-{params.digest()}"


def read(path: Path = RECORD) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def append(record: dict, path: Path = RECORD) -> None:
    """Add a record; earlier records stay (a row run again, or on another device, is a new line of the table)."""
    records = read(path) + [record]
    with atomic_file(path) as partial:
        partial.write_text(json.dumps(records, indent=2) + "\n")


def table(records: list[dict]) -> str:
    """The record as Markdown: one line per run, in the order of ROWS, with the paper's figure beside it and the
    command that runs it again (each record keeps the command it was run with)."""
    order = {row.name: i for i, row in enumerate(ROWS)}
    lines = ["| row | -log p(x), K = 5000 | negative ELBO | active units | goal | paper | device, training time | "
             "reproduce |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for record in sorted(records, key=lambda r: order.get(r["name"], len(order))):
        row = BY_NAME[record["name"]]
        met = row.goal is not None and record["test_iwae_nll"] <= row.goal
        verdict = "" if row.goal is None else f"{_goal(row)}: {'met' if met else 'not met'}"
        lines.append(f"| {record['name']}: {row.what}; {record['epochs']} epochs, batch {record['batch_size']} | "
                     f"{record['test_iwae_nll']:.2f} | {record['test_neg_elbo']:.2f} | "
                     f"{record['test_active_units']} of {record['params']['latent_dim']} | {verdict} | "
                     f"{row.reference} | {record['device']}, {record['train_s'] / 60:.0f} min{_runs(record)} | "
                     f"{_rerun(row)} |")
    for row in [row for row in ROWS if row.name not in {r["name"] for r in records}]:
        lines.append(f"| {row.name}: {row.what}; not run yet | | | | {_goal(row)} | {row.reference} | | "
                     f"{_rerun(row)} |")
    return "\n".join(lines)


def _goal(row: Row) -> str:
    return "" if row.goal is None else f"at most {row.goal}"


def _runs(record: dict) -> str:
    """How many runs trained a row that was stopped and continued (records older than resumption have none)."""
    resumed = record.get("resumed_at", [])
    return f" in {len(resumed) + 1} runs" if resumed else ""


def _rerun(row: Row) -> str:
    return f"`python -m vaelab.literature run {row.name}`"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train and evaluate rows; append their records",
                                     formatter_class=argparse.RawTextHelpFormatter)  # one row name a line
    run_parser.add_argument("names", nargs="+", choices=list(BY_NAME), metavar="NAME",
                            help="one or more of:\n" + "\n".join(BY_NAME))
    run_parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run_parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    run_parser.add_argument("--out", type=Path, default=RECORD)
    table_parser = commands.add_parser("table", help="print the record as Markdown")
    table_parser.add_argument("--out", type=Path, default=RECORD)
    args = parser.parse_args(argv)
    if args.command == "table":
        print(table(read(args.out)))
        return
    try:
        device = resolve_device(args.device)
    except ParamsError as error:
        parser.error(str(error).removeprefix("params.yaml: "))
    warn_if_cores_busy(device)
    signal.signal(signal.SIGTERM, interrupt_on_signal)  # the end of a session: the same one line as Ctrl-C
    for name in args.names:
        params = BY_NAME[name].params(args.device)
        try:  # the prepare stage's splits, or MNIST split again where a row holds out another number of images
            splits = data.load_or_prepare(args.data, params.val_size, params.seed)
        except data.DataError as error:
            parser.exit(2, f"error: {error}\n")
        folder = checkpoint_folder(BY_NAME[name], params)
        try:
            record = run(BY_NAME[name], splits, args.device)
        except KeyboardInterrupt as interrupt:
            parser.exit(EXIT_INTERRUPTED, f"{name}: interrupted ({interrupt or 'Ctrl-C'}); the same command continues "
                                          f"it from its checkpoint in {folder}\n")
        append(record, args.out)
        shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps({k: v for k, v in record.items() if k != "params"}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
