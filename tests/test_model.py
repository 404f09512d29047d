"""The seed's model, its conditional form, and their objective."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

from vaelab.config import ParamsError
from vaelab.data import DamagedInput
from vaelab.manifold import manifold_grid, manifold_latents
from vaelab.model import (
    KERAS_LEAKY_SLOPE, MATMUL_KERNELS, SEED_LOSS_SCALE, VAE, FoldedDecoder, LabelMismatch, ModelConfig,
    kl_to_standard_normal, linear, matmul_kernel, negative_elbo,
)
from vaelab.saved_model import load_vae, save_vae

ONEDNN = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
KERNELS = ["mm", pytest.param("onednn", marks=ONEDNN)]


def _random_terms(n=64, latent_dim=5):
    torch.manual_seed(1)
    x = torch.rand(n, 784)
    logits = torch.randn(n, 784) * 3
    mean, log_var = torch.randn(n, latent_dim), torch.randn(n, latent_dim)
    return logits, x, mean, log_var


def test_kl_matches_torch_distributions():
    _, _, mean, log_var = _random_terms()
    expected = kl_divergence(Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl_to_standard_normal(mean, log_var), expected)


def test_reconstruction_plus_kl_is_negative_elbo():
    neg_elbo, reconstruction, kl = negative_elbo(*_random_terms())
    torch.testing.assert_close(reconstruction + kl, neg_elbo)
    assert (kl >= 0).all() and (reconstruction > 0).all()


def test_seed_scaled_loss_is_negative_elbo_over_1568():
    """The seed's Keras loss: (784 * mean BCE(x, sigmoid output) + KL) / 2 / 784, per image."""
    logits, x, mean, log_var = _random_terms()
    bce = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="none").mean(-1)
    seed_loss = (784 * bce + kl_to_standard_normal(mean, log_var)) / 2 / 28 / 28
    neg_elbo, _, _ = negative_elbo(logits, x, mean, log_var)
    assert SEED_LOSS_SCALE == 1568
    torch.testing.assert_close(seed_loss, neg_elbo / 1568, rtol=1e-5, atol=1e-6)


def test_architecture_is_the_seeds():
    model = VAE(ModelConfig(latent_dim=2, dropout=0.3))
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(784, 256), (256, 128), (128, 2), (128, 2), (2, 128), (128, 256), (256, 784)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert [m.num_features for m in norms] == [256, 128, 128, 256]
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in norms)  # Keras: momentum 0.99
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3] * 4
    assert [m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)] == [0.3, 0.3]
    assert sum(isinstance(m, nn.ReLU) for m in model.encoder.modules()) == 2
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, nn.Linear))  # Keras: zeros


def test_decode_gives_images_in_unit_range():
    model = VAE(ModelConfig(latent_dim=3)).eval()
    images = model.decode(torch.randn(7, 3))
    assert images.shape == (7, 28, 28) and images.min() >= 0 and images.max() <= 1


def test_manifold_grid_is_the_seeds_norm_ppf():
    grid = manifold_grid(15)
    assert grid[0].item() == pytest.approx(-1.6448536, abs=1e-6)  # norm.ppf(0.05)
    torch.testing.assert_close(grid, -grid.flip(0))
    z = manifold_latents(4)
    assert z.shape == (225, 4) and (z[:, 2:] == 0).all()
    assert z[1, 0] > z[0, 0] and z[1, 1] == z[0, 1]  # along a row the first dimension varies


def test_saved_model_loads_weights_only(tmp_path):
    model = VAE(ModelConfig(latent_dim=4, dropout=0.1)).eval()
    save_vae(model, tmp_path / "vae.pt")
    loaded = load_vae(tmp_path / "vae.pt")
    assert loaded.config == ModelConfig(4, 0.1) and not loaded.training
    z = torch.randn(3, 4)
    torch.testing.assert_close(loaded.decode(z), model.decode(z))
    saved = torch.load(tmp_path / "vae.pt", weights_only=True)
    assert set(saved) == {"config", "state_dict"}
    assert saved["config"] == {"latent_dim": 4, "dropout": 0.1}  # the seed's file as before: the same bytes


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("activation, reference", [
    ("none", lambda h: h), ("relu", F.relu), ("leaky_relu", lambda h: F.leaky_relu(h, KERAS_LEAKY_SLOPE)),
])
def test_each_kernel_computes_the_linear_layer(kernel, activation, reference):
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((500, 256), (128, 256), (128,)))
    expected = reference(x.double() @ weight.double().t() + bias.double()).float()
    torch.testing.assert_close(linear(x, weight, bias, activation, kernel), expected, rtol=1e-4, atol=1e-4)
    # the input gradient's product: a transposed weight, no bias
    grad = x[:, :128]
    torch.testing.assert_close(linear(grad, weight.t(), kernel=kernel), grad @ weight, rtol=1e-4, atol=1e-4)


