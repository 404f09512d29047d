"""The render stage's GIFs: one frame per snapshot at native size, the seed's frame times, looping, small."""
import numpy as np
from matplotlib import colormaps
from PIL import Image

from vaelab import figures

GRID = 420  # the decoded 15 x 15 grid of 28 x 28 digits, in pixels


def digit_grids(mnist, count: int) -> np.ndarray:
    """`count` manifold-like uint8 grids, each of 225 different real test digits."""
    digits = mnist["test"].images.numpy()
    tiles = digits[np.arange(count * 225) % len(digits)].reshape(count, 15, 15, 28, 28)
    return tiles.transpose(0, 1, 3, 2, 4).reshape(count, GRID, GRID)


def gif_frames(path) -> tuple[list[np.ndarray], list[int], int | None]:
    """The frames as a viewer shows them (RGB), their durations in ms, and the loop count (0: forever)."""
    with Image.open(path) as gif:
        frames, durations = [], []
        for index in range(gif.n_frames):
            gif.seek(index)
            frames.append(np.asarray(gif.convert("RGB")))
            durations.append(gif.info["duration"])
        return frames, durations, gif.info.get("loop")


def test_manifold_gif_shows_each_snapshot_pixel_for_pixel_under_its_title(mnist, tmp_path):
    levels = np.round(np.linspace(0, 255, figures.MANIFOLD_GIF_GREYS))
    raw = digit_grids(mnist, 3)
    grids = levels[np.abs(raw[..., None] - levels).argmin(axis=-1)].astype(np.uint8)  # greys a GIF frame holds

    frames, durations, loop = gif_frames(figures.manifold_animation(grids, [1, 5, 9], tmp_path / "manifold.gif"))

    assert len(frames) == 3 and durations == [figures.FRAME_MS["manifold"]] * 3 and loop == 0
    for frame, grid in zip(frames, grids):
        assert frame.shape == frames[0].shape and frame.shape[1] == GRID  # the title is above the grid
        np.testing.assert_array_equal(frame[-GRID:], np.repeat(grid[..., None], 3, axis=-1))
    titles = [frame[:-GRID] for frame in frames]
    assert all((title < 128).any() for title in titles)  # dark text on the white band
    assert not np.array_equal(titles[0], titles[1])  # "Epoch: 1", "Epoch: 5"


def test_manifold_gif_rounds_other_greys_to_the_nearest_level(mnist, tmp_path):
    grid = digit_grids(mnist, 1)[0]
    frames, _, _ = gif_frames(figures.manifold_animation(grid[None], [1], tmp_path / "manifold.gif"))
    shown = frames[0][-GRID:, :, 0].astype(int)
    # a smoothing, scaling or one-pixel shift would be off by up to 255 at the digits' edges
    assert np.abs(shown - grid).max() <= 255 / (figures.MANIFOLD_GIF_GREYS - 1) / 2
    assert (shown[grid == 0] == 0).all() and (shown[grid == 255] == 255).all()


def test_manifold_gif_of_59_snapshots_stays_under_2_mb(mnist, tmp_path):
    grids = digit_grids(mnist, 59)  # every tile changes in every frame: harder than a training run's snapshots
    path = figures.manifold_animation(grids, list(range(1, 60)), tmp_path / "manifold.gif")
    assert path.stat().st_size < 2_000_000
    with Image.open(path) as gif:
        assert gif.n_frames == 59


def test_still_manifold_keeps_every_grey_and_fits_a_long_title(mnist, tmp_path):
    grid = digit_grids(mnist, 1)[0]
    path = figures.manifold(grid, 200, latent_dim=1024, path=tmp_path / "manifold.png")
    still = np.asarray(Image.open(path))
    assert still.shape[1] == GRID
    np.testing.assert_array_equal(still[-GRID:], grid)
    title_band = still[:-GRID]
    assert (title_band < 128).any() and (title_band[:, [0, -1]] == 255).all()  # the title, not cut at the sides


def test_scatter_gif_keeps_its_size_digit_colours_and_frame_times(tmp_path):
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 500, 2)).astype(np.float32)
    labels = np.arange(500) % 10

    frames, durations, loop = gif_frames(
        figures.latent_scatter_animation(means, labels, [1, 2, 3], tmp_path / "latent_scatter.gif"))

    assert len(frames) == 3 and durations == [figures.FRAME_MS["scatter"]] * 3 and loop == 0
    assert {frame.shape for frame in frames} == {(600, 600, 3)}
    digit_colours = {tuple(np.round(np.array(c) * 255).astype(int)) for c in colormaps[figures.DIGIT_CMAP].colors}
    for frame in frames:
        assert digit_colours <= {tuple(c) for c in np.unique(frame.reshape(-1, 3), axis=0)}  # the colour key
    assert not np.array_equal(frames[0], frames[1])  # the dots move
