"""The seed's pictures: reconstructions, the manifold, the latent scatter, their animations, the curves; and a
conditional VAE's: the manifold under each label, its animation, the style transfer."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colormaps, font_manager  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

LATENT_LIMIT = 5  # the seed's fixed scatter axes, -5..5
FRAME_MS = {"manifold": 100, "scatter": 150}  # the seed's GIF frame intervals
DIGIT_CMAP = "tab10"  # one colour per digit in the latent scatter
SCATTER_GIF_DPI = 60  # the seed's GIF resolution: the 10-inch scatter figure as 600 x 600 pixel frames
# Decoded digits look the same with 15 grey levels, and 59 frames stay under 2 MB. An odd count puts a level at
# mid-grey, where an untrained decoder's outputs sit (they would flicker between two levels, which compresses
# badly), and leaves a 16th palette entry for the transparent pixels that mark what did not change.
MANIFOLD_GIF_GREYS = 15
TITLE_PX = 18  # the manifold title's font size in pixels; a title wider than the grid is set smaller
TITLE_BAND_PX = 30  # the white band above the manifold that holds its title
RECONSTRUCTION_SCALE = 2  # the reconstructions at each snapshot, 28-pixel digits drawn 56 pixels wide
# A conditional VAE's manifold per digit: ten panels, PANELS_PER_ROW to a row, each under a caption band reading
# "digit d", with a white gap between panels (across and down) and the title band above them all.
PANELS_PER_ROW = 5
PANEL_GAP_PX = 10
CAPTION_PX = 14  # the caption's font size in pixels
CAPTION_BAND_PX = 20
STYLE_GAP = 14  # the white gap (in image pixels, half a digit) between the test images and the decoded columns


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def _save_gif(frames: list[Image.Image], frame_ms: int, path: Path) -> Path:
    """A GIF that loops forever; Pillow's optimisation trims each frame's palette to the colours it uses and
    stores only what changed since the previous frame."""
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0,
                   optimize=True)
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


@lru_cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans, matplotlib's own font, so that the titles match the other figures'."""
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _title_font(title: str, width: int) -> ImageFont.FreeTypeFont:
    """TITLE_PX, or smaller so that the title fills at most 95% of `width` (a long note on the still)."""
    fitting_px = int(0.95 * width * TITLE_PX / _font(TITLE_PX).getlength(title))
    return _font(min(TITLE_PX, fitting_px))


def _titled_frame(width: int, height: int, title: str) -> Image.Image:
    """A white greyscale frame, `height` pixels under the band that holds the title."""
    frame = Image.new("L", (width, TITLE_BAND_PX + height), 255)
    ImageDraw.Draw(frame).text((width / 2, TITLE_BAND_PX / 2), title, fill=0, anchor="mm",
                               font=_title_font(title, width))
    return frame


def _manifold_frame(image: np.ndarray, title: str) -> Image.Image:
    """The uint8 grid pixel for pixel (no resampling, so every digit stays crisp) under a band with its title."""
    grid = Image.fromarray(image)
    frame = _titled_frame(grid.width, grid.height, title)
    frame.paste(grid, (0, TITLE_BAND_PX))
    return frame


def _latent_note(latent_dim: int) -> str:
    """What a manifold of more than two latent dimensions shows: the first two, the others at zero."""
    return "" if latent_dim <= 2 else f" (z[0], z[1]; the other {latent_dim - 2} dims at 0)"


def manifold(image: np.ndarray, epoch: int, latent_dim: int, path: Path) -> Path:
    """The decoded 15x15 grid (uint8 image) over the first two latent dimensions, the others at zero."""
    _manifold_frame(image, f"Epoch: {epoch}{_latent_note(latent_dim)}").save(path)
    return path


def _gif_greys(frame: Image.Image) -> Image.Image:
    """The frame with its greys rounded to MANIFOLD_GIF_GREYS levels: the 256 levels of a decoded grid defeat the
    GIF's compression (about 130 kB a frame against 30 kB)."""
    step = 255 / (MANIFOLD_GIF_GREYS - 1)
    return frame.point([round(round(value / step) * step) for value in range(256)])


