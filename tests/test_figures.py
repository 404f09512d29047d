"""The render stage's figures: GIFs of one frame per snapshot at native size, the seed's frame times, looping,
small; a conditional VAE's manifold per label and its style transfer, each showing its inputs where its labels
say."""
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


def panel_grids(mnist, count: int, size: int) -> np.ndarray:
    """`count` per-label manifolds like a conditional VAE's, uint8 (count, 10, size*28, size*28): panel d holds
    size x size real test images of digit d, each tile a different image from the same tile a frame before."""
    digits, labels = mnist["test"].images.numpy(), mnist["test"].labels.numpy()
    panels = []
    for digit in range(10):
        own = digits[labels == digit]
        tiles = own[np.arange(count * size * size) % len(own)].reshape(count, size, size, 28, 28)
        panels.append(tiles.transpose(0, 1, 3, 2, 4).reshape(count, size * 28, size * 28))
    return np.stack(panels, axis=1)


def panel_origin(digit: int, side: int) -> tuple[int, int]:
    """Where (top, left) the layout constants put digit `digit`'s panel of side x side pixels."""
    row, column = divmod(digit, figures.PANELS_PER_ROW)
    caption, gap = figures.CAPTION_BAND_PX, figures.PANEL_GAP_PX
    return figures.TITLE_BAND_PX + row * (caption + side + gap) + caption, column * (side + gap)


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


def test_per_digit_manifold_shows_each_label_s_panel_pixel_for_pixel_under_its_caption(mnist, tmp_path):
    panels = panel_grids(mnist, 1, 15)[0]
    side, gap, caption_px = GRID, figures.PANEL_GAP_PX, figures.CAPTION_BAND_PX

    with Image.open(figures.manifold_per_digit(panels, 200, latent_dim=1024, path=tmp_path / "m.png")) as png:
        assert png.mode == "L"
        still = np.asarray(png)

    assert figures.PANELS_PER_ROW == 5 and still.shape == (
        figures.TITLE_BAND_PX + 2 * (caption_px + side) + gap, 5 * side + 4 * gap)  # 2 rows of 5, nothing else
    captions = []
    for digit, panel in enumerate(panels):
        top, left = panel_origin(digit, side)
        np.testing.assert_array_equal(still[top:top + side, left:left + side], panel)
        caption = still[top - caption_px:top, left:left + side]
        ink = np.nonzero((caption < 128).any(axis=0))[0]
        assert ink.size and abs((ink.min() + ink.max()) / 2 - side / 2) < 5  # dark text centred over its panel
        captions.append(caption.tobytes())
        if digit % 5 < 4:  # the white gap to the right of the panel, from its caption down
            assert (still[top - caption_px:top + side, left + side:left + side + gap] == 255).all()
    assert len(set(captions)) == 10  # "digit 0" ... "digit 9"
    assert (still[panel_origin(0, side)[0] + side:panel_origin(5, side)[0] - caption_px] == 255).all()  # the row gap
    title_band = still[:figures.TITLE_BAND_PX]
    assert (title_band < 128).any() and (title_band[:, [0, -1]] == 255).all()  # the long title, not cut at the sides


def test_per_digit_gif_shows_each_snapshot_s_panels_in_the_gif_s_greys(mnist, tmp_path):
    snapshots = panel_grids(mnist, 3, 5)
    side = snapshots.shape[-1]
    levels = np.linspace(0, 255, figures.MANIFOLD_GIF_GREYS)  # each grey shown as its nearest level, rounded
    rounded = np.round(levels[np.abs(snapshots[..., None] - levels).argmin(axis=-1)]).astype(np.uint8)

    frames, durations, loop = gif_frames(
        figures.manifold_animation(snapshots, [1, 5, 9], tmp_path / "manifold_per_digit.gif"))

    assert len(frames) == 3 and durations == [figures.FRAME_MS["manifold"]] * 3 and loop == 0
    for frame, panels in zip(frames, rounded):
        assert frame.shape == frames[0].shape
        for digit, panel in enumerate(panels):
            top, left = panel_origin(digit, side)
            np.testing.assert_array_equal(frame[top:top + side, left:left + side],
                                          np.repeat(panel[..., None], 3, axis=-1))
    titles = [frame[:figures.TITLE_BAND_PX] for frame in frames]
    assert all((title < 128).any() for title in titles)  # dark text on the white band
    assert not np.array_equal(titles[0], titles[1])  # "Epoch: 1", "Epoch: 5"