def test_the_kernel_is_onednn_exactly_where_pytorch_runs_avx512_code():
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512" and torch.backends.mkldnn.is_available()
    assert matmul_kernel(torch.device("cpu")) == ("onednn" if avx512 else "mm")
    assert matmul_kernel(torch.device("cuda")) == "mm" and set(MATMUL_KERNELS) == {"mm", "onednn"}


@pytest.mark.parametrize("latent_dim, conditional", [(1, False), (2, False), (8, False), (2, True)])
def test_the_folded_decoder_is_the_eval_decoder(latent_dim, conditional):
    torch.manual_seed(0)
    model = VAE(ModelConfig(latent_dim, conditional=conditional))
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d)):  # a trained model's statistics
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.2, 3)
        nn.init.uniform_(norm.weight, 0.5, 2)
        nn.init.normal_(norm.bias)
    model.eval()
    z = torch.randn(300, latent_dim) * 2
    labels = torch.arange(300) % 10 if conditional else None
    with torch.no_grad():
        torch.testing.assert_close(FoldedDecoder(model.decoder)(z, labels), model.decoder(z, labels), rtol=1e-5,
                                   atol=1e-4)


def test_the_conditional_vae_takes_the_one_hot_label_beside_x_and_beside_z():
    model = VAE(ModelConfig(latent_dim=3, conditional=True)).eval()
    assert model.encoder.body[0].in_features == 784 + 10 and model.decoder.net[0].in_features == 3 + 10
    torch.manual_seed(0)
    z = torch.randn(1, 3).repeat(10, 1)
    drawn = model.decode(z, torch.arange(10))  # one z under each digit
    # every label draws another image: the decoder's output depends on the label, not only on z
    distances = torch.cdist(drawn.reshape(10, -1), drawn.reshape(10, -1))
    assert (distances + torch.eye(10) > 1e-3).all()
    x = torch.rand(4, 784)
    mean_0, _ = model.encoder(x, torch.zeros(4, dtype=torch.int64))
    mean_7, _ = model.encoder(x, torch.full((4,), 7))
    assert not torch.allclose(mean_0, mean_7)  # and so does the encoder's


def test_a_model_refuses_labels_of_the_wrong_kind_in_one_line():
    with pytest.raises(LabelMismatch, match="^this VAE needs the digit labels$"):
        VAE(ModelConfig(conditional=True)).eval().decode(torch.zeros(2, 2))
    with pytest.raises(LabelMismatch, match=r"^this VAE takes no labels \(it is unconditional\)$"):
        VAE(ModelConfig()).eval().decode(torch.zeros(2, 2), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("saved, expected", [(True, False), (False, True)])
def test_loading_a_model_of_the_other_kind_says_so_in_one_line(tmp_path, saved, expected):
    save_vae(VAE(ModelConfig(conditional=saved)), tmp_path / "vae.pt")
    kinds = {True: "conditional", False: "unconditional"}
    with pytest.raises(ParamsError) as error:  # a stage's one-line error, exit 2
        load_vae(tmp_path / "vae.pt", conditional=expected)
    assert str(error.value) == (f"{tmp_path / 'vae.pt'} holds a VAE that is {kinds[saved]}, but params.yaml has "
                                f"conditional: {str(expected).lower()}; run the train stage again (dvc repro) to "
                                "train that one")
    assert load_vae(tmp_path / "vae.pt", conditional=saved).config.conditional is saved


def test_a_saved_model_whose_weights_or_config_do_not_fit_is_named_with_its_cure(tmp_path):
    path = tmp_path / "vae.pt"
    torch.save({"config": {"latent_dim": 3, "dropout": 0.3}, "state_dict": VAE(ModelConfig(latent_dim=2)).state_dict()},
               path)
    with pytest.raises(DamagedInput) as error:
        load_vae(path)
    assert str(error.value) == (f"{path} holds weights that do not fit its saved config "
                                f"(latent_dim 3, unconditional, the seed network); "
                                f"dvc checkout -f {path} restores it")
    torch.save({"config": {"latent_dim": 2, "dropout": 0.3, "beta": 1.0}, "state_dict": {}}, path)
    with pytest.raises(DamagedInput, match=r"vae.pt is not a saved vaelab model \(its config has beta\); dvc checkout"):
        load_vae(path)
    torch.save({"config": {"latent_dim": 0, "dropout": 0.3}, "state_dict": {}}, path)
    with pytest.raises(DamagedInput, match=r"model \(its config is \{'latent_dim': 0, 'dropout': 0.3\}\); dvc"):
        load_vae(path)