def manifold_frames(images: np.ndarray, epochs: list[int]) -> list[Image.Image]:
    """The manifold at each snapshot, titled with its epoch: the seed's one grid (images (F, H, W)), or a
    conditional VAE's panel per digit (images (F, 10, h, w)); the GIF's frames and MLflow's images."""
    frame = _per_digit_frame if images.ndim == 4 else _manifold_frame
    return [_gif_greys(frame(image, f"Epoch: {epoch}")) for image, epoch in zip(images, epochs)]


def manifold_animation(images: np.ndarray, epochs: list[int], path: Path) -> Path:
    """One frame per snapshot (`manifold_frames`), its greys rounded to MANIFOLD_GIF_GREYS levels."""
    return _save_gif(manifold_frames(images, epochs), FRAME_MS["manifold"], path)


def _panel_origin(digit: int, height: int, width: int) -> tuple[int, int]:
    """The (left, top) pixel of digit `digit`'s panel in the per-digit frame: row digit // PANELS_PER_ROW,
    column digit % PANELS_PER_ROW, each panel under its caption band, all under the title band."""
    row, column = divmod(digit, PANELS_PER_ROW)
    top = TITLE_BAND_PX + row * (CAPTION_BAND_PX + height + PANEL_GAP_PX) + CAPTION_BAND_PX
    return column * (width + PANEL_GAP_PX), top


def _per_digit_frame(images: np.ndarray, title: str) -> Image.Image:
    """The (10, h, w) uint8 panels pixel for pixel (as _manifold_frame), each under its caption "digit d", in
    rows of PANELS_PER_ROW under a band with the title."""
    count, height, width = images.shape
    rows = -(-count // PANELS_PER_ROW)
    frame = _titled_frame(PANELS_PER_ROW * (width + PANEL_GAP_PX) - PANEL_GAP_PX,
                          rows * (CAPTION_BAND_PX + height + PANEL_GAP_PX) - PANEL_GAP_PX, title)
    draw = ImageDraw.Draw(frame)
    for digit, panel in enumerate(images):
        left, top = _panel_origin(digit, height, width)
        frame.paste(Image.fromarray(panel), (left, top))
        draw.text((left + width / 2, top - CAPTION_BAND_PX / 2), f"digit {digit}", fill=0, anchor="mm",
                  font=_font(CAPTION_PX))
    return frame


def manifold_per_digit(images: np.ndarray, epoch: int, latent_dim: int, path: Path) -> Path:
    """A conditional VAE's manifold: the same z grid decoded under each label, images uint8 (10, H, W) with
    panel d decoded under label d."""
    title = f"Epoch: {epoch}{_latent_note(latent_dim)} — the same z grid under each label"
    _per_digit_frame(images, title).save(path)
    return path


def _style_transfer_figure(originals: np.ndarray, decoded: np.ndarray) -> Figure:
    """One image: the test digits (float (10, 28, 28) in [0, 1], row i digit i) as a left column, a white gap of
    STYLE_GAP pixels, then decoded[i, d] (float (10, 10, 28, 28)) at row i, column d. Each column is labelled at
    the top ("test image", then the label d), each row on the left with its test digit."""
    rows, columns, side = len(originals), decoded.shape[1], originals.shape[-1]
    left = np.concatenate(list(originals), axis=0)
    right = decoded.transpose(0, 2, 1, 3).reshape(rows * side, columns * side)
    image = np.concatenate([left, np.ones((rows * side, STYLE_GAP)), right], axis=1)
    centre = (side - 1) / 2  # imshow puts pixel j's centre at x = j
    fig, ax = plt.subplots(figsize=(1 + 0.75 * image.shape[1] / side, 1.5 + 0.75 * rows))
    ax.imshow(image, cmap="Greys_r", vmin=0, vmax=1)
    ax.set_xticks([centre] + [side + STYLE_GAP + side * d + centre for d in range(columns)],
                  ["test image"] + [str(d) for d in range(columns)])
    ax.set_yticks([side * i + centre for i in range(rows)], [str(i) for i in range(rows)])
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("decoded under label", fontsize=12)
    ax.xaxis.set_label_coords((side + STYLE_GAP + columns * side / 2) / image.shape[1], 1.06)  # over the labels
    ax.set_ylabel("test digit", fontsize=12)
    ax.tick_params(length=0, labelsize=12)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title("Style transfer: each test digit (left), its z decoded under each label", fontsize=13, pad=10)
    return fig


def style_transfer(originals: np.ndarray, decoded: np.ndarray, path: Path) -> Path:
    """Each test digit's z (the mean of q(z|x, y)) decoded under every label: see _style_transfer_figure."""
    return _save(_style_transfer_figure(originals, decoded), path)


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
    artist = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap=DIGIT_CMAP, vmin=-0.5, vmax=9.5, s=4)
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


