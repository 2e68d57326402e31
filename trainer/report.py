"""The artifact's report: figures a person wants to look at, and the model card.

Each figure shows one idea: the loss terms trading off, prior samples (the VAE as a
generative model), reconstructions, the posterior means of test digits around the N(0, I)
prior (classes in their own regions), and paths through latent space.
"""

from __future__ import annotations

import io
import json
import math

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from trainer.model import VAE, kl_to_standard_normal

FIGURES = {
    "loss_curves.png": "Loss curves: reconstruction and KL terms per epoch",
    "prior_samples.png": "Samples from the prior, z ~ N(0, I), decoded",
    "reconstructions.png": "Test digits (odd columns) beside their reconstructions (even columns)",
    "latent_map.png": "Posterior means of test digits by class, with the prior's contours",
    "kl_per_dim.png": "KL to the prior per latent dimension (active units stand out)",
    "interpolation.png": "Interpolations in latent space between test digits",
    "prior_comparison.png": "The same noise decoded through the standard and the learned prior",
    "prior_draws.png": "Draws of both priors over the posterior means of test digits",
    "class_draws.png": "Draws of each class through the class-conditional prior, one row per class",
}


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def image_grid(images: Tensor, cols: int, pad: int = 2) -> np.ndarray:
    """[B, 1, 28, 28] in [0, 1] -> one 2-D array with the images on a grid."""
    images = images.detach().cpu().numpy()[:, 0]
    rows = math.ceil(len(images) / cols)
    h, w = images.shape[1:]
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            img
        )
    return grid


def _grid_figure(grid: np.ndarray, title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 40, grid.shape[0] / 40))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return _png(fig)


