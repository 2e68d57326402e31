"""Format 3 over HTTP: draws of a given class (`label`), the shipped classifier's verdicts,
`min_confidence` with its deterministic redraws, and the 422s for what a model cannot do.

The model is `tiny-classes` (tests/conftest.py): random weights, three classes c0, c1, c2 with
a class-conditional mixture prior, and a random linear classifier whose verdicts differ from
image to image (draws of c1 it reads as c1 or c2, about half each, with middling confidence:
the class the min_confidence tests ask for). Each answer is checked against the artifact's
TorchScript called directly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from service_support import InProcess, make_settings
from test_client import bridge
from typer.testing import CliRunner
from vae_client import cli as client_cli
from vae_client.client import VAEClient

from service import artifact
from service.app import create_app
from service.model.latents import draw_latents, redraw_latents

LATENT_DIM = 6
CLASSES = ("c0", "c1", "c2")
ATTEMPTS = 30  # VAE_MAX_DRAW_ATTEMPTS here: the random classifier accepts few draws


@pytest.fixture(scope="module")
def served(classes_store: Path, tiny_store: Path) -> Iterator[InProcess]:
    # tiny_store's `tiny` beside it: a format 3 model without classes, for the 422s.
    for name in ("tiny",):
        target = classes_store / name
        if not target.exists():
            target.symlink_to(tiny_store / name, target_is_directory=True)
    app = InProcess(
        create_app(
            make_settings(
                classes_store,
                default_model="tiny-classes",
                batch_max_wait_ms=200.0,
                max_draw_attempts=ATTEMPTS,
            )
        )
    )
    yield app
    app.close()


@pytest.fixture(scope="module")
def model(classes_store: Path) -> torch.jit.ScriptModule:
    loaded, _ = artifact.load(artifact.resolve(classes_store, "tiny-classes"))
    return loaded


@pytest.fixture(scope="module")
def classifier(classes_store: Path) -> torch.jit.ScriptModule:
    _, art = artifact.load(artifact.resolve(classes_store, "tiny-classes"))
    loaded = artifact.load_classifier(art)
    assert loaded is not None
    return loaded


def sample(api: InProcess, **body) -> dict:
    response = api.post("/sample", json={"format": "array", "return_latents": True, **body})
    assert response.status_code == 200, response.text
    return response.json()


def direct(model, u: np.ndarray, label: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(z, images) of noise u at temperature 1 drawn as class `label` (-1: any), called directly,
    in a pass of the batch size's 32 rows: what exact mode promises each row equals (a pass of
    len(u) rows may round differently where that count is not one the CPU computes exactly,
    as 5 is not on an AVX2 host)."""
    rows = len(u)
    padded = np.zeros((max(rows, 32), u.shape[1]), np.float32)
    padded[:rows] = u
    with torch.no_grad():
        y = torch.full((len(padded),), label, dtype=torch.long)
        t = torch.full((len(padded),), temperature)
        z = model.prior_given(torch.from_numpy(padded), y, t)
        return z.numpy()[:rows], model.decode(z)[:rows, 0].numpy()


