"""Stage `render`: the seed's pictures (reconstructions, manifold, latent scatter, their GIFs, learning
curves) into FIGURES_DIR and the MLflow run; for a conditional VAE the manifold under each digit in place of the
seed's one, and the style transfer. The manifold, the scatter and the reconstructions at the snapshot epochs also
go to the run as MLflow images (key, step = epoch), which its chart view lays side by side across runs.

usage: python pipeline/render.py DATA_DIR MODEL_DIR HISTORY_CSV FIGURES_DIR
"""
import torch

from vaelab import access, data, figures, handoff, metrics
from vaelab.config import load
from vaelab.manifold import manifold_images
from vaelab.model import DIGITS
from vaelab.saved_model import load_vae
from vaelab.stages import atomic_dir, check_writable, paths, read_history, read_snapshots, run_stage



def main(argv):
    params = load()
    data_dir, model_dir, history_csv, figures_dir = paths(argv, "DATA_DIR", "MODEL_DIR", "HISTORY_CSV", "FIGURES_DIR")
    check_writable(figures_dir)
    handoff.read_run_id(model_dir / "run.json", required=True)  # a damaged one stops the stage before any output
    model = load_vae(model_dir / "vae.pt", params.conditional, params.architecture)
    snapshots = read_snapshots(model_dir / "snapshots.pt")
    history = read_history(history_csv)
    test = data.load_split(data_dir, "test")
    access.check_access(write=True, patient=True)  # the run exists: a server away may be restarting
    epochs = snapshots["epochs"].tolist()  # 0 first: the untrained model, shown in MLflow's images only
    manifolds, means, labels = (snapshots[k].numpy() for k in ("manifolds", "latent_means", "labels"))
    trained = slice(1, None)  # the seed's frames: after each snapshot epoch
    shown = slice(0, metrics.RECONSTRUCTED_DIGITS)
    digits, digit_labels = data.to_float(test.images[shown]), test.labels[shown]
    latent_dim = model.config.latent_dim

    with atomic_dir(figures_dir) as out:
        figures.reconstructions(digits.reshape(-1, 28, 28).numpy(),
                                metrics.reconstruct(model, digits, digit_labels).numpy(), out / "reconstructions.png")
        if model.config.conditional:
            figures.manifold_per_digit(manifold_images(model).numpy(), epochs[-1], latent_dim,
                                       out / "manifold_per_digit.png")
            first_of_each = torch.stack([(test.labels == digit).nonzero()[0, 0] for digit in range(DIGITS)])
            originals = data.to_float(test.images[first_of_each])
            figures.style_transfer(originals.reshape(-1, 28, 28).numpy(),
                                   metrics.style_transfer(model, originals, test.labels[first_of_each]).numpy(),
                                   out / "style_transfer.png")
        else:
            figures.manifold(manifolds[-1], epochs[-1], latent_dim, out / "manifold.png")
        figures.manifold_animation(manifolds[trained], epochs[trained], out / "manifold.gif")
        figures.latent_scatter(means[-1], labels, epochs[-1], out / "latent_scatter.png")
        figures.latent_scatter_animation(means[trained], labels, epochs[trained], out / "latent_scatter.gif")
        figures.learning_curves(history, out / "learning_curves.png")
    images = figures.snapshot_pictures(epochs, manifolds, means, labels, test.images[shown].numpy(),
                                       snapshots["reconstructions"].numpy(), handoff.image_steps(len(epochs)))
    print(f"{len(list(figures_dir.iterdir()))} figures ({len(epochs) - 1} animation frames) -> {figures_dir}; "
          f"{len(images['figures/manifold'])} epochs of {', '.join(images)} -> MLflow images")
    handoff.add_to_run(model_dir / "run.json", "the figures", artifacts={figures_dir: "figures"}, images=images)


if __name__ == "__main__":
    run_stage(main)
