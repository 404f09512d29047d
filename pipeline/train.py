"""Stage `train`: train the VAE params.yaml describes, log it to an MLflow run, save weights, snapshots and history.

usage: python pipeline/train.py DATA_DIR MODEL_DIR HISTORY_CSV

An interrupted training (Ctrl-C, SIGTERM, kill -9) resumes from its checkpoint when run again with the
same parameters, code and data, in the same MLflow run. Checkpoints live in .vaelab/checkpoints/ (or
$VAELAB_CHECKPOINTS), outside DVC's outputs, each in a folder that one training holds at a time (`resume.claim`).
A tracking server that goes away mid-run stops nothing: the metrics wait and go out when it is back; if it
is still away when training ends, the outputs are written, the checkpoint is kept, and running the stage
again sends what waits into the same run without training again.
"""
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from vaelab import access, config, data, handoff, resume, tracking, training
from vaelab.model import resolve_device
from vaelab.saved_model import save_vae
from vaelab.stages import (StageError, atomic_file, check_writable, paths, project_root, run_stage,
                           warn_if_cores_busy, write_rows)

CHECKPOINT_SECONDS = float(os.environ.get("VAELAB_CHECKPOINT_SECONDS", 60))


def main(argv):
    params = config.load()
    data_dir, model_dir, history_csv = paths(argv, "DATA_DIR", "MODEL_DIR", "HISTORY_CSV")
    check_writable(model_dir, history_csv)
    device = resolve_device(params.device)
    access.check_access(write=True)
    splits = [data.load_split(data_dir, name) for name in data.SPLITS]
    key = resume.training_key(params.training_dict(), [Path(__file__)],
                              [data_dir / f"{name}.pt" for name in data.SPLITS])
    warn_if_cores_busy(device)
    with resume.claim(resume.checkpoints_dir(project_root()), key) as checkpoint_dir:
        result, run_id = train_into_run(params, device, splits, data_dir, model_dir, history_csv, checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    last = result.history[-1]
    resumed = f" (resumed from its checkpoint at epoch {result.resumed_at})" if result.resumed_at else ""
    print(f"epoch {last['epoch']}{resumed}: val negative ELBO {last['val_neg_elbo']:.2f} nats/image; "
          f"MLflow run {run_id}")


def train_into_run(params, device, splits, data_dir, model_dir, history_csv, checkpoint_dir):
    """Train (or continue the checkpoint in `checkpoint_dir`) in the MLflow run the checkpoint names, or a new one,
    and write the stage's outputs; returns the result and the run's id."""
    train_set, val_set, test_set = splits
    snapshot_set = data.Split(*(t[: training.SNAPSHOT_IMAGES] for t in (test_set.images, test_set.labels)))
    run_id_file = checkpoint_dir / "run.json"
    resume_id = handoff.read_run_id(run_id_file) if resume.usable(checkpoint_dir / "state.pt") else None

    with tracking.training_run(params, resume_id) as run, tqdm(
        total=params.epochs, unit="epoch", desc=f"train on {device}"
    ) as bar:
        handoff.write_run_id(run_id_file, run.run_id)
        run.log_training_data(data_dir, {"train": "training", "val": "validation"})

        def on_epoch(row):
            run.log_epoch(row)
            if news := run.news():
                bar.write(news)
            status = {"train": f"{row['train_neg_elbo']:.1f}", "val": f"{row['val_neg_elbo']:.1f}"}
            if run.away:
                status["mlflow"] = f"{run.backlog} wait"  # short: a 100-column bar still shows it
            bar.set_postfix(status, refresh=False)
            bar.update(row["epoch"] - bar.n)  # a resumed run starts past its checkpoint's epoch

        checkpointing = resume.Checkpointing(checkpoint_dir / "state.pt", CHECKPOINT_SECONDS)
        try:
            result = training.train(
                params, data.model_inputs(train_set.images, params.binarize, "train"),
                data.model_inputs(val_set.images, params.binarize, "val"),
                data.model_inputs(snapshot_set.images, params.binarize, "test"),
                on_epoch=on_epoch, checkpointing=checkpointing,
                labels=(train_set.labels, val_set.labels, snapshot_set.labels),
            )
        except training.TrainingDiverged as diverged:
            shutil.rmtree(checkpoint_dir)  # resuming would only diverge again
            raise StageError(str(diverged)) from None
        bar.close()
        with atomic_file(model_dir / "snapshots.pt") as path:
            torch.save(result.snapshots.to_dict(snapshot_set.labels), path)
        with atomic_file(history_csv) as path:
            write_rows(result.history, path)
        with atomic_file(model_dir / "vae.pt") as path:
            save_vae(result.model, path)
        with atomic_file(model_dir / "run.json") as path:
            handoff.write_run_id(path, run.run_id)
        try:
            run.end("FINISHED", model=(model_dir / "vae.pt", result.model.config))
        except tracking.TrackerAway as away:  # the checkpoint stays, so that rerun trains nothing
            root = project_root()
            kept = checkpoint_dir.relative_to(root) if checkpoint_dir.is_relative_to(root) else checkpoint_dir
            raise tracking.TrackerAway(f"{away}; the checkpoint {kept} makes that rerun skip the training") from None
    return result, run.run_id


if __name__ == "__main__":
    run_stage(main)
