"""The artifact contract: atomic writes, verification before loading, clear refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from service import artifact
from tests.conftest import make_artifact


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    make_artifact(tmp_path, "m", latent_dim=4)
    return tmp_path


def test_round_trip_and_contract(store: Path) -> None:
    model, art = artifact.load(store / "m" / "v1")
    assert art.name == "m" and art.version == "v1" and art.latent_dim == 4
    for batch in (1, 7, 2000):
        x = torch.rand(batch, 1, 28, 28)
        mu, sigma = (t.detach() for t in model.encode(x))
        assert mu.shape == sigma.shape == (batch, 4)
        assert (sigma > 0).all()
        images = model.decode(mu).detach()
        assert images.shape == (batch, 1, 28, 28) and images.dtype == torch.float32
        assert float(images.min()) >= 0 and float(images.max()) <= 1
        torch.testing.assert_close(model(x).detach(), images)  # forward(x) = decode(mu)


def test_versions_increase_and_latest_resolves(store: Path) -> None:
    make_artifact(store, "m", latent_dim=4, seed=1)
    assert artifact.list_versions(store, "m") == ["v1", "v2"]
    assert artifact.resolve(store, "m") == store / "m" / "v2"
    assert artifact.resolve(store, "m", "v1") == store / "m" / "v1"
    with pytest.raises(artifact.ArtifactError, match="no version 'v9'"):
        artifact.resolve(store, "m", "v9")


def test_versions_sort_numerically(tmp_path: Path) -> None:
    for v in ("v2", "v10", "v9"):
        make_artifact(tmp_path, "m", latent_dim=2, version=v)
    assert artifact.list_versions(tmp_path, "m") == ["v2", "v9", "v10"]


def test_existing_version_is_never_overwritten(store: Path) -> None:
    with pytest.raises(artifact.ArtifactError, match="already exists"):
        make_artifact(store, "m", latent_dim=4, version="v1")


def test_staging_directories_are_invisible(store: Path) -> None:
    (store / "m" / ".staging-v2-deadbeef").mkdir()
    assert artifact.list_versions(store, "m") == ["v1"]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "_fsync_dir", boom)
    with pytest.raises(OSError, match="disk full"):
        make_artifact(tmp_path, "m", latent_dim=2)
    assert list((tmp_path / "m").iterdir()) == []


def test_tampered_model_is_refused(store: Path) -> None:
    path = store / "m" / "v1"
    data = bytearray((path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match=r"model.pt has sha256 .* manifest says .*changed after"):
        artifact.load(path)


def test_missing_file_is_refused(store: Path) -> None:
    (store / "m" / "v1" / "model.pt").unlink()
    with pytest.raises(artifact.ArtifactError, match=r"model\.pt is missing"):
        artifact.verify(store / "m" / "v1")


def test_extra_file_is_refused(store: Path) -> None:
    (store / "m" / "v1" / "evil.py").write_text("print('hi')")
    with pytest.raises(artifact.ArtifactError, match=r"not listed in the manifest: \['evil.py'\]"):
        artifact.verify(store / "m" / "v1")


def test_missing_manifest_is_refused(store: Path) -> None:
    (store / "m" / "v1" / "manifest.json").unlink()
    with pytest.raises(artifact.ArtifactError, match=r"no manifest\.json"):
        artifact.load(store / "m" / "v1")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"name": "m"}', "missing required fields"),
    ],
)
def test_malformed_manifest_is_refused(store: Path, content: str, message: str) -> None:
    (store / "m" / "v1" / "manifest.json").write_text(content)
    with pytest.raises(artifact.ArtifactError, match=message):
        artifact.verify(store / "m" / "v1")


def test_manifest_cannot_point_outside(store: Path) -> None:
    path = store / "m" / "v1"
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(artifact.ArtifactError, match="outside the artifact"):
        artifact.verify(path)


def test_future_format_is_refused(store: Path) -> None:
    path = store / "m" / "v1"
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(artifact.ArtifactError, match="format_version 99 is newer than this code") as caught:
        artifact.verify(path)
    assert "reads versions 1, 2, 3" in str(caught.value) and "upgrade the service" in str(caught.value)
    for odd in ("3", True, 0, 3.5):
        manifest["format_version"] = odd
        (path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(artifact.ArtifactError, match="is not a format version"):
            artifact.verify(path)


def rewrite(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_format_1_artifact_has_the_standard_prior_only(store: Path) -> None:
    path = store / "m" / "v1"
    rewrite(path, format_version=1, priors=None, default_prior=None)
    _, art = artifact.load(path)
    assert art.priors == ("standard",) and art.default_prior == "standard"


def test_new_artifacts_are_format_3_and_list_their_priors(store: Path) -> None:
    _, art = artifact.load(store / "m" / "v1")
    assert art.manifest["format_version"] == 3
    assert art.priors == ("standard",) and art.default_prior == "standard"
    assert art.classes == () and not art.conditional and not art.has_classifier


def test_a_format_3_artifact_with_classes_ships_its_classifier(classes_store: Path) -> None:
    model, art = artifact.load(artifact.resolve(classes_store, "tiny-classes"))
    assert art.classes == ("c0", "c1", "c2") and art.conditional and art.has_classifier
    assert "classifier.pt" in art.manifest["files"] and hasattr(model, "prior_given")
    classifier = artifact.load_classifier(art)
    assert classifier is not None
    with torch.no_grad():
        probabilities = classifier(torch.rand(4, 1, 28, 28))
    assert probabilities.shape == (4, 3) and torch.allclose(probabilities.sum(1), torch.ones(4))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"classes": [{"index": 1, "name": "a"}]}, "must list indices 0 to 0 in order"),
        ({"classes": [{"index": 0, "name": "a"}, {"index": 1, "name": "a"}]}, "distinct non-empty strings"),
        ({"classes": "0123"}, "must be a list of objects"),
        ({"classifier": {"file": "../x.pt"}}, "whose `file` is 'classifier.pt'"),
        ({"classes": None}, "a classifier needs the `classes`"),
    ],
)
def test_bad_classes_or_classifier_entries_are_refused(
    classes_store: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(artifact.resolve(classes_store, "tiny-classes"), copy)
    rewrite(copy, **changes)
    with pytest.raises(artifact.ArtifactError, match=re.escape(message)):
        artifact.verify(copy)


def test_a_tampered_classifier_is_refused(classes_store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(artifact.resolve(classes_store, "tiny-classes"), copy)
    (copy / "classifier.pt").write_bytes((copy / "classifier.pt").read_bytes() + b"x")
    with pytest.raises(artifact.ArtifactError, match=r"classifier\.pt has sha256"):
        artifact.verify(copy)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"priors": None}, r"missing required fields \['priors'\]"),
        ({"priors": {"learned": {}}, "default_prior": "learned"}, "'standard' among its keys"),
        ({"priors": {"standard": {}, "magic": {}}}, r"unknown priors \['magic'\]"),
        ({"default_prior": "learned"}, "default_prior 'learned' is not among the priors"),
        ({"priors": ["standard"]}, "must be an object"),
    ],
)
def test_bad_prior_fields_are_refused(store: Path, changes: dict, message: str) -> None:
    path = store / "m" / "v1"
    rewrite(path, **changes)
    with pytest.raises(artifact.ArtifactError, match=message):
        artifact.verify(path)


def test_a_learned_prior_without_the_models_prior_method_is_refused(store: Path) -> None:
    path = store / "m" / "v1"
    rewrite(path, priors={"standard": {}, "learned": {}}, default_prior="learned")
    with pytest.raises(artifact.ArtifactError, match=r"has no prior\(\) method"):
        artifact.load(path)


def test_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(artifact.ArtifactError, match="bad model name"):
        make_artifact(tmp_path, "../escape", latent_dim=2)
