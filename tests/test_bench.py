"""The benchmark's FLOP count, which its GFLOP/s figure rests on, against PyTorch's own counter."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from vaelab.bench import training_gflop_per_epoch
from vaelab.model import VAE, ModelConfig, negative_elbo


def test_flop_count_matches_pytorchs_counter_for_one_training_step():
    model = VAE(ModelConfig(latent_dim=8)).train()
    x = torch.rand(100, 784)
    with FlopCounterMode(display=False) as counter:
        logits, mean, log_var = model(x)
        negative_elbo(logits, x, mean, log_var)[0].mean().backward()
    assert counter.get_total_flops() == training_gflop_per_epoch(8, 100) * 1e9