def probabilities(classifier, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return classifier(torch.from_numpy(np.asarray(images, np.float32))[:, None]).numpy()


def test_the_model_lists_its_classes_and_classifier(served: InProcess) -> None:
    info = served.get("/models/tiny-classes").json()
    assert [c["name"] for c in info["classes"]] == list(CLASSES)
    assert [c["index"] for c in info["classes"]] == [0, 1, 2]
    assert info["conditional"] is True and info["classifier"]["file"] == "classifier.pt"
    plain = served.get("/models/tiny").json()
    assert plain["classes"] == [] and plain["conditional"] is False and plain["classifier"] is None


@pytest.mark.parametrize("label", [1, "c1"])
def test_a_label_draws_that_class_through_prior_given(served: InProcess, model, label: int | str) -> None:
    got = sample(served, n=5, seed=11, temperature=0.7, label=label)
    assert got["label"] == 1 and got["prior"] == "learned"
    noise = draw_latents(5, LATENT_DIM, 11)
    np.testing.assert_array_equal(np.asarray(got["u"], np.float32), noise * np.float32(0.7))
    z, images = direct(model, noise, 1, 0.7)
    np.testing.assert_array_equal(np.asarray(got["z"], np.float32), z)
    np.testing.assert_array_equal(np.asarray(got["images"], np.float32), images)
    other = sample(served, n=5, seed=11, temperature=0.7, label=2)
    assert not np.array_equal(np.asarray(other["z"]), np.asarray(got["z"]))


def test_no_label_draws_from_the_mixture_over_every_class(served: InProcess, model) -> None:
    got = sample(served, n=6, seed=4)
    assert "label" not in got
    z, _ = direct(model, draw_latents(6, LATENT_DIM, 4), -1, 1.0)
    np.testing.assert_array_equal(np.asarray(got["z"], np.float32), z)


def test_the_temperature_scales_the_spread_and_keeps_the_component(served: InProcess, model) -> None:
    """z = mean_k + L_k (t v): at t and at 1 a draw uses the same component k, so
    (z_t - t z_1) / (1 - t) is that component's mean, one of the model's means, for every draw."""
    means = model.noise_to_latent.means.numpy()
    for label in (None, 0, 2):
        extra = {} if label is None else {"label": label}
        one = np.asarray(sample(served, n=64, seed=8, **extra)["z"], np.float64)
        for t in (0.2, 0.5):
            tempered = np.asarray(sample(served, n=64, seed=8, temperature=t, **extra)["z"], np.float64)
            centre = (tempered - t * one) / (1 - t)
            distance = np.linalg.norm(centre[:, None, :] - means[None], axis=2).min(axis=1)
            assert distance.max() < 1e-3, (label, t, distance.max())


def test_verdicts_are_the_shipped_classifiers(served: InProcess, model, classifier) -> None:
    got = sample(served, n=7, seed=3, label=0, return_verdicts=True)
    expected = probabilities(classifier, np.asarray(got["images"], np.float32))
    assert [v["label"] for v in got["verdicts"]] == expected.argmax(1).tolist()
    # atol: the service pads a pass to a calibrated row count, where kernels round a little differently
    np.testing.assert_allclose([v["confidence"] for v in got["verdicts"]], expected.max(1), atol=1e-5)
    assert "redraws" not in got
    json_answer = served.post("/sample", json={"n": 7, "seed": 3, "label": 0, "return_verdicts": True})
    assert "X-Verdicts" not in json_answer.headers  # the body has them; headers stay small
    binary = served.post(
        "/sample",
        json={"n": 7, "seed": 3, "label": 0, "return_verdicts": True},
        headers={"Accept": "application/x-npy"},
    )
    assert [int(item.split(":")[0]) for item in binary.headers["X-Verdicts"].split(",")] == [
        v["label"] for v in got["verdicts"]
    ]
    pixels = np.random.default_rng(0).random((2, 28, 28)).astype(np.float32)
    encoded = served.post("/encode", json={"pixels": pixels.tolist(), "return_verdicts": True}).json()
    assert [v["label"] for v in encoded["verdicts"]] == probabilities(classifier, pixels).argmax(1).tolist()
    rebuilt = served.post(
        "/reconstruct", json={"pixels": pixels.tolist(), "return_verdicts": True, "format": "array"}
    ).json()
    of_reconstructions = probabilities(classifier, np.asarray(rebuilt["images"], np.float32))
    assert [v["label"] for v in rebuilt["verdicts"]] == of_reconstructions.argmax(1).tolist()
    assert "verdicts" not in served.post("/encode", json={"pixels": pixels.tolist()}).json()


def accepted_threshold(served: InProcess, label: int) -> float:
    """A min_confidence that some first draws of `label` meet (those read as `label`, at the
    lower quartile of their confidence) and many do not."""
    verdicts = sample(served, n=32, seed=21, label=label, return_verdicts=True)["verdicts"]
    read = [v["confidence"] for v in verdicts if v["label"] == label]
    assert 4 <= len(read) <= 28, f"the test classifier reads {len(read)} of 32 draws of {label} as {label}"
    return float(np.percentile(read, 25))


def test_min_confidence_redraws_the_others_deterministically(served: InProcess, model) -> None:
    label = 1
    threshold = accepted_threshold(served, label)
    got = sample(served, n=32, seed=21, label=label, min_confidence=threshold)
    verdicts = got["verdicts"]
    assert all(v["label"] == label and v["confidence"] >= threshold for v in verdicts)
    assert got["redraws"] > 0
    # Draw i's noise is row i of the first stream if it was accepted, else of a redraw stream:
    # a function of the seed, i and the attempt alone.
    u = np.asarray(got["u"], np.float32)
    first = draw_latents(32, LATENT_DIM, 21)
    kept = (u == first).all(axis=1)
    assert 0 < kept.sum() < 32
    for i in np.flatnonzero(~kept):
        streams = [redraw_latents(32, LATENT_DIM, 21, a)[i] for a in range(1, ATTEMPTS)]
        assert any(np.array_equal(u[i], row) for row in streams), f"draw {i} is from no redraw stream"
    _, images = direct(model, u, label, 1.0)
    np.testing.assert_array_equal(np.asarray(got["images"], np.float32), images)
    assert got == sample(served, n=32, seed=21, label=label, min_confidence=threshold)
    head = sample(served, n=8, seed=21, label=label, min_confidence=threshold)
    assert head["images"] == got["images"][:8], "a draw depends on n or on the other draws"


def test_labels_and_redraws_batch_to_the_same_bits(served: InProcess) -> None:
    """Requests merged into passes (sent together, a 200 ms window) get exactly what each gets alone."""
    threshold = accepted_threshold(served, 1)
    bodies = [
        {"n": n, "seed": seed, "format": "array", "return_latents": True, **extra}
        for n, seed, extra in [
            (1, 0, {"label": 0}),
            (3, 1, {"label": "c2", "return_verdicts": True}),
            (5, 2, {}),
            (9, 3, {"label": 1, "min_confidence": threshold}),
            (4, 4, {"min_confidence": 0.5, "temperature": 0.6}),
            (2, 5, {"prior": "standard", "return_verdicts": True}),
        ]
    ]

    async def together(client: httpx.AsyncClient) -> list[dict]:
        answers = await asyncio.gather(*(client.post("/sample", json=b) for b in bodies))
        return [a.json() for a in answers]

    merged = served.run(together, served.client)
    for body, got in zip(bodies, merged, strict=True):
        assert got == served.post("/sample", json=body).json(), body


@pytest.mark.parametrize(
    ("body", "slug", "expected"),
    [
        ({"n": 2, "label": 3}, "unknown-label", "has no class 3; its classes, by index and name: 0 ('c0')"),
        ({"n": 2, "label": "seven"}, "unknown-label", "has no class 'seven'"),
        ({"n": 2, "label": -1}, "validation-error", "label"),
        ({"n": 2, "label": 1, "prior": "standard"}, "unknown-label", "through the learned prior"),
        ({"n": 2, "label": 0, "model": "tiny"}, "unknown-label", "model 'tiny' (v1) has no classes"),
        ({"n": 2, "return_verdicts": True, "model": "tiny"}, "no-classifier", "ships no classifier"),
        ({"n": 2, "min_confidence": 0.5, "model": "tiny"}, "no-classifier", "ships no classifier"),
        ({"n": 2, "min_confidence": 1.0}, "validation-error", "min_confidence"),
        ({"n": 2, "min_confidence": 0}, "validation-error", "min_confidence"),
        ({"n": 2, "label": True}, "validation-error", "label"),
        (
            {"n": 4, "min_confidence": 0.999999},
            "min-confidence-not-reached",
            f"after {ATTEMPTS} attempts each (VAE_MAX_DRAW_ATTEMPTS)",
        ),
    ],
)
def test_what_a_model_cannot_do_is_a_422_that_says_why(
    served: InProcess, body: dict, slug: str, expected: str
) -> None:
    response = served.post("/sample", json=body)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"] == f"urn:vae:problem:{slug}"
    assert expected in (problem["detail"] if slug != "validation-error" else response.text)
    if slug == "unknown-label" and "its classes" in expected:
        assert problem["classes"] == list(CLASSES)
    assert served.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("label=11", "has no class 11"),
        ("label=c9", "has no class 'c9'"),
        ("lable=1", "unknown query parameter 'lable'"),
        ("min_confidence=2", "min_confidence"),
        ("label=1&label=2", "given 2 times"),
    ],
)
def test_the_png_route_refuses_what_post_refuses(served: InProcess, query: str, expected: str) -> None:
    response = served.get(f"/sample.png?n=2&{query}")
    assert response.status_code == 422 and expected in response.text


