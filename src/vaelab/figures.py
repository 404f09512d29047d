"""The seed's pictures: reconstructions, the manifold, the latent scatter, their animations, the curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.animation import FuncAnimation, PillowWriter  # noqa: E402

LATENT_LIMIT = 5  # the seed's fixed scatter axes, -5..5
FRAME_MS = {"manifold": 100, "scatter": 150}  # the seed's GIF frame intervals


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def _animate(fig, show, frames: int, interval_ms: int, path: Path) -> Path:
    """Save `show(i)` for each frame as a GIF with Pillow (no ImageMagick needed)."""
    FuncAnimation(fig, show, frames=frames, interval=interval_ms).save(
        path, writer=PillowWriter(fps=1000 / interval_ms), dpi=60
    )
    plt.close(fig)
    return path


def reconstructions(originals: np.ndarray, decoded: np.ndarray, path: Path) -> Path:
    """Test digits (top row) over their reconstructions (bottom row), as the seed's plot_digits."""
    n = len(originals)
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in (originals, decoded)], axis=0)
    fig, ax = plt.subplots(figsize=(2 * n, 4))
    ax.imshow(grid, cmap="Greys_r", vmin=0, vmax=1)
    ax.set_title("Test digits (top) and their reconstructions (bottom)")
    ax.axis("off")
    return _save(fig, path)


def _manifold_axes(image: np.ndarray, title: str):
    fig, ax = plt.subplots(figsize=(10, 10))
    artist = ax.imshow(image, cmap="Greys_r", vmin=0, vmax=255)
    ax.set_title(title)
    ax.axis("off")
    return fig, ax, artist


def manifold(image: np.ndarray, epoch: int, latent_dim: int, path: Path) -> Path:
    """The decoded 15x15 grid (uint8 image) over the first two latent dimensions, the others at zero."""
    note = "" if latent_dim <= 2 else f" (z[0], z[1]; the other {latent_dim - 2} dims at 0)"
    fig, _, _ = _manifold_axes(image, f"Epoch: {epoch}{note}")
    return _save(fig, path)


def manifold_animation(images: np.ndarray, epochs: list[int], path: Path) -> Path:
    fig, ax, artist = _manifold_axes(images[0], f"Epoch: {epochs[0]}")

    def show(i):
        artist.set_array(images[i])
        ax.set_title(f"Epoch: {epochs[i]}")
        return (artist,)

    return _animate(fig, show, len(images), FRAME_MS["manifold"], path)


def projection(final_means: np.ndarray) -> tuple[np.ndarray, str]:
    """A fixed (latent_dim, 2) map to the plane and its name: the identity for 2 dimensions, else the first
    two principal components of the final latent means (so every frame uses the same axes)."""
    dim = final_means.shape[1]
    if dim == 1:
        return np.array([[1.0, 0.0]]), "z[0] (1-D latent)"
    if dim == 2:
        return np.eye(2), "z[0] vs z[1]"
    centred = final_means - final_means.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return components[:2].T, f"first two principal components of the final {dim}-D latent means"


def _scatter_axes(points: np.ndarray, labels: np.ndarray, title: str):
    fig, ax = plt.subplots(figsize=(10, 10))
    artist = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=4)
    fig.colorbar(artist, ax=ax, ticks=range(10), label="digit")
    ax.set_xlim(-LATENT_LIMIT, LATENT_LIMIT)
    ax.set_ylim(-LATENT_LIMIT, LATENT_LIMIT)
    ax.set_title(title)
    return fig, ax, artist


def latent_scatter(means: np.ndarray, labels: np.ndarray, epoch: int, path: Path) -> Path:
    """Latent means of test images coloured by digit, on fixed axes."""
    basis, name = projection(means)
    fig, _, _ = _scatter_axes(means @ basis, labels, f"Epoch: {epoch} — {name}")
    return _save(fig, path)


def latent_scatter_animation(frames: np.ndarray, labels: np.ndarray, epochs: list[int], path: Path) -> Path:
    basis, name = projection(frames[-1])
    fig, ax, artist = _scatter_axes(frames[0] @ basis, labels, f"Epoch: {epochs[0]} — {name}")

    def show(i):
        artist.set_offsets(frames[i] @ basis)
        ax.set_title(f"Epoch: {epochs[i]} — {name}")
        return (artist,)

    return _animate(fig, show, len(frames), FRAME_MS["scatter"], path)


def learning_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Train and validation negative ELBO, reconstruction and KL (nats per image) against the epoch."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, term, title in zip(axes, ("neg_elbo", "reconstruction", "kl"),
                               ("Negative ELBO", "Reconstruction -log p(x|z)", "KL(q(z|x) || p(z))")):
        for split in ("train", "val"):
            ax.plot(epochs, [row[f"{split}_{term}"] for row in history], label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
        ax.legend()
    if len(epochs) > 1 and history[0]["train_neg_elbo"] > 3 * history[-1]["train_neg_elbo"]:
        axes[0].set_yscale("log")
    fig.tight_layout()
    return _save(fig, path)
