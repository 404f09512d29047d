"""The training loop: in-memory tensors, the training objective, per-epoch history and animation snapshots.

Importable with torch alone (no MLflow, no DVC): the caller observes progress through `on_epoch`.
"""
from __future__ import annotations

import ctypes
import math
import platform
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from vaelab import resume
from vaelab.config import Params
from vaelab.backprop import FastStep
from vaelab.manifold import MANIFOLD_SIZE, manifold_images
from vaelab.metrics import RECONSTRUCTED_DIGITS, reconstruct
from vaelab.model import (SEED_LOSS_SCALE, VAE, ModelConfig, data_mean_logits, encode_in_batches, negative_elbo,
                          objective_terms, resolve_device)

# A conditional VAE's snapshot holds ten manifolds, one per digit, on a 5 x 5 grid each: about the pixels of the
# seed's one 15 x 15 manifold, so that the snapshots file and the animation stay the size they are.
PER_DIGIT_MANIFOLD_SIZE = 5
SNAPSHOT_IMAGES = 5000  # the first test images, whose latent means animate the scatter
KERAS_EPSILON = 1e-7  # Keras 2's optimizer epsilon (PyTorch's default is 1e-8)


@dataclass
class Snapshots:
    """What the animations are drawn from, one entry per snapshot epoch, and first the untrained model's (epoch 0)."""

    epochs: list[int] = field(default_factory=list)
    manifolds: list[torch.Tensor] = field(default_factory=list)  # uint8 (15*28, 15*28), per digit (10, 140, 140)
    latent_means: list[torch.Tensor] = field(default_factory=list)  # float32 (SNAPSHOT_IMAGES, latent_dim)
    reconstructions: list[torch.Tensor] = field(default_factory=list)  # uint8 (RECONSTRUCTED_DIGITS, 28, 28)

    def to_dict(self, labels: torch.Tensor) -> dict:
        return {
            "epochs": torch.tensor(self.epochs),
            "manifolds": torch.stack(self.manifolds),
            "latent_means": torch.stack(self.latent_means),
            "reconstructions": torch.stack(self.reconstructions),
            "labels": labels,
        }


def snapshot_epochs(epochs: int) -> list[int]:
    """The seed's schedule, scaled to `epochs`: epochs 1-10, then int(i ** 1.701) for i < 59, and the last.

    For 1000 epochs this is the seed's set (counting epochs from 1): dense early, sparse late, about 60 frames.
    """
    scale = epochs / 1000
    chosen = {int(i**1.701 * scale) + 1 for i in range(59)} | set(range(1, 11)) | {epochs}
    return sorted(e for e in chosen if e <= epochs)


BURDA_STAGES = 8  # Burda et al. 2015: lr * 10^(-i/7) for 3^i epochs, i = 0..7: 3280 epochs in all


def learning_rate(params: Params, epoch: int) -> float:
    """The rate of `epoch` (counted from 1) under `params.lr_schedule`:
    `constant`: lr (the seed); `burda`: lr * 10^(-i/7) in stage i, the stages 3^i epochs long for 3280
    epochs and scaled to `epochs` as the snapshot schedule is; `cosine`: lr * (1 + cos(pi * (epoch - 1) /
    epochs)) / 2, from lr down towards 0 (CosineAnnealingLR's curve)."""
    if params.lr_schedule == "burda":
        ends = [sum(3**j for j in range(i + 1)) * params.epochs / 3280 for i in range(BURDA_STAGES)]
        stage = next(i for i, end in enumerate(ends) if epoch - 1 < end or i == BURDA_STAGES - 1)
        return params.lr * 10 ** (-stage / 7)
    if params.lr_schedule == "cosine":
        return params.lr * (1 + math.cos(math.pi * (epoch - 1) / params.epochs)) / 2
    return params.lr


