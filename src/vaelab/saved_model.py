"""A trained VAE's file (models/vae.pt): its weights and config, written weights-only and read with every check."""
from __future__ import annotations

import torch

from vaelab.config import ARCHITECTURES, ParamsError
from vaelab.data import DamagedInput, load_archive
from vaelab.model import VAE, ModelConfig


def save_vae(model: VAE, path) -> None:
    """Weights and their config in one file that `torch.load(..., weights_only=True)` reads. The seed's VAE
    keeps the file of earlier versions (no `conditional` or `architecture` key), so its bytes, and DVC's hash,
    stay the same."""
    config = {"latent_dim": model.config.latent_dim, "dropout": model.config.dropout}
    if model.config.conditional:
        config["conditional"] = True
    if model.config.architecture != "seed":
        config["architecture"] = model.config.architecture
    torch.save({"config": config, "state_dict": model.state_dict()}, path)


def load_vae(path, conditional: bool | None = None, architecture: str | None = None) -> VAE:
    """A saved VAE in eval mode, loaded weights-only (no pickled code runs). A missing, damaged or foreign file is a
    DamagedInput that names it. With `conditional` or `architecture` (params.yaml's), a model of another kind is a
    ParamsError that names the file and both kinds."""
    saved = load_archive(path, "train")
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict) or not isinstance(saved.get("state_dict"), dict):
        raise DamagedInput(path, "is not a saved vaelab model (no config/state_dict)", "train")
    if problem := _saved_config_problem(config):
        raise DamagedInput(path, f"is not a saved vaelab model ({problem})", "train")
    model = VAE(ModelConfig(**config))
    if conditional is not None and conditional != model.config.conditional:
        raise ParamsError(f"{path} holds a VAE that is {model.config.kind}, but params.yaml has conditional: "
                          f"{str(conditional).lower()}; run the train stage again (dvc repro) to train that one")
    if architecture is not None and architecture != model.config.architecture:
        raise ParamsError(f"{path} holds a VAE of architecture {model.config.architecture}, but params.yaml has "
                          f"architecture: {architecture}; run the train stage again (dvc repro) to train that one")
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError:  # missing or unexpected keys, or tensors of other shapes
        fitted = f"latent_dim {model.config.latent_dim}, {model.config.kind}, the {model.config.architecture} network"
        raise DamagedInput(path, f"holds weights that do not fit its saved config ({fitted})", "train") from None
    return model.eval()


def _saved_config_problem(config: dict) -> str | None:
    """Why `config` is not one that `save_vae` writes (a latent_dim, a dropout, perhaps conditional and an
    architecture), or None."""
    keys = ("latent_dim", "dropout", "conditional", "architecture")
    if unknown := sorted(str(key) for key in config if key not in keys):
        return f"its config has {', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}"
    latent_dim, dropout, conditional, architecture = (config.get(k) for k in keys)
    if not (type(latent_dim) is int and latent_dim >= 1 and type(dropout) in (int, float) and 0 <= dropout < 1
            and type(conditional) in (type(None), bool) and architecture in (None, *ARCHITECTURES)
            and not (architecture == "burda" and dropout)):
        return f"its config is {config}"
    return None
