"""Draws of each class through the service, judged twice: `make classes` (or python -m bench.classes).

For every class of the served model (mnist by default), through POST /sample of the service
app (in process, with its real batching and inference threads):

- `label` alone: n draws at temperature 1 from seed 0, the share the shipped classifier (the
  artifact's classifier.pt, whose verdicts come back with the draws) reads as the class asked
  for with confidence >= 0.9: what vae-train wrote into the manifest, measured again here;
- `label` with min_confidence 0.9: how many draws were redrawn (the redraw rate, per class),
  and the share a *second* classifier reads as the class with confidence >= 0.9. The second
  classifier did not do the filtering: the same network trained with another seed
  (trainer/classifier.py --seed 1), trained here on first use and kept in runs/.

Needs real MNIST (for the second classifier's training and accuracy) in --data-dir.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from trainer.classifier import DigitClassifier, predict, train_classifier
from trainer.data import load_split

SECOND = Path("runs") / "second-classifier-seed1.pt"


def second_classifier(data_dir: Path, seed: int = 1) -> tuple[DigitClassifier, float]:
    """The judge that did not filter, and its test accuracy (trained once, then loaded)."""
    test = load_split(data_dir, "test", "mnist")
    model = DigitClassifier()
    if SECOND.is_file():
        model.load_state_dict(torch.load(SECOND, map_location="cpu", weights_only=True))
    else:
        print(f"training the second classifier (seed {seed}) into {SECOND}; a few minutes ...", flush=True)
        train = load_split(data_dir, "train", "mnist")
        model = train_classifier(train.images, train.labels, seed=seed)
        SECOND.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), SECOND)
    model.eval()
    labels, _ = predict(model, torch.from_numpy(np.array(test.images)).float().div(255).unsqueeze(1))
    return model, float((labels.numpy() == test.labels).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.classes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--n", type=int, default=500, help="draws per class")
    parser.add_argument("--min-confidence", type=float, default=0.9)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--store", type=Path, default=Path(__file__).resolve().parents[1] / "model_store")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    judge, accuracy = second_classifier(args.data_dir)
    settings = Settings(model_store=args.store, models=[args.model], default_model=args.model)
    with TestClient(create_app(settings)) as client:
        info = client.get(f"/models/{args.model}").json()
        print(
            f"model {info['name']} {info['version']}; shipped classifier test accuracy "
            f"{info['classifier']['test_accuracy']:.4f}; second classifier (seed 1) {accuracy:.4f}"
        )
        print(
            f"{'class':>5s} {'shipped p>=0.9':>14s} {'second p>=0.9':>13s} | with min_confidence "
            f"{args.min_confidence:g}: {'redraws':>7s} {'per draw':>8s} {'second p>=0.9':>13s} {'ms':>6s}"
        )
        plain_shares, filtered_shares = [], []
        for c in info["classes"]:
            body = {"n": args.n, "seed": 0, "label": c["index"], "format": "array", "return_verdicts": True}
            plain = client.post("/sample", json=body).json()
            shipped = np.mean(
                [v["label"] == c["index"] and v["confidence"] >= 0.9 for v in plain["verdicts"]]
            )
            started = time.perf_counter()
            strict = client.post("/sample", json={**body, "min_confidence": args.min_confidence})
            elapsed = (time.perf_counter() - started) * 1000
            if strict.status_code != 200:
                print(f"{c['name']:>5s} min_confidence refused: {strict.json()['detail']}")
                continue
            answer = strict.json()
            second = []
            for images in (plain["images"], answer["images"]):
                x = torch.tensor(images, dtype=torch.float32).unsqueeze(1)
                read, confidence = predict(judge, x)
                second.append(float(((read == c["index"]) & (confidence >= 0.9)).float().mean()))
            plain_shares.append(shipped)
            filtered_shares.append(second[1])
            print(
                f"{c['name']:>5s} {shipped:14.3f} {second[0]:13.3f} | {'':>21s}{answer['redraws']:7d} "
                f"{answer['redraws'] / args.n:8.3f} {second[1]:13.3f} {elapsed:6.0f}"
            )
        print(
            f"label alone, shipped classifier: mean {np.mean(plain_shares):.4f}, "
            f"worst {np.min(plain_shares):.4f}; "
            f"with min_confidence, second classifier: worst class {np.min(filtered_shares):.4f}"
        )


if __name__ == "__main__":
    main()