def kl_weight(params: Params, epoch: int) -> float:
    """The KL term's weight in the training objective at `epoch`: rising linearly from 0 at epoch 1 to `beta`
    after `kl_warmup_epochs` epochs (Sonderby et al. 2016), then `beta`."""
    if params.kl_warmup_epochs and epoch <= params.kl_warmup_epochs:
        return params.beta * (epoch - 1) / params.kl_warmup_epochs
    return params.beta


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next allocation rather than give it back to the system.
    A CPU step frees and allocates tensors of 0.5-1.5 MB; by default glibc maps each afresh and the kernel
    zeroes its pages on first touch: about 100,000 page faults an epoch, a tenth of its time (2-core EPYC).
    Process-wide; up to 256 MB of freed memory stays with the process. A no-op where libc is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: blocks up to 32 MB come from the heap
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)  # and the heap gives back only what exceeds 256 MB


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(name: str, parameters, lr: float, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam or RMSprop with Keras 2's defaults (RMSprop rho 0.9, epsilon 1e-7), in their fastest
    implementations (fused Adam; RMSprop has no fused kernel, so one multi-tensor step). `capturable`
    keeps the step count on the GPU, so the update can be recorded in a CUDA graph."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, eps=KERAS_EPSILON, fused=True, capturable=capturable)
    return torch.optim.RMSprop(parameters, lr=lr, alpha=0.9, eps=KERAS_EPSILON, foreach=True, capturable=capturable)


STEP_MODES = ("eager", "graphs", "compiled-graphs")


class AutogradStep:
    """The gradients of the training objective by autograd of its definition (`vaelab.model.objective_terms`):
    the step for what the hand-written FastStep does not cover (Burda et al.'s network, IWAE, k > 1 samples).
    It minimises the same scaled loss as FastStep, the mean objective / 1568, so that Adam's epsilon weighs
    alike on both. Returns the batch's summed (negative ELBO, reconstruction, KL, training objective), detached."""

    def __init__(self, model: VAE, objective: str, samples: int, kl_weight: float = 1.0):
        self.model, self.objective, self.samples, self.kl_weight = model, objective, samples, kl_weight

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        for parameter in self.model.parameters():
            parameter.grad = None  # within a CUDA graph's capture, backward writes fresh gradients to its pool
        loss, reconstruction, kl = objective_terms(self.model, x, labels, self.objective, self.samples, self.kl_weight)
        (loss.mean() / SEED_LOSS_SCALE).backward()
        return torch.stack([(reconstruction + kl).sum(), reconstruction.sum(), kl.sum(), loss.sum()]).detach()


class TrainingStep:
    """One optimisation step on a batch of training images chosen by `index`: the dynamic binarization (if
    any), the forward and backward pass (hand-written where `FastStep` covers the training, otherwise
    `AutogradStep`), and the optimizer. Returns the batch's summed (negative ELBO, reconstruction, KL, training
    objective), left on the device.

    `mode` is how the step runs. `eager`: op by op, as on the CPU. `graphs` (CUDA only): each batch size's
    step is recorded once as a CUDA graph and replayed from then on, since a step is about a hundred small
    kernels that the GPU runs faster than Python launches them one by one. `compiled-graphs`: the same,
    with the forward and backward pass first compiled by `torch.compile`, which fuses elementwise kernels.
    The first WARMUP steps of a size run eagerly, on the capture stream, to create what the graph then
    reuses (optimizer state, cuBLAS workspace, the random-bits buffer, compiled kernels); the random
    generator advances the same way in a replay as in an eager step.
    """

    WARMUP = 2

    def __init__(self, model: VAE, optimizer: torch.optim.Optimizer, images: torch.Tensor, binarize: str,
                 mode: str = "eager", labels: torch.Tensor | None = None, objective: str = "elbo", samples: int = 1):
        if mode not in STEP_MODES:
            raise ValueError(f"step mode {mode!r}: expected one of {', '.join(STEP_MODES)}")
        self.gradients = (FastStep(model) if FastStep.covers(model, objective, samples)
                          else AutogradStep(model, objective, samples))
        self.run_gradients = self.gradients
        if mode == "compiled-graphs":
            # fallback_random: the same random numbers as the eager step, so both modes train alike
            self.run_gradients = torch.compile(self.gradients, dynamic=False, options={"fallback_random": True})
        self.optimizer, self.images, self.labels, self.binarize, self.mode = optimizer, images, labels, binarize, mode
        self.stream = torch.cuda.Stream() if mode != "eager" else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.eager_steps: dict[int, int] = {}
        if mode != "eager":  # a rate held in a device tensor can change between replays
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=images.device)

    def set_rates(self, lr: float, kl_weight: float) -> None:
        """The learning rate and KL weight of the steps to come (see `learning_rate`, `kl_weight`)."""
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        if kl_weight != self.gradients.kl_weight:
            self.gradients.kl_weight = kl_weight
            self.graphs.clear()  # the weight is an argument recorded in the graph's kernels: record anew

    def eager(self, index: torch.Tensor) -> torch.Tensor:
        x = self.images.index_select(0, index)
        if self.binarize == "dynamic":  # a fresh Bernoulli(pixel) draw of every batch
            x = (torch.rand_like(x) < x).to(x.dtype)
        stats = self.run_gradients(x, None if self.labels is None else self.labels.index_select(0, index))
        self.optimizer.step()
        return stats

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        if self.mode == "eager":
            return self.eager(index)
        size = len(index)
        if size not in self.graphs and self.eager_steps.get(size, 0) >= self.WARMUP:
            static_index = index.clone()
            graph = torch.cuda.CUDAGraph()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.graph(graph, stream=self.stream):
                static_stats = self.eager(static_index)
            self.graphs[size] = (graph, static_index, static_stats)
        if size in self.graphs:
            graph, static_index, static_stats = self.graphs[size]
            static_index.copy_(index)
            graph.replay()
            return static_stats  # overwritten by the next replay, which the stream orders after its readers
        self.eager_steps[size] = self.eager_steps.get(size, 0) + 1
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            stats = self.eager(index)
        torch.cuda.current_stream().wait_stream(self.stream)
        return stats


