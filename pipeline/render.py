"""Stage `render`: the seed's pictures (reconstructions, manifold, latent scatter, their GIFs, learning
curves) into FIGURES_DIR and the MLflow run.

usage: python pipeline/render.py DATA_DIR MODEL_DIR HISTORY_CSV FIGURES_DIR
"""
import torch

from vaelab import data, figures, metrics, tracking
from vaelab.config import load
from vaelab.model import load_vae
from vaelab.stages import atomic_dir, check_writable, paths, read_history, run_stage

RECONSTRUCTED_DIGITS = 10


def main(argv):
    load()  # validate params.yaml, though no picture depends on it
    data_dir, model_dir, history_csv, figures_dir = paths(argv, "DATA_DIR", "MODEL_DIR", "HISTORY_CSV", "FIGURES_DIR")
    check_writable(figures_dir)
    tracking.check_reachable(patient=True)  # the run exists: a server away may be restarting
    model = load_vae(model_dir / "vae.pt")
    snapshots = torch.load(model_dir / "snapshots.pt", weights_only=True)
    epochs = snapshots["epochs"].tolist()
    manifolds, means, labels = (snapshots[k].numpy() for k in ("manifolds", "latent_means", "labels"))
    digits = data.to_float(data.load_split(data_dir, "test").images[:RECONSTRUCTED_DIGITS])

    with atomic_dir(figures_dir) as out:
        figures.reconstructions(
            digits.reshape(-1, 28, 28).numpy(), metrics.reconstruct(model, digits).numpy(), out / "reconstructions.png"
        )
        figures.manifold(manifolds[-1], epochs[-1], model.config.latent_dim, out / "manifold.png")
        figures.manifold_animation(manifolds, epochs, out / "manifold.gif")
        figures.latent_scatter(means[-1], labels, epochs[-1], out / "latent_scatter.png")
        figures.latent_scatter_animation(means, labels, epochs, out / "latent_scatter.gif")
        figures.learning_curves(read_history(history_csv), out / "learning_curves.png")
    print(f"{len(list(figures_dir.iterdir()))} figures ({len(epochs)} animation frames) -> {figures_dir}")
    tracking.add_to_run(model_dir / "run.json", "the figures", artifacts={figures_dir: "figures"})


if __name__ == "__main__":
    run_stage(main)