def test_per_digit_gif_of_59_snapshots_stays_under_2_mb(mnist, tmp_path):
    snapshots = panel_grids(mnist, 59, 5)  # every tile changes in every frame: harder than a training run's
    # (about 1.99 MB with Pillow 13; unrelated digits in a panel, not all d's, make about 2.03 MB)
    path = figures.manifold_animation(snapshots, list(range(1, 60)), tmp_path / "manifold_per_digit.gif")
    assert path.stat().st_size < 2_000_000
    with Image.open(path) as gif:
        assert gif.n_frames == 59


def test_style_transfer_shows_each_test_digit_and_its_decodings_under_their_labels(mnist, tmp_path):
    digits, labels = mnist["test"].images.numpy() / 255, mnist["test"].labels.numpy()
    originals = np.stack([digits[labels == i][0] for i in range(10)])
    decoded = np.stack([[digits[labels == d][1 + i] for d in range(10)] for i in range(10)])  # stand-ins: real d's

    fig = figures._style_transfer_figure(originals, decoded)
    (ax,) = fig.axes
    shown = np.asarray(ax.images[0].get_array())
    columns = [label.get_text() for label in ax.get_xticklabels()]
    rows = [label.get_text() for label in ax.get_yticklabels()]
    assert columns == ["test image"] + [str(d) for d in range(10)] and rows == [str(i) for i in range(10)]
    assert ax.xaxis.get_ticks_position() == "top"
    assert ax.images[0].get_cmap().name == "Greys_r" and ax.images[0].get_clim() == (0, 1)

    def tile(y: float, x: float) -> np.ndarray:  # the 28 x 28 digit centred on a row's and a column's tick
        top, left = round(y - 13.5), round(x - 13.5)
        return shown[top:top + 28, left:left + 28]

    xs, ys = ax.get_xticks(), ax.get_yticks()
    for i in range(10):
        np.testing.assert_array_equal(tile(ys[i], xs[0]), originals[i])
        for d in range(10):
            np.testing.assert_array_equal(tile(ys[i], xs[1 + d]), decoded[i, d])
    gap = shown[:, 28:round(xs[1] - 13.5)]
    assert gap.shape[1] >= 7 and (gap == 1).all()  # a white gap between the test images and the decoded ones

    fig.set_dpi(80)  # as style_transfer saves it
    fig.canvas.draw()
    axes_px = ax.get_window_extent().width
    assert axes_px / shown.shape[1] * 28 >= 28  # each digit at least 28 pixels wide
    assert all(label.get_fontsize() >= 10 for label in ax.get_xticklabels() + ax.get_yticklabels())
    with Image.open(figures.style_transfer(originals, decoded, tmp_path / "style_transfer.png")) as png:
        assert png.width >= axes_px  # the saved picture holds the axes at that size


def test_each_snapshots_reconstructions_show_the_test_digits_over_their_decoded_images_at_twice_the_size(mnist):
    originals = mnist["test"].images[:10].numpy()
    decoded = np.stack([255 - originals, originals // 2])  # two snapshots, told apart by their pixels
    frames = figures.reconstruction_frames(originals, decoded, [1, 7])
    scale, band = figures.RECONSTRUCTION_SCALE, figures.TITLE_BAND_PX
    for frame, rows in zip(frames, decoded):
        shown = np.asarray(frame)
        assert shown.shape == (band + 2 * 28 * scale, 10 * 28 * scale)
        grid = shown[band:][::scale, ::scale]  # one pixel of each scale x scale block
        np.testing.assert_array_equal(grid[:28], np.concatenate(list(originals), axis=1))
        np.testing.assert_array_equal(grid[28:], np.concatenate(list(rows), axis=1))
        assert (shown[:band] < 128).any()  # the title, dark on the white band
    assert not np.array_equal(np.asarray(frames[0])[:band], np.asarray(frames[1])[:band])  # "Epoch: 1", "Epoch: 7"


def test_the_manifolds_frames_are_the_gifs_seed_grid_or_panel_per_digit(mnist, tmp_path):
    grids, panels = digit_grids(mnist, 2), panel_grids(mnist, 2, 5)
    for images, name in ((grids, "manifold.gif"), (panels, "per_digit.gif")):
        frames = figures.manifold_frames(images, [3, 9])
        shown, _, _ = gif_frames(figures.manifold_animation(images, [3, 9], tmp_path / name))
        assert [np.asarray(f.convert("RGB")).tolist() for f in frames] == [f.tolist() for f in shown]
