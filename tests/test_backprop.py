"""The hand-written training step computes what autograd computes on the same model."""
import copy

import pytest
import torch

from vaelab.backprop import FastStep
from vaelab.model import VAE, ModelConfig, negative_elbo, SEED_LOSS_SCALE, training_objective, with_label

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]
ONEDNN = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
KERNELS = [("cpu", "mm"), ("cpu", pytest.param("onednn", marks=ONEDNN)),
           pytest.param("cuda", "mm", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def _autograd_step(model: VAE, x: torch.Tensor, masks: list[torch.Tensor], kl_weight: float,
                   labels: torch.Tensor | None) -> torch.Tensor:
    """The seed's loss (with the KL term weighted) through the nn.Module's own layers, with the given
    dropout masks (and labels, for a conditional VAE)."""
    enc, dec = model.encoder.body, model.decoder.net
    h = enc[2](enc[1](enc[0](with_label(x, labels, model.config)))) * masks[0]
    h = enc[6](enc[5](enc[4](h))) * masks[1]
    mean, log_var = model.encoder.mean(h), model.encoder.log_var(h)
    z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
    d = dec[2](dec[1](dec[0](with_label(z, labels, model.config)))) * masks[2]
    d = dec[6](dec[5](dec[4](d))) * masks[3]
    terms = negative_elbo(dec[8](d), x, mean, log_var)
    (training_objective(terms[1], terms[2], kl_weight).mean() / SEED_LOSS_SCALE).backward()
    return torch.stack([t.sum() for t in terms]).detach()


@pytest.mark.parametrize("device, kernel", KERNELS)
@pytest.mark.parametrize("dropout, latent_dim, kl_weight, conditional",
                         [(0.3, 2, 1.0, False), (0.0, 5, 1.0, False), (0.3, 4, 0.25, False), (0.0, 3, 4.0, False),
                          (0.3, 2, 1.0, True), (0.0, 8, 0.25, True), (0.3, 3, 4.0, True)])
def test_gradients_statistics_and_batchnorm_state_match_autograd(mnist, dropout, latent_dim, kl_weight, conditional,
                                                                 device, kernel):
    torch.manual_seed(0)
    model = VAE(ModelConfig(latent_dim, dropout, conditional)).to(device).train()
    reference = copy.deepcopy(model)
    x = (mnist["train"].images[:300].reshape(300, -1).float() / 255).to(device)
    labels = mnist["train"].labels[:300].to(device) if conditional else None
    step = FastStep(model, kl_weight, kernel)
    masks = step._masks(len(x))
    step._masks = lambda batch: masks

    torch.manual_seed(1)
    fast_totals = step(x, labels)
    torch.manual_seed(1)
    reference_totals = _autograd_step(reference, x, masks, kl_weight, labels)

    torch.testing.assert_close(fast_totals[:3], reference_totals, rtol=1e-5, atol=1e-3)
    objective = reference_totals[1] + kl_weight * reference_totals[2]
    torch.testing.assert_close(fast_totals[3], objective, rtol=1e-5, atol=1e-3)
    for (name, fast), slow in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(fast.grad, slow.grad, rtol=1e-4, atol=1e-7, msg=name)
    for (name, fast), slow in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(fast, slow, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_masks_keep_the_expected_fraction(device):
    model = VAE(ModelConfig(2, 0.3)).to(device).train()
    masks = FastStep(model)._masks(500)
    assert [m.shape for m in masks] == [(500, 256), (500, 128), (500, 128), (500, 256)]
    values = torch.cat([m.flatten() for m in masks])
    assert values.unique().tolist() == [0.0, pytest.approx(1 / 0.7, rel=1e-4)]
    assert (values == 0).float().mean().item() == pytest.approx(0.3, abs=0.003)
    assert values.mean().item() == pytest.approx(1.0, abs=0.005)


@pytest.mark.parametrize("kernel", ["mm", pytest.param("onednn", marks=ONEDNN)])
def test_a_seed_gives_the_same_steps_twice(mnist, kernel):
    x = mnist["train"].images[:500].reshape(500, -1).float() / 255
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = VAE(ModelConfig(2, 0.3)).train()
        optimizer = torch.optim.Adam(model.parameters(), fused=True)
        step, totals = FastStep(model, kernel=kernel), []
        for _ in range(3):
            totals.append(step(x))
            optimizer.step()
        runs.append((torch.stack(totals), [p.clone() for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
