"""Fitting the learned prior (trainer.prior) on top of a trained VAE: plain PyTorch.

The VAE is not touched. Its encoder turns every training image into its posterior: one
draw z ~ q(z|x), or the mean mu(x), is its code. Either density is fitted to the codes by
maximum likelihood:

- fit_mixture: a Gaussian mixture, by EM (the shipped models' learned prior);
- train_prior: a normalising flow, by stochastic gradient descent, with the test set's
  codes as the held-out check.

Like the VAE's loop, both are deterministic for a seed, write a checkpoint after every
iteration or epoch, and resume from it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from trainer.prior import ClassMixtureMap, Flow, FlowConfig, MixtureMap, mixture_log_joint
from trainer.train import save_atomically


@dataclass
class PriorTrainConfig:
    flow: FlowConfig = field(default_factory=FlowConfig)
    epochs: int = 60
    batch_size: int = 256
    lr: float = 1e-3
    lr_final_ratio: float = 0.02  # cosine schedule to lr * lr_final_ratio
    weight_decay: float = 0.0
    seed: int = 0
    threads: int | None = None

    @staticmethod
    def from_dict(d: dict) -> PriorTrainConfig:
        d = dict(d)
        d["flow"] = FlowConfig(**d.get("flow", {}))
        return PriorTrainConfig(**d)


@dataclass
class PriorTrainState:
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    cpu_time_s: float = 0.0


@torch.no_grad()
def posterior_means(encode, images_u8: Tensor, batch_size: int = 1000) -> Tensor:
    """mu(x) for uint8 images [N, 28, 28], read as the grey images a client sends."""
    out = []
    for s in range(0, len(images_u8), batch_size):
        x = images_u8[s : s + batch_size].float().div(255).unsqueeze(1)
        mu, _ = encode(x)
        out.append(mu.float())
    return torch.cat(out)


@torch.no_grad()
def posterior_draws(encode, images_u8: Tensor, seed: int, batch_size: int = 1000) -> Tensor:
    """One draw z = mu + sigma * eps of q(z|x) per image (grey, as a client sends it), eps from
    a private generator: samples of the aggregate posterior q(z) = E_x q(z|x) itself."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, len(images_u8), batch_size):
        mu, sigma = encode(images_u8[s : s + batch_size].float().div(255).unsqueeze(1))
        out.append((mu + sigma * torch.randn(mu.shape, generator=generator)).float())
    return torch.cat(out)


@torch.no_grad()
def mean_log_prob(flow: Flow, z: Tensor, batch_size: int = 5000) -> float:
    flow.eval()
    return float(
        sum(flow.log_prob(z[s : s + batch_size]).sum() for s in range(0, len(z), batch_size)) / len(z)
    )


