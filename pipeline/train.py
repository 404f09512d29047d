"""Stage `train`: train the seed's VAE, log it to a new MLflow run, save weights, snapshots and history.

usage: python pipeline/train.py DATA_DIR MODEL_DIR HISTORY_CSV
"""
import torch
from tqdm import tqdm

from vaelab import config, data, tracking, training
from vaelab.model import save_vae
from vaelab.stages import atomic_file, paths, run_stage


def main(argv):
    params = config.load()
    data_dir, model_dir, history_csv = paths(argv, "DATA_DIR", "MODEL_DIR", "HISTORY_CSV")
    device = training.resolve_device(params.device)
    train_set, val_set, test_set = (data.load_split(data_dir, name) for name in data.SPLITS)
    snapshot_set = data.Split(*(t[: training.SNAPSHOT_IMAGES] for t in (test_set.images, test_set.labels)))

    with tracking.training_run(params) as run, tqdm(total=params.epochs, unit="epoch", desc=f"train on {device}") as bar:
        def on_epoch(row):
            run.log_epoch(row)
            bar.set_postfix(train=f"{row['train_neg_elbo']:.1f}", val=f"{row['val_neg_elbo']:.1f}", refresh=False)
            bar.update()

        result = training.train(
            params, data.to_float(train_set.images), data.to_float(val_set.images),
            data.to_float(snapshot_set.images), on_epoch=on_epoch,
        )
        with atomic_file(model_dir / "snapshots.pt") as path:
            torch.save(result.snapshots.to_dict(snapshot_set.labels), path)
        with atomic_file(history_csv) as path:
            training.save_history(result.history, path)
        with atomic_file(model_dir / "vae.pt") as path:
            save_vae(result.model, path)
        tracking.log_model(run.run_id, model_dir / "vae.pt", params.latent_dim)
        with atomic_file(model_dir / "run.json") as path:
            tracking.write_run_id(path, run.run_id)
    last = result.history[-1]
    print(f"epoch {last['epoch']}: val negative ELBO {last['val_neg_elbo']:.2f} nats/image; MLflow run {run.run_id}")


if __name__ == "__main__":
    run_stage(main)
