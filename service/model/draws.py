"""One /sample request's draw, as one value: what was asked (Draw) and what came of it (Drawn).

A draw goes from the route through inference to the response unchanged in shape, however
many options it grows (a class, verdicts, a minimum confidence): the routes, the inference
layer and the responses pass these two values, not long argument lists."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Draw:
    """n draws of noise u ~ N(0, I) from `seed`, through `prior`, at `temperature`."""

    n: int
    seed: int
    temperature: float
    prior: str  # "standard" or "learned"
    label: int | None = None  # a class index: every draw of that class (learned prior only)
    verdicts: bool = False  # the classifier's verdict on each image
    # Keep only draws the classifier reads (as `label`, or as any class) with at least this
    # confidence; the others are redrawn (service.model.inference.Inference.sample).
    min_confidence: float | None = None

    @property
    def judged(self) -> bool:
        """Whether the classifier looks at the images."""
        return self.verdicts or self.min_confidence is not None

    def accepted(self, probabilities: np.ndarray) -> np.ndarray:
        """Which draws min_confidence keeps: [n] bool, from the classifier's [n, classes]."""
        assert self.min_confidence is not None
        read = probabilities.argmax(1)
        confident = probabilities.max(1) >= self.min_confidence
        return confident if self.label is None else confident & (read == self.label)


@dataclass
class Drawn:
    """What came of a Draw: per image its noise u (at temperature 1), latent z and pixels."""

    u: np.ndarray  # [n, latent_dim]
    z: np.ndarray  # [n, latent_dim]
    images: np.ndarray  # [n, 28, 28] in [0, 1]
    encoded: object = None  # the images' PNGs, made on the inference thread (or None)
    probabilities: np.ndarray | None = None  # [n, classes] when the draw was judged
    redraws: int = 0  # draws replaced because the classifier was not confident enough
    attempts: int = 1  # rounds of drawing (1: nothing was redrawn)
