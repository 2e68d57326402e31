"""A small CNN digit classifier: the judge of sample quality.

A VAE's likelihood says little about whether its samples *look* like digits. This
classifier, trained on real MNIST, gives two checkable figures: the share of prior samples
it recognises confidently (and how evenly they spread over the ten classes), and the share
of reconstructions that keep their original label.

Retrain the shipped weights with `python -m trainer.classifier --data-dir DIR`.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS = Path(__file__).parent / "assets" / "mnist-classifier.pt"


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7x7
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(128, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # logits over the ten digits


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 2) -> Tensor:
    """Translates each image by up to max_shift pixels: digits are not always centred."""
    padded = F.pad(x, [max_shift] * 4)
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + 28, dx : dx + 28]
    return out


def train_classifier(
    images_u8: np.ndarray, labels: np.ndarray, epochs: int = 4, seed: int = 0, batch_size: int = 128
) -> DigitClassifier:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = torch.from_numpy(np.array(images_u8)).float().div(255).unsqueeze(1)
    y_all = torch.from_numpy(np.array(labels))
    steps = epochs * ((len(x_all) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = random_shift(x_all[idx], generator)
            # Half the batch binarised: the judge must also read the VAE's binary-trained world.
            binarise = torch.rand(len(x), 1, 1, 1, generator=generator) < 0.5
            x = torch.where(binarise, torch.bernoulli(x, generator=generator), x)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: DigitClassifier, images: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """(labels, confidences) for float images [B, 1, 28, 28] in [0, 1]."""
    model.eval()
    probs = torch.cat(
        [F.softmax(model(images[s : s + batch_size]), dim=1) for s in range(0, len(images), batch_size)]
    )
    confidence, label = probs.max(dim=1)
    return label, confidence


def load_classifier(path: Path = WEIGHTS) -> DigitClassifier:
    if not path.is_file():
        raise FileNotFoundError(
            f"digit classifier weights not found at {path}; train them with "
            "`python -m trainer.classifier --data-dir <MNIST dir>`"
        )
    model = DigitClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def weights_sha256(path: Path = WEIGHTS) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    from trainer.data import load_split

    parser = argparse.ArgumentParser(description="Train the MNIST digit classifier that judges VAE samples")
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="another seed trains the second judge that checks the first's filtering",
    )
    args = parser.parse_args()
    train = load_split(args.data_dir, "train", "mnist")
    test = load_split(args.data_dir, "test", "mnist")
    model = train_classifier(train.images, train.labels, epochs=args.epochs, seed=args.seed)
    x = torch.from_numpy(np.array(test.images)).float().div(255).unsqueeze(1)
    labels, _ = predict(model, x)
    accuracy = (labels.numpy() == test.labels).mean()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"test accuracy {accuracy:.4f}; weights written to {args.out}")


if __name__ == "__main__":
    main()