@torch.no_grad()
def evaluate_loss(model: VAE, images: torch.Tensor, batch_size: int,
                  labels: torch.Tensor | None = None) -> dict[str, float]:
    """Mean negative ELBO, reconstruction and KL in nats per image, one z sample each (as Keras's val_loss);
    `labels` for a conditional VAE."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, device=images.device)
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        y = None if labels is None else labels[start : start + batch_size]
        totals += torch.stack([term.sum() for term in elbo_terms(model, x, y)])
    model.train(was_training)
    return _summary(totals / len(images))


def elbo_terms(model: VAE, x: torch.Tensor, labels: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(negative ELBO, reconstruction, KL) per image, with one reparameterised z sample."""
    logits, mean, log_var = model(x, labels)
    return negative_elbo(logits, x, mean, log_var)


def _summary(means: torch.Tensor) -> dict[str, float]:
    neg_elbo, reconstruction, kl = means.tolist()
    return {"loss": neg_elbo / SEED_LOSS_SCALE, "neg_elbo": neg_elbo, "reconstruction": reconstruction, "kl": kl}


@dataclass
class TrainResult:
    model: VAE
    history: list[dict[str, float]]
    snapshots: Snapshots
    resumed_at: int = 0  # the epoch of the checkpoint it continued from, 0 for a fresh start


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


HIGH_DROPOUT = 0.95  # above this, the kept units' scale 1/(1-p) can overflow exp(log_var) at the first step


def _divergence_causes(params: Params, first_step: bool) -> str:
    """What most likely made the loss infinite, named for the user. A first step's loss comes before any update,
    so the learning rate cannot have caused it."""
    causes = []
    if params.dropout >= HIGH_DROPOUT:
        keep = 1 - params.dropout
        causes.append(f"dropout {params.dropout} keeps {keep:.3%} of the units and scales each by {1 / keep:,.0f}, "
                      f"which overflows the activations; use a dropout below {HIGH_DROPOUT}")
    if not first_step:
        causes.append(f"lr {params.lr} may be too large")
    return "; ".join(causes) or "the very first step overflowed, before any update: check the inputs"


