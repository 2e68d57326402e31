"""The training loop: plain PyTorch, no framework.

Choices that matter at this scale (each measured; see docs/training.md):
- dynamic binarisation: every epoch sees a fresh Bernoulli sample of each image, so the
  model cannot overfit one binarisation of the training set;
- KL warm-up: the KL weight rises linearly from 0 to 1, so the decoder learns to use z
  before the KL term can switch latent units off;
- a cosine learning-rate schedule ending at lr * lr_final_ratio: the late low-lr phase is
  where most of the last nats come from.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainer.data import load_split
from trainer.evaluate import binarise
from trainer.model import VAE, VAEConfig, kl_to_standard_normal, reconstruction_nll


@dataclass
class TrainConfig:
    dataset: str = "mnist"  # a known name (verified by checksum) or any label for a custom directory
    data_dir: str = "../shared/data/mnist"
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    lr_final_ratio: float = 0.02  # the cosine schedule ends at lr * lr_final_ratio
    kl_warmup_epochs: float = 10.0  # 0 disables warm-up
    free_bits: float = 0.0  # minimum KL per latent dim in nats while training (0 = off)
    dynamic_binarisation: bool = True  # False: one fixed binarisation of the training set
    model: VAEConfig = field(default_factory=VAEConfig)
    limit_train: int | None = None  # use only the first N training images (tests, quick runs)
    limit_test: int | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads on CPU; None = torch's default

    @staticmethod
    def from_dict(d: dict) -> TrainConfig:
        d = dict(d)
        d["model"] = VAEConfig(**d.get("model", {}))
        return TrainConfig(**d)


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class TrainState:
    """Everything needed to resume exactly where an epoch ended."""

    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)  # one row per epoch
    wall_time_s: float = 0.0
    # CPU seconds of this process (all threads) spent in epochs: with the wall time it shows
    # whether a run had its cores to itself (cpu ~ threads * wall) or shared them.
    cpu_time_s: float = 0.0


def kl_weight(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    if cfg.kl_warmup_epochs <= 0:
        return 1.0
    return min(1.0, step / (cfg.kl_warmup_epochs * steps_per_epoch))


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    progress = min(1.0, step / max(1, total_steps))
    final = cfg.lr * cfg.lr_final_ratio
    return final + (cfg.lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_checkpoint(
    path: Path,
    model: VAE,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    state: TrainState,
    generator: torch.Generator,
) -> None:
    payload = {
        "config": asdict(cfg),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "state": asdict(state),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "data_rng": generator.get_state(),
    }
    save_atomically(payload, path)


def save_atomically(payload: dict, path: Path) -> None:
    """torch.save to a temporary file, then renamed into place: an interrupt never leaves a
    half-written checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def train(
    cfg: TrainConfig, workdir: Path, resume: bool = True, progress: bool = True
) -> tuple[VAE, TrainState]:
    """Trains (or resumes) in `workdir`, writing `checkpoint.pt` after every epoch.
    On Ctrl-C the last completed epoch's checkpoint is kept and KeyboardInterrupt re-raised."""
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / "checkpoint.pt"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)

    known = cfg.dataset if cfg.dataset in ("mnist", "fashion-mnist") else None
    train_split = load_split(cfg.data_dir, "train", known)
    test_split = load_split(cfg.data_dir, "test", known)
    train_u8 = torch.from_numpy(np.array(train_split.images[: cfg.limit_train]))
    test_u8 = torch.from_numpy(np.array(test_split.images[: cfg.limit_test]))
    fixed_train = None if cfg.dynamic_binarisation else binarise(train_u8, generator)

    model = VAE(cfg.model).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = TrainState()
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if _result_fields(ckpt["config"]) != _result_fields(asdict(cfg)):
            raise SystemExit(
                f"{ckpt_path} was written with a different config; use a new output directory "
                "or --no-resume to start over"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = TrainState(**ckpt["state"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        generator.set_state(ckpt["data_rng"])

    n = len(train_u8)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    test_x = binarise(test_u8, torch.Generator().manual_seed(1234)).to(device)

    try:
        while state.epoch < cfg.epochs:
            started, cpu_started = time.perf_counter(), time.process_time()
            model.train()
            order = torch.randperm(n, generator=generator)
            sums = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0}
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
                disable=not progress,
                leave=False,
                dynamic_ncols=True,
            )
            for i in bar:
                step = state.epoch * steps_per_epoch + i
                idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                if fixed_train is None:
                    x = binarise(train_u8[idx], generator).to(device, non_blocking=True)
                else:
                    x = fixed_train[idx].to(device, non_blocking=True)
                for group in opt.param_groups:
                    group["lr"] = learning_rate(cfg, step, total_steps)
                beta = kl_weight(cfg, step, steps_per_epoch)

                logits, mu, sigma = model(x)
                rec = reconstruction_nll(logits, x).mean()
                kl_dims = kl_to_standard_normal(mu, sigma).mean(0)  # per latent dim, batch mean
                kl = kl_dims.sum()
                kl_train = kl_dims.clamp(min=cfg.free_bits).sum() if cfg.free_bits > 0 else kl
                loss = rec + beta * kl_train

                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

                sums["loss"] += (rec + kl).item()
                sums["reconstruction"] += rec.item()
                sums["kl"] += kl.item()
                if i % 20 == 0:
                    bar.set_postfix(
                        neg_elbo=f"{(rec + kl).item():.2f}",
                        rec=f"{rec.item():.2f}",
                        kl=f"{kl.item():.2f}",
                        beta=f"{beta:.2f}",
                    )
            bar.close()
            state.wall_time_s += time.perf_counter() - started
            state.cpu_time_s += time.process_time() - cpu_started
            row = {k: v / steps_per_epoch for k, v in sums.items()}
            row.update(
                epoch=state.epoch + 1,
                kl_weight=beta,
                lr=opt.param_groups[0]["lr"],
                test_neg_elbo=test_neg_elbo(model, test_x),
                wall_time_s=state.wall_time_s,
            )
            state.history.append(row)
            state.epoch += 1
            save_checkpoint(ckpt_path, model, opt, cfg, state, generator)
            summary = (
                f"epoch {row['epoch']:>3}  train -ELBO {row['loss']:.2f} "
                f"(rec {row['reconstruction']:.2f} + kl {row['kl']:.2f})  "
                f"test -ELBO {row['test_neg_elbo']:.2f}  [{state.wall_time_s / 60:.1f} min]"
            )
            if progress:
                tqdm.write(summary)
            else:
                print(summary, flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {ckpt_path} holds epoch {state.epoch}; run the same command to resume")
        raise
    return model, state


def _result_fields(config: dict) -> dict:
    """The config fields that change what training computes (not where data or work lives)."""
    return {k: v for k, v in config.items() if k not in ("data_dir", "device", "threads")}


@torch.no_grad()
def test_neg_elbo(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> float:
    """-ELBO on the (fixed) binarised test images, one z sample each: a cheap progress signal.
    Its sampling uses a private generator so the training RNG stream is left untouched."""
    model.eval()
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(0)
    total = 0.0
    for s in range(0, len(x), batch_size):
        logits, mu, sigma = model(x[s : s + batch_size])
        total += (
            (reconstruction_nll(logits, x[s : s + batch_size]) + kl_to_standard_normal(mu, sigma).sum(1))
            .sum()
            .item()
        )
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)
    model.train()
    return total / len(x)