def test_unknown_query_parameters_are_refused_on_every_model_route(served: InProcess) -> None:
    for method, path, body in [
        ("GET", "/models?verbose=1", None),
        ("POST", "/sample?seed=3", {"n": 1}),
        ("POST", "/encode?invert=auto&extra=1", {"pixels": [[[0.0] * 28] * 28]}),
    ]:
        response = served.request(method, path, json=body)
        assert response.status_code == 422, (path, response.text)
        assert "unknown query parameter" in response.json()["detail"]
    assert served.post("/sample?model=tiny-classes&format=array", json={"n": 1}).status_code == 200


def test_the_png_grid_carries_label_verdicts_and_redraws(served: InProcess) -> None:
    threshold = accepted_threshold(served, 1)
    png = served.get(f"/sample.png?n=6&seed=21&label=c1&min_confidence={threshold}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["X-Label"] == "1" and int(png.headers["X-Redraws"]) > 0
    verdicts = [item.split(":") for item in png.headers["X-Verdicts"].split(",")]
    assert len(verdicts) == 6
    assert all(label == "1" and float(c) >= threshold - 1e-4 for label, c in verdicts)
    body = {"n": 6, "seed": 21, "label": 1, "min_confidence": threshold}
    posted = served.post("/sample", json=body, headers={"Accept": "image/png"})
    assert posted.content == png.content and posted.headers["X-Verdicts"] == png.headers["X-Verdicts"]


def test_the_client_and_cli_ask_for_a_label(
    served: InProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with VAEClient("http://testserver", transport=bridge(served)) as vae:
        drawn = vae.sample(4, seed=2, label="c1", return_verdicts=True)
        assert drawn.label == 1 and drawn.verdicts is not None and len(drawn.verdicts) == 4
        strict = vae.sample(4, seed=2, label=1, min_confidence=0.6)
        assert strict.redraws is not None and all(v.label == 1 for v in strict.verdicts or [])
        encoded = vae.encode(np.zeros((1, 28, 28), np.float32) + 0.5, return_verdicts=True)
        assert encoded.verdicts is not None and len(encoded.verdicts) == 1
    with VAEClient("http://testserver", transport=bridge(served), binary=True) as vae:
        binary = vae.sample(4, seed=2, label="c1", return_verdicts=True)
        assert binary.label == 1 and np.array_equal(binary.images, drawn.images)
        assert [v.label for v in binary.verdicts or []] == [v.label for v in drawn.verdicts]
    monkeypatch.setattr(
        client_cli, "_client", lambda url, api_key: VAEClient(url, api_key=api_key, transport=bridge(served))
    )
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(
        client_cli.app, ["sample", "-n", "3", "--seed", "3", "--label", "2", "--verdicts", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "class 2" in result.output and out.read_bytes()[:4] == b"\x89PNG"
    assert len([line for line in result.stdout.splitlines() if line.count("\t") == 2]) == 3
    refused = CliRunner().invoke(client_cli.app, ["sample", "--label", "7"])
    assert refused.exit_code != 0 and "has no class 7" in refused.output