def train_prior(
    cfg: PriorTrainConfig,
    train_codes: Tensor,
    test_codes: Tensor,
    workdir: Path,
    resume: bool = True,
    progress: bool = True,
) -> tuple[Flow, PriorTrainState]:
    """Fits the flow to `train_codes` [N, D]; checkpoint after every epoch in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / "prior_checkpoint.pt"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    flow = Flow(cfg.flow, seed=cfg.seed)
    flow.fit_standardiser(train_codes)
    opt = torch.optim.AdamW(flow.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = PriorTrainState()
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if _result_fields(ckpt["config"]) != _result_fields(asdict(cfg)):
            raise SystemExit(
                f"{ckpt_path} was written with a different prior config; use another --workdir "
                "or --no-resume to start over"
            )
        flow.load_state_dict(ckpt["flow"])
        opt.load_state_dict(ckpt["optimizer"])
        state = PriorTrainState(**ckpt["state"])
        torch.set_rng_state(ckpt["torch_rng"])
        generator.set_state(ckpt["data_rng"])

    n = len(train_codes)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    final_lr = cfg.lr * cfg.lr_final_ratio
    try:
        while state.epoch < cfg.epochs:
            started, cpu_started = time.perf_counter(), time.process_time()
            flow.train()
            order = torch.randperm(n, generator=generator)
            loss_sum = 0.0
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"prior epoch {state.epoch + 1}/{cfg.epochs}",
                disable=not progress,
                leave=False,
                dynamic_ncols=True,
            )
            for i in bar:
                step = state.epoch * steps_per_epoch + i
                lr = final_lr + (cfg.lr - final_lr) * 0.5 * (1 + math.cos(math.pi * step / total))
                for group in opt.param_groups:
                    group["lr"] = lr
                z = train_codes[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
                loss = -flow.log_prob(z).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
                opt.step()
                loss_sum += loss.item()
                if i % 20 == 0:
                    bar.set_postfix(nll=f"{loss.item():.2f}")
            bar.close()
            state.wall_time_s += time.perf_counter() - started
            state.cpu_time_s += time.process_time() - cpu_started
            row = {
                "epoch": state.epoch + 1,
                "train_nll": loss_sum / steps_per_epoch,
                "test_nll": -mean_log_prob(flow, test_codes),
                "lr": lr,
                "wall_time_s": state.wall_time_s,
            }
            state.history.append(row)
            state.epoch += 1
            _save(ckpt_path, flow, opt, cfg, state, generator)
            line = (
                f"prior epoch {row['epoch']:>3}  train -log p(z) {row['train_nll']:.3f}  "
                f"test {row['test_nll']:.3f}  [{state.wall_time_s / 60:.1f} min]"
            )
            if progress:
                tqdm.write(line)
            else:
                print(line, flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {ckpt_path} holds prior epoch {state.epoch}; run the same command to resume")
        raise
    return flow.eval(), state


def _result_fields(config: dict) -> dict:
    """The config fields that change what training computes (threads do not, on the CPU)."""
    return {k: v for k, v in config.items() if k != "threads"}


def _save(
    path: Path,
    flow: Flow,
    opt: torch.optim.Optimizer,
    cfg: PriorTrainConfig,
    state: PriorTrainState,
    generator: torch.Generator,
) -> None:
    payload = {
        "config": asdict(cfg),
        "flow": flow.state_dict(),
        "optimizer": opt.state_dict(),
        "state": asdict(state),
        "torch_rng": torch.get_rng_state(),
        "data_rng": generator.get_state(),
    }
    save_atomically(payload, path)


@dataclass
class MixtureConfig:
    """A full-covariance Gaussian mixture over the codes, fitted by EM."""

    components: int = 50
    iterations: int = 60
    jitter: float = 1e-5  # added to every covariance's diagonal: the codes' unused dimensions hardly vary
    seed: int = 0


@dataclass
class MixtureState:
    iteration: int = 0
    history: list[float] = field(default_factory=list)  # mean log-likelihood of the codes, per iteration
    wall_time_s: float = 0.0
    cpu_time_s: float = 0.0


def fit_mixture(
    cfg: MixtureConfig, codes: Tensor, workdir: Path, resume: bool = True, progress: bool = True
) -> tuple[MixtureMap, MixtureState]:
    """The mixture fitted to the codes [N, D] by `em`, as the map from noise to latents."""
    weights, means, covs, state = em(cfg, codes, workdir / "mixture_checkpoint.pt", resume, progress)
    return MixtureMap(weights, means, covs).eval(), state


def fit_class_mixture(
    cfg: MixtureConfig,
    codes: Tensor,
    labels: Tensor,
    classes: int,
    workdir: Path,
    resume: bool = True,
    progress: bool = True,
    shares: Tensor | None = None,
) -> tuple[ClassMixtureMap, list[MixtureState]]:
    """One mixture of cfg.components per class, fitted by `em` to that class's codes, joined
    by the classes' training shares: p(z | y) and p(z) = sum_y share_y p(z | y). `shares`:
    the classes' shares of the training set when the codes are a selection of it (default:
    their shares among the codes)."""
    fitted, states = [], []
    for y in range(classes):
        mine = codes[labels == y]
        if len(mine) < cfg.components:
            raise ValueError(
                f"class {y} has {len(mine)} training codes, fewer than the {cfg.components} components "
                "asked for each class; use fewer components"
            )
        # Each class its own seed, so that no two start from the same draw of indices.
        class_cfg = MixtureConfig(**{**asdict(cfg), "seed": cfg.seed * 1000 + y})
        w, m, c, state = em(class_cfg, mine, workdir / f"class-{y}.pt", resume, progress, f"EM class {y}")
        fitted.append((w, m, c))
        states.append(state)
    if shares is None:
        shares = torch.bincount(labels, minlength=classes).double()
    weights, means, covs = (torch.stack(parts) for parts in zip(*fitted, strict=True))
    return ClassMixtureMap(shares, weights, means, covs).eval(), states


def em(
    cfg: MixtureConfig,
    codes: Tensor,
    ckpt_path: Path,
    resume: bool = True,
    progress: bool = True,
    desc: str = "mixture EM",
) -> tuple[Tensor, Tensor, Tensor, MixtureState]:
    """EM on the codes [N, D]: responsibilities (E step, in float32) and weighted means and
    covariances (M step, in float64). Deterministic for a seed; checkpointed after every
    iteration and resumed from there. Returns (weights, means, covariances with the jitter
    added, state), in float64."""
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    n, d = codes.shape
    x = codes.double()
    generator = torch.Generator().manual_seed(cfg.seed)
    means = x[torch.randperm(n, generator=generator)[: cfg.components]].clone()
    covs = torch.diag_embed(x.var(0).expand(cfg.components, d)).clone()
    weights = torch.full((cfg.components,), 1.0 / cfg.components, dtype=torch.float64)
    state = MixtureState()
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["config"] != asdict(cfg):
            raise SystemExit(f"{ckpt_path} was written with a different mixture config; use --no-resume")
        weights, means, covs = ckpt["weights"], ckpt["means"], ckpt["covariances"]
        state = MixtureState(**ckpt["state"])
    jitter = cfg.jitter * torch.eye(d, dtype=torch.float64)
    bar = tqdm(total=cfg.iterations, initial=state.iteration, desc=desc, disable=not progress, leave=False)
    try:
        while state.iteration < cfg.iterations:
            started, cpu_started = time.perf_counter(), time.process_time()
            chol = torch.linalg.cholesky(covs + jitter).float()
            log_joint = mixture_log_joint(x.float(), weights.log().float(), means.float(), chol).double()
            log_norm = torch.logsumexp(log_joint, dim=1, keepdim=True)
            r = torch.exp(log_joint - log_norm)  # [N, K] responsibilities
            mass = r.sum(0) + 1e-9
            weights = mass / n
            means = (r.T @ x) / mass[:, None]
            # Covariances from centred codes, one component at a time: a [K, N, D] batch of
            # them would be ~1 GB in float64 for 50 components.
            covs = (
                torch.stack(
                    [((x - means[k]) * r[:, k : k + 1]).T @ (x - means[k]) for k in range(len(means))]
                )
                / mass[:, None, None]
            )
            state.history.append(round(float(log_norm.mean()), 4))
            state.iteration += 1
            state.wall_time_s += time.perf_counter() - started
            state.cpu_time_s += time.process_time() - cpu_started
            payload = {
                "config": asdict(cfg),
                "weights": weights,
                "means": means,
                "covariances": covs,
                "state": asdict(state),
            }
            save_atomically(payload, ckpt_path)
            bar.update(1)
            bar.set_postfix(log_likelihood=f"{state.history[-1]:.3f}")
    except KeyboardInterrupt:
        print(f"\ninterrupted: {ckpt_path} holds EM iteration {state.iteration}; the same command resumes")
        raise
    finally:
        bar.close()
    if state.history:
        line = f"{desc}: {state.iteration} iterations, mean log p(z) of the codes {state.history[-1]:.3f}"
        (tqdm.write if progress else print)(line)
    return weights, means, covs + jitter, state
