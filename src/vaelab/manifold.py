"""The seed's latent manifold: a grid of latent vectors, decoded into one image (one per digit for a conditional VAE)."""
from __future__ import annotations

import torch

from vaelab.model import DIGITS, VAE

MANIFOLD_SIZE = 15  # the seed's manifold: a 15 x 15 grid of decoded digits


def manifold_grid(size: int = MANIFOLD_SIZE) -> torch.Tensor:
    """The seed's grid: norm.ppf(linspace(0.05, 0.95, size)) on each axis."""
    return torch.special.ndtri(torch.linspace(0.05, 0.95, size, dtype=torch.float64)).float()


def manifold_latents(latent_dim: int, size: int = MANIFOLD_SIZE) -> torch.Tensor:
    """(size*size, latent_dim) latents: row i varies the second dimension, column j the first; others 0."""
    grid = manifold_grid(size)
    z = torch.zeros(size * size, latent_dim)
    z[:, 0] = grid.repeat(size)
    if latent_dim > 1:
        z[:, 1] = grid.repeat_interleave(size)
    return z


def manifold_image(model: VAE, size: int = MANIFOLD_SIZE, label: int | None = None) -> torch.Tensor:
    """The decoded size x size grid (under the digit `label`, for a conditional VAE) as one uint8 image, tiles
    placed as the seed's draw_manifold does."""
    device = next(model.parameters()).device
    z = manifold_latents(model.config.latent_dim, size).to(device)
    labels = None if label is None else torch.full((len(z),), label, device=device)
    digits = model.decode(z, labels)
    tiles = digits.reshape(size, size, 28, 28).permute(0, 2, 1, 3).reshape(size * 28, size * 28)
    return (tiles * 255).round().to(torch.uint8).cpu()


def manifold_images(model: VAE, size: int = MANIFOLD_SIZE) -> torch.Tensor:
    """The seed's manifold (size*28, size*28), or for a conditional VAE the same z grid decoded under each
    digit (10, size*28, size*28); uint8."""
    if not model.config.conditional:
        return manifold_image(model, size)
    return torch.stack([manifold_image(model, size, digit) for digit in range(DIGITS)])