def _scatter_palette() -> Image.Image:
    """The scatter GIF's 32 colours: the ten digit colours, their half tints on white (the dots' antialiased
    edges) and twelve greys (text and axes). A fixed palette keeps every digit's colour exact in every frame."""
    digits = np.array(colormaps[DIGIT_CMAP].colors)
    greys = np.linspace(0, 1, 12)[:, None].repeat(3, axis=1)
    colours = np.concatenate([digits, (digits + 1) / 2, greys])
    palette = Image.new("P", (1, 1))
    palette.putpalette(np.round(colours * 255).astype(np.uint8).ravel().tolist())
    return palette


def latent_scatter_animation(frames: np.ndarray, labels: np.ndarray, epochs: list[int], path: Path) -> Path:
    """The latent means at each snapshot (frames (F, n, latent_dim)), on the final means' axes."""
    return _save_gif(latent_scatter_frames(frames, labels, epochs), FRAME_MS["scatter"], path)


def latent_scatter_frames(frames: np.ndarray, labels: np.ndarray, epochs: list[int]) -> list[Image.Image]:
    """The figure is drawn once without its dots and title, which are then drawn over a copy for each frame:
    the axes and colour key would otherwise be redrawn 59 times over."""
    basis, name = projection(frames[-1])
    fig, ax, points = _scatter_axes(frames[0] @ basis, labels, "")
    fig.set_dpi(SCATTER_GIF_DPI)
    points.set_visible(False)
    fig.canvas.draw()
    background = fig.canvas.copy_from_bbox(fig.bbox)
    points.set_visible(True)
    palette, images = _scatter_palette(), []
    for means, epoch in zip(frames, epochs):
        fig.canvas.restore_region(background)
        points.set_offsets(means @ basis)
        ax.title.set_text(f"Epoch: {epoch} — {name}")
        ax.draw_artist(points)
        ax.draw_artist(ax.title)
        rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
        images.append(rgb.quantize(palette=palette, dither=Image.Dither.NONE))
    plt.close(fig)
    return images


def snapshot_pictures(epochs: list[int], manifolds: np.ndarray, means: np.ndarray, labels: np.ndarray,
                      originals: np.ndarray, reconstructions: np.ndarray,
                      shown: list[int]) -> dict[str, list[tuple[int, Image.Image]]]:
    """The run's MLflow images: per key, (epoch, picture) at the snapshots `shown` (their indices), the manifold, the
    latent scatter (on the last shown snapshot's axes) and the test digits over their reconstructions. The keys'
    section, figures/, puts their cards first on the run page and in the chart view, before the learning curves."""
    steps = [epochs[i] for i in shown]
    pictures = {"figures/manifold": manifold_frames(manifolds[shown], steps),
                "figures/latent_scatter": latent_scatter_frames(means[shown], labels, steps),
                "figures/reconstructions": reconstruction_frames(originals, reconstructions[shown], steps)}
    return {key: list(zip(steps, frames)) for key, frames in pictures.items()}


def reconstruction_frames(originals: np.ndarray, decoded: np.ndarray, epochs: list[int]) -> list[Image.Image]:
    """The test digits (uint8 (n, 28, 28)) over their reconstructions at each snapshot (uint8 (F, n, 28, 28)), as
    `reconstructions` draws the final ones, each pixel shown RECONSTRUCTION_SCALE times over, titled with its
    epoch."""
    top = np.concatenate(list(originals), axis=1)
    frames = []
    for rows, epoch in zip(decoded, epochs):
        grid = Image.fromarray(np.concatenate([top, np.concatenate(list(rows), axis=1)], axis=0))
        grid = grid.resize((grid.width * RECONSTRUCTION_SCALE, grid.height * RECONSTRUCTION_SCALE), Image.NEAREST)
        frame = _titled_frame(grid.width, grid.height, f"Epoch: {epoch} — test digits over their reconstructions")
        frame.paste(grid, (0, TITLE_BAND_PX))
        frames.append(frame)
    return frames


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
