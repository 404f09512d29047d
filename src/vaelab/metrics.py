"""Test-set metrics of a trained VAE, in nats per image (the units papers report)."""
from __future__ import annotations

import torch

from vaelab.model import VAE, SEED_LOSS_SCALE, negative_elbo

EVAL_BATCH = 1000


@torch.no_grad()
def reconstruct(model: VAE, images: torch.Tensor) -> torch.Tensor:
    """Decode each image's latent mean: the deterministic reconstruction (n, 28, 28) in [0, 1]."""
    return model.decode(model.encoder(images)[0])


@torch.no_grad()
def test_metrics(model: VAE, images: torch.Tensor, seed: int) -> dict[str, float]:
    """Negative ELBO and its reconstruction and KL parts (one seeded z sample per image), the seed's
    scaled loss, and the per-pixel MSE of the mean reconstruction. `model` must be in eval mode."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    totals = torch.zeros(4, dtype=torch.float64)
    for start in range(0, len(images), EVAL_BATCH):
        x = images[start : start + EVAL_BATCH]
        logits, mean, log_var = model(x)
        neg_elbo, reconstruction, kl = negative_elbo(logits, x, mean, log_var)
        squared_error = (reconstruct(model, x).reshape(len(x), -1) - x).square().mean(dim=1)
        totals += torch.stack([neg_elbo.sum(), reconstruction.sum(), kl.sum(), squared_error.sum()]).double()
    torch.random.set_rng_state(generator_state)
    neg_elbo, reconstruction, kl, mse = (totals / len(images)).tolist()
    return {
        "neg_elbo": neg_elbo,
        "reconstruction": reconstruction,
        "kl": kl,
        "seed_loss": neg_elbo / SEED_LOSS_SCALE,
        "mse_per_pixel": mse,
    }
