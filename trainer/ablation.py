"""Measures what each training choice is worth: short runs that differ in one setting.

    python -m trainer.ablation --data-dir ../shared/data/mnist --epochs 10

Prints a markdown table (test -ELBO, IWAE NLL, active units, and the digit classifier's view of
prior samples and reconstructions) for the full recipe and for the recipe with each choice
switched off or changed. Short runs understate effects that grow with training
(overfitting without dynamic binarisation), so read the table as signs, not final figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from trainer.classifier import load_classifier
from trainer.data import load_split
from trainer.evaluate import evaluate
from trainer.model import VAEConfig
from trainer.quality import sample_quality
from trainer.train import TrainConfig, train

VARIANTS = {
    "full recipe": {},
    "no KL warm-up": {"kl_warmup_epochs": 0.0},
    "static binarisation": {"dynamic_binarisation": False},
    "constant learning rate": {"lr_final_ratio": 1.0},
    "free bits 0.25 nats/dim": {"free_bits": 0.25},
    "latent_dim 16": {"model": {"latent_dim": 16}},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--warmup", type=float, default=3.0, help="KL warm-up epochs of the full recipe")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--iwae-k", type=int, default=200)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()

    base = TrainConfig(
        data_dir=args.data_dir,
        epochs=args.epochs,
        kl_warmup_epochs=args.warmup,
        device="cpu",
        model=VAEConfig(latent_dim=32, channels=32, hidden=512, blocks=0),
    )
    split = load_split(args.data_dir, "test", "mnist")
    test = torch.from_numpy(np.array(split.images[: args.test_images]))
    grey = test.float().div(255).unsqueeze(1)
    judge = load_classifier()
    print(
        f"{args.epochs} epochs on the full training set; metrics on {len(test)} test images, "
        f"IWAE k={args.iwae_k}\n"
    )
    print(
        "| variant | train -ELBO | test -ELBO | IWAE NLL | active units | confident samples "
        "| reconstructions keeping label | minutes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.variants:
        change = dict(VARIANTS[name])
        model_change = change.pop("model", {})
        cfg = replace(base, model=replace(base.model, **model_change), **change)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            model, state = train(cfg, Path(workdir), resume=False, progress=False)
        m = evaluate(model, test, iwae_k=args.iwae_k)
        q = sample_quality(model, judge, grey, split.labels[: args.test_images])
        print(
            f"| {name} | {state.history[-1]['loss']:.2f} | {m.neg_elbo:.2f} | {m.iwae_nll:.2f} | "
            f"{m.active_units} | {q['confident_share']:.1%} | {q['reconstruction_accuracy']:.2%} | "
            f"{(time.perf_counter() - started) / 60:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