def train(
    params: Params,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    snapshot_images: torch.Tensor,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    checkpointing: resume.Checkpointing | None = None,
    step_mode: str | None = None,
    labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> TrainResult:
    """Train the VAE that `params` describe (the seed's network or Burda et al.'s, conditional or not, with the
    ELBO or IWAE over `train_samples` samples, the output bias at zero or the data's logits) on float images
    (n, 784); returns the model, per-epoch history and snapshots. `labels` are the digits (train, val, snapshot) of the
    three sets of images: a conditional VAE takes them beside the images, the seed's ignores them.

    Each history row holds the epoch, its learning rate `lr` and `kl_weight`, and for `train_` and `val_`:
    the seed's scaled `loss` and the negative ELBO, reconstruction and KL terms in nats per image (the true
    ELBO whatever the KL weight and objective), and `train_objective`, what the epoch minimised
    (`objective_terms`). `on_epoch` gets each row as its epoch ends. With `checkpointing`, a run whose checkpoint
    exists continues from it, with the same result as if it had never stopped, and `on_epoch` first gets
    the restored rows again (for a tracker that may not have them all). `step_mode` is the TrainingStep's:
    by default `graphs` on a GPU and `eager` on the CPU; the benchmark times the others.
    """
    device = resolve_device(params.device)
    step_mode = step_mode or ("graphs" if device.type == "cuda" else "eager")
    if device.type == "cpu":
        reuse_freed_memory()
    seed_everything(params.seed)
    model = VAE(ModelConfig.of(params))
    if params.output_bias == "data_mean":
        model.decoder.output.bias.data.copy_(data_mean_logits(train_images))
    model.to(device)
    optimizer = make_optimizer(params.optimizer, model.parameters(), params.lr, capturable=device.type == "cuda")
    train_images, val_images, snapshot_images = (t.to(device) for t in (train_images, val_images, snapshot_images))
    if params.conditional and labels is None:
        raise ValueError("a conditional VAE trains on labelled images: pass the labels")
    train_labels, val_labels, snapshot_labels = (
        (None,) * 3 if not params.conditional else (t.to(device) for t in labels))
    shuffle = torch.Generator().manual_seed(params.seed)
    n = len(train_images)
    snapshot_at = set(snapshot_epochs(params.epochs))
    history, snapshots = [], Snapshots()

    def take_snapshot(epoch: int) -> None:
        """What the pictures show at `epoch`: the manifold, the latent means and the first test digits'
        reconstructions. It draws no random numbers, so training goes on as it would without it."""
        model.eval()
        snapshots.epochs.append(epoch)
        size = PER_DIGIT_MANIFOLD_SIZE if params.conditional else MANIFOLD_SIZE
        snapshots.manifolds.append(manifold_images(model, size))
        snapshots.latent_means.append(encode_in_batches(model, snapshot_images, snapshot_labels)[0].float().cpu())
        shown = slice(0, RECONSTRUCTED_DIGITS)
        decoded = reconstruct(model, snapshot_images[shown], None if snapshot_labels is None else snapshot_labels[shown])
        snapshots.reconstructions.append((decoded * 255).round().to(torch.uint8).cpu())

    done = 0
    if checkpointing is not None and resume.usable(checkpointing.path):
        done = resume.restore(checkpointing.path, model, optimizer, shuffle, history, snapshots)
        if on_epoch is not None:
            for row in history:
                on_epoch(row)
    else:
        take_snapshot(0)  # the untrained model: MLflow's image cards open at step 0
    step = TrainingStep(model, optimizer, train_images, params.binarize, step_mode, train_labels, params.objective,
                        params.train_samples)
    last_save = time.monotonic()

    for epoch in range(done + 1, params.epochs + 1):
        model.train()
        rates = {"lr": learning_rate(params, epoch), "kl_weight": kl_weight(params, epoch)}
        step.set_rates(**rates)
        order = torch.randperm(n, generator=shuffle).to(device)
        batches = [index for index in order.split(params.batch_size) if len(index) > 1]  # BatchNorm needs 2
        step_losses = torch.empty(len(batches), device=device)
        totals, seen = torch.zeros(4, device=device), 0
        for i, index in enumerate(batches):
            stats = step(index)
            step_losses[i] = stats[0]
            totals += stats
            seen += len(index)
        if not torch.isfinite(totals).all():
            bad = int((~torch.isfinite(step_losses)).nonzero()[0])
            raise TrainingDiverged(
                f"the loss is {step_losses[bad].item()} at epoch {epoch}, step {bad + 1} of {len(batches)}; "
                f"training stopped ({_divergence_causes(params, first_step=epoch == 1 and bad == 0)})"
            )
        row = {"epoch": epoch, **rates}
        row.update({f"train_{k}": v for k, v in _summary(totals[:3] / seen).items()})
        row["train_objective"] = (totals[3] / seen).item()
        row.update({f"val_{k}": v for k, v in evaluate_loss(model, val_images, params.batch_size, val_labels).items()})
        history.append(row)
        if epoch in snapshot_at:
            take_snapshot(epoch)
        if on_epoch is not None:
            on_epoch(row)
        due = time.monotonic() - last_save >= checkpointing.every_seconds if checkpointing else False
        if checkpointing is not None and (due or epoch == params.epochs):
            resume.save(checkpointing.path, epoch, model, optimizer, shuffle, history, snapshots)
            last_save = time.monotonic()
    model.eval()
    return TrainResult(model.cpu(), history, snapshots, resumed_at=done)