def loss_curves(history: list[dict]) -> bytes:
    epochs = [r["epoch"] for r in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot(epochs, [r["loss"] for r in history], label="train -ELBO")
    a1.plot(epochs, [r["test_neg_elbo"] for r in history], label="test -ELBO")
    a1.plot(epochs, [r["reconstruction"] for r in history], label="train reconstruction")
    a1.set_xlabel("epoch")
    a1.set_ylabel("nats per image")
    a1.set_ylim(top=min(200, max(r["loss"] for r in history)))
    a1.legend()
    a1.grid(alpha=0.3)
    a2.plot(epochs, [r["kl"] for r in history], color="tab:red", label="KL(q(z|x) || N(0, I))")
    a2.plot(epochs, [r["kl_weight"] for r in history], color="gray", ls="--", label="KL weight (warm-up)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("nats per image / weight")
    a2.legend()
    a2.grid(alpha=0.3)
    fig.suptitle("Training: the reconstruction term falls while the KL term pays for the information in z")
    return _png(fig)


def latent_projection(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """2-D coordinates for posterior means: the means themselves when latent_dim == 2, else
    PCA. Projected onto orthonormal axes the isotropic prior N(0, I) stays N(0, I), so its
    contours are the same circles in either case."""
    if mu.shape[1] == 2:
        return mu, None, None
    mean = mu.mean(axis=0)
    _, _, vt = np.linalg.svd(mu - mean, full_matrices=False)
    axes = vt[:2]
    # Project without centring, so the prior's centre (the origin) stays at the origin.
    return mu @ axes.T, axes, mean


def latent_map(coords: np.ndarray, labels: np.ndarray, projected: bool, class_names: list[str]) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 6.3))
    cmap = plt.get_cmap("tab10")
    for k in range(10):
        sel = labels == k
        ax.scatter(coords[sel, 0], coords[sel, 1], s=3, color=cmap(k), alpha=0.6, label=class_names[k])
    # Contours of N(0, I): the circles where the density falls to exp(-r^2/2) of its peak.
    theta = np.linspace(0, 2 * np.pi, 200)
    for r in (1, 2, 3):
        ax.plot(r * np.cos(theta), r * np.sin(theta), color="black", lw=0.8, ls="--")
        ax.annotate(f"{r}σ", (r * 0.71, r * 0.71), fontsize=8)
    lim = max(3.5, float(np.percentile(np.abs(coords), 99.5)) * 1.05)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel("PC 1 of posterior means" if projected else "z₁")
    ax.set_ylabel("PC 2 of posterior means" if projected else "z₂")
    ax.legend(markerscale=4, fontsize=8, loc="upper right", ncols=2)
    ax.set_title("Posterior means of test digits, with the N(0, I) prior's 1-3σ contours")
    return _png(fig)


def kl_per_dim(kl_dims: np.ndarray) -> bytes:
    fig, ax = plt.subplots(figsize=(max(4, len(kl_dims) * 0.25), 3))
    order = np.argsort(-kl_dims)
    ax.bar(range(len(kl_dims)), kl_dims[order], color="tab:red")
    ax.axhline(0.01, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("latent dimension (sorted)")
    ax.set_ylabel("mean KL (nats)")
    ax.set_title("KL to the prior per dimension: near-zero dims carry no information")
    return _png(fig)


@torch.no_grad()
def build_report(
    model: VAE,
    history: list[dict],
    test_images: Tensor,
    test_labels: np.ndarray,
    class_names: list[str],
    seed: int = 0,
) -> tuple[dict[str, bytes], dict]:
    """Renders every figure; returns {file name: bytes} and the latent-map data.

    `test_images` are float [N, 1, 28, 28] in [0, 1] (grey, as a client would send)."""
    model.eval().cpu()
    generator = torch.Generator().manual_seed(seed)
    files: dict[str, bytes] = {}
    files["loss_curves.png"] = loss_curves(history)

    z = torch.randn(100, model.cfg.latent_dim, generator=generator)
    files["prior_samples.png"] = _grid_figure(
        image_grid(torch.sigmoid(model.decoder(z)), 10), "Decoded samples z ~ N(0, I), temperature 1"
    )

    originals = test_images[:50]
    mu, _ = model.encoder(originals)
    recon = torch.sigmoid(model.decoder(mu))
    pairs = torch.stack([originals, recon], dim=1).flatten(0, 1)
    files["reconstructions.png"] = _grid_figure(image_grid(pairs, 20), "Test digit | reconstruction")

    mus, sigmas = [], []
    for s in range(0, len(test_images), 1000):
        m, sg = model.encoder(test_images[s : s + 1000])
        mus.append(m)
        sigmas.append(sg)
    mu_all, sigma_all = torch.cat(mus), torch.cat(sigmas)
    coords, axes, _ = latent_projection(mu_all.numpy())
    files["latent_map.png"] = latent_map(coords, test_labels, axes is not None, class_names)
    files["kl_per_dim.png"] = kl_per_dim(kl_to_standard_normal(mu_all, sigma_all).mean(0).numpy())

    # Interpolation strips: straight lines in z between pairs of test digits of different classes.
    strips = []
    firsts = [int(np.flatnonzero(test_labels == k)[0]) for k in range(10)]
    for a, b in [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]:
        za, zb = mu_all[firsts[a]], mu_all[firsts[b]]
        t = torch.linspace(0, 1, 10).unsqueeze(1)
        strips.append(torch.sigmoid(model.decoder((1 - t) * za + t * zb)))
    files["interpolation.png"] = _grid_figure(
        image_grid(torch.cat(strips), 10), "Straight lines in latent space between test digits"
    )
    if model.cfg.latent_dim == 2:
        files["manifold.png"] = manifold(model)

    # The data behind the latent map, for front ends (the explorer draws it live).
    n_points = min(len(coords), 3000)
    latent_map_data = {
        "description": "posterior means of test digits; coords are the 2-D means (latent_dim 2) "
        "or their projection on the first two principal axes",
        "projection": None if axes is None else {"axes": axes.round(6).tolist()},
        "class_names": class_names,
        "points": [
            [round(float(x), 4), round(float(y), 4), int(lbl)]
            for (x, y), lbl in zip(coords[:n_points], test_labels[:n_points], strict=True)
        ],
    }
    files["latent_map.json"] = json.dumps(latent_map_data, separators=(",", ":")).encode()
    return files, latent_map_data


def prior_comparison(standard: Tensor, learned: Tensor) -> bytes:
    """Decoded draws through both priors from the same noise u, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, images, title in (
        (axes[0], standard, "standard prior: z = u"),
        (axes[1], learned, "learned prior: z = prior(u)"),
    ):
        ax.imshow(image_grid(images, 10), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(
        "The same 100 noise vectors u ~ N(0, I), decoded through each prior: the learned one moves "
        "draws out of the holes between the digits' regions",
        fontsize=9,
    )
    return _png(fig)


def class_draws(images: Tensor, per_class: int) -> bytes:
    """Draws of each class, [classes * per_class, 1, 28, 28], one row per class."""
    return _grid_figure(
        image_grid(images, cols=per_class),
        "prior_given(u, y, 1): one row per class y, the same u in every row",
    )


def prior_draws_map(
    coords: np.ndarray, labels: np.ndarray, standard: np.ndarray, learned: np.ndarray, projected: bool
) -> bytes:
    """Draws of both priors over the posterior means of test digits, in the latent map's plane."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 6), sharex=True, sharey=True)
    cmap = plt.get_cmap("tab10")
    for ax, draws, title in (
        (axes[0], standard, "standard prior z = u"),
        (axes[1], learned, "learned prior z = prior(u)"),
    ):
        for k in range(10):
            sel = labels == k
            ax.scatter(coords[sel, 0], coords[sel, 1], s=2, color=cmap(k), alpha=0.3)
        ax.scatter(draws[:, 0], draws[:, 1], s=4, color="black", alpha=0.7, label="draws")
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
        ax.set_xlabel("PC 1 of posterior means" if projected else "z₁")
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_ylabel("PC 2 of posterior means" if projected else "z₂")
    lim = max(3.5, float(np.percentile(np.abs(coords), 99.5)) * 1.05)
    axes[0].set_xlim(-lim, lim)
    axes[0].set_ylim(-lim, lim)
    fig.suptitle(
        "Draws (black) over the posterior means of test digits (coloured by class), in the plane of "
        "their two main axes.\nThe holes between the classes' regions lie in all 32 dimensions and "
        "overlap in this projection; the 2-D model's figure shows them."
        if projected
        else "Draws (black) over the posterior means of test digits (coloured by class): N(0, I) draws "
        "also fall in the holes between the regions, the learned prior's fall where digits are",
        fontsize=9,
    )
    return _png(fig)


@torch.no_grad()
def manifold(model: VAE, steps: int = 20, extent: float = 3.0) -> bytes:
    """For a 2-D latent space: the decoded image at every point of a grid over [-3, 3]^2."""
    axis = torch.linspace(extent, -extent, steps)
    grid_z = torch.stack(torch.meshgrid(axis, -axis, indexing="ij"), dim=-1).flip(-1).reshape(-1, 2)
    images = torch.sigmoid(model.decoder(grid_z))
    return _grid_figure(image_grid(images, steps, pad=0), "Decoded grid over z in [-3, 3]²")


def prior_card(manifest: dict) -> list[str]:
    """The model card's section on the priors /sample can draw through (format 2 manifests)."""
    priors = manifest.get("priors")
    if not priors:
        return []
    lines = [
        "",
        "## Priors",
        "",
        f"`/sample` draws noise u ~ N(0, I) and decodes z; the default is **{manifest['default_prior']}**.",
        "",
    ]
    for name in ("standard", "learned"):
        if name in priors:
            lines.append(f"- **{name}**: {priors[name]['description']}")
    rows = [
        (n, priors[n]["sample_quality"])
        for n in ("standard", "learned")
        if (priors.get(n) or {}).get("sample_quality")
    ]
    if rows:
        first = rows[0][1]
        lines += [
            "",
            f"The digit classifier on {first['samples']:,} draws at temperature {first['temperature']:g}, "
            "the same noise for each prior:",
            "",
            f"| prior | confident (≥ {first['confidence_threshold']}) | rarest digit | inception score |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {n} | {q['confident_share']:.1%} | {q['min_class_share']:.1%} | {q['inception_score']:.2f} |"
            for n, q in rows
        ]
    learned = priors.get("learned") or {}
    if learned.get("sample_quality_t0.5"):
        q = learned["sample_quality_t0.5"]
        lines += [
            "",
            f"At temperature 0.5 the learned prior's draws are {q['confident_share']:.1%} confident, the "
            f"rarest digit {q['min_class_share']:.1%} of them: the temperature scales the spread within "
            "each component and leaves the mix of digits as it is.",
        ]
    per_class = learned.get("class_quality")
    if per_class:
        names = [c["name"] for c in manifest.get("classes") or []] or [str(c["class"]) for c in per_class]
        summary = learned["class_quality_summary"]
        lines += [
            "",
            f"Draws of one class (`label`), {per_class[0]['samples']} per class at temperature "
            f"{per_class[0]['temperature']:g}: the share the classifier reads as the class asked for with "
            f"confidence ≥ 0.9 (mean {summary['mean']:.1%}, worst {summary['worst']:.1%}, class "
            f"{summary['worst_class']}):",
            "",
            "| class | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
            "| confident as asked | " + " | ".join(f"{c['confident_share']:.1%}" for c in per_class) + " |",
        ]
    nll = manifest["metrics"].get("prior_likelihood")
    if nll:
        lines += [
            "",
            f"IWAE NLL of {nll['images']:,} binarised test images (k = {nll['iwae_k']}): "
            f"{nll['standard_iwae_nll']:.2f} nats with p(z) = N(0, I), "
            f"{nll['learned_iwae_nll']:.2f} nats with p(z) the learned prior's density.",
        ]
    return lines


def model_card(manifest: dict, figures: dict[str, str]) -> str:
    """The model card: what the model is, how well it does, how it was made. Any artifact's
    manifest will do (a learned prior can be added to one that lacks the trainer's fields)."""
    metrics = manifest.get("metrics") or {}
    m = metrics.get("test")
    q = metrics.get("sample_quality")
    t = manifest.get("training") or {}
    dataset = manifest.get("dataset") or {}
    trained_on = f"**{dataset.get('name', 'an unnamed dataset')}**"
    if dataset.get("train_images"):
        trained_on += f" ({dataset['train_images']:,} training images)"
    lines = [
        f"# Model card: {manifest['name']} {manifest['version']}",
        "",
        f"A convolutional variational autoencoder trained on {trained_on}. "
        f"Latent space: {manifest['latent_dim']} dimensions, prior N(0, I); posterior q(z|x) = "
        "N(mu, diag(sigma²)); likelihood: independent Bernoulli over the 784 pixels.",
        "",
    ]
    if t.get("wall_time_s") is not None:
        lines += [
            f"Created {manifest['created_at']} by `vae-train` in {t['wall_time_s'] / 60:.1f} minutes of "
            f"training on {t['device']} ({t['epochs']} epochs).",
            "",
        ]
    if manifest.get("base"):
        base = manifest["base"]
        lines += [
            f"Its encoder and decoder are those of {base['name']} {base['version']}, bit for bit; the "
            "figures below that concern them were measured on that version.",
            "",
        ]
    if m:
        lines += [
            "## Metrics on the held-out test set",
            "",
            f"Measured on {m['images']:,} test images, stochastically binarised with seed "
            f"{m['binarisation_seed']}.",
            "",
            "| metric | value |",
            "|---|---|",
            f"| IWAE NLL, k = {m['iwae_k']} (−log p(x), upper bound) | {m['iwae_nll']:.2f} nats |"
            if m.get("iwae_nll") is not None
            else "| IWAE NLL | not computed |",
            f"| negative ELBO | {m['neg_elbo']:.2f} nats |",
            f"| reconstruction term E_q[−log p(x∣z)] | {m['reconstruction']:.2f} nats |",
            f"| KL(q(z∣x) ‖ N(0, I)) | {m['kl']:.2f} nats |",
            f"| active latent units (Cov_x(mu) > 0.01) | {m['active_units']} of {manifest['latent_dim']} |",
        ]
    if q and m:
        lines += [
            f"| draws z ~ N(0, I) recognised with confidence ≥ {q['confidence_threshold']} | "
            f"{q['confident_share']:.1%} of {q['samples']:,} |",
            f"| rarest digit among confident samples | {q['min_class_share']:.1%} |",
            f"| reconstructions keeping their label | {q['reconstruction_accuracy']:.2%} |",
            f"| (judge: digit classifier's own test accuracy) | {q['classifier_accuracy']:.2%} |",
        ]
    lines += prior_card(manifest)
    lines += ["", "## Figures", ""]
    for name, caption in figures.items():
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    if t.get("config"):
        lines += ["## How it was trained", "", "```json", json.dumps(t["config"], indent=2), "```", ""]
    lines += ["Reproduce with the make targets in the repository README.", ""]
    return "\n".join(lines)
