"""Where draws from the prior go wrong: the diagnosis behind the learned prior.

    python -m trainer.prior_holes model_store/mnist/v1 --data-dir ../shared/data/mnist

The digit classifier (trainer/classifier.py) judges images decoded from latents of several
origins. If the decoder were blurry, reconstructions of real digits would already fail; if
the prior had holes, reconstructions and posterior draws would pass while draws from N(0, I)
fail, and densities fitted to where the codes of real digits lie (the aggregate posterior)
would pass again, the better the more closely they follow its clusters. Prints a markdown
table; docs/training.md has its output for the shipped model.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from service import artifact
from trainer import data
from trainer.classifier import load_classifier
from trainer.quality import decode_all, judge_images, noise
from trainer.train_prior import MixtureConfig, fit_mixture, posterior_means


def mixture_sampler(z: Tensor, components: int) -> Callable[[int], Tensor]:
    """A full-covariance Gaussian mixture fitted to z by EM (as the learned prior is), as a
    sampler n -> [n, D]."""
    with tempfile.TemporaryDirectory() as work:
        mixture, _ = fit_mixture(MixtureConfig(components=components), z, Path(work), progress=False)
    return lambda n: mixture(noise(n, z.shape[1], seed=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="an artifact directory, e.g. model_store/mnist/v1")
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, art = artifact.load(args.artifact)
    judge = load_classifier()
    train = torch.from_numpy(np.array(data.load_split(args.data_dir, "train", "mnist").images))
    test = torch.from_numpy(np.array(data.load_split(args.data_dir, "test", "mnist").images))
    grey = test.float().div(255).unsqueeze(1)
    latent_dim = art.latent_dim
    n = args.samples
    rows: list[tuple[str, dict]] = []

    with torch.no_grad():
        rows.append(("real test digits (no model)", judge_images(judge, grey[:n])))
        mu, sigma = (
            torch.cat(parts)
            for parts in zip(*(model.encode(grey[s : s + 1000]) for s in range(0, n, 1000)), strict=True)
        )
        rows.append(
            (
                "reconstructions decode(mu(x)) of test digits",
                judge_images(judge, decode_all(model.decode, mu)),
            )
        )
        eps = noise(n, latent_dim, seed=1)
        rows.append(
            (
                "posterior draws decode(mu + sigma * eps) of test digits",
                judge_images(judge, decode_all(model.decode, mu + sigma * eps)),
            )
        )
        u = noise(n, latent_dim, seed=0)
        for t in (1.0, 0.8):
            rows.append(
                (
                    f"prior draws z ~ N(0, I), temperature {t:g}",
                    judge_images(judge, decode_all(model.decode, u * t)),
                )
            )
        codes = posterior_means(model.encode, train)
        for k, label in (
            (1, "one full-covariance Gaussian"),
            (10, "a 10-component Gaussian mixture"),
            (50, "a 50-component mixture"),
        ):
            sampler = mixture_sampler(codes, k)
            rows.append(
                (
                    f"{label} fitted to the training set's posterior means",
                    judge_images(judge, decode_all(model.decode, sampler(n))),
                )
            )

    print(f"{art.name} {art.version}: the digit classifier on {n:,} images of each kind\n")
    print("| what was decoded | confident (>= 0.9) | rarest digit | inception score |")
    print("|---|---:|---:|---:|")
    for label, q in rows:
        shares = f"{q['confident_share']:.3f} | {q['min_class_share']:.3f}"
        print(f"| {label} | {shares} | {q['inception_score']:.2f} |")


if __name__ == "__main__":
    main()
