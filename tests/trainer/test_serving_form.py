"""The serving form (trainer/fast_decoder.py, trainer.export.serving_forms) computes the training
modules' functions; vae-export re-exports an artifact from the same weights; the shipped v4
models are v3's functions on real digits, in both runtimes' files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service import artifact
from tests.conftest import HAS_MNIST, MNIST_DIR, SHIPPED_STORE, make_artifact, needs_mnist
from trainer.export import SERVING_FORM_TOLERANCE, load_programs, serving_forms
from trainer.fast_decoder import ConvTransposeGemm, FastDecoder
from trainer.model import Decoder, VAEConfig
from trainer.reexport import reexport


@pytest.mark.parametrize("cin,cout,size", [(64, 32, 7), (32, 1, 14), (3, 5, 4)])
def test_a_transposed_convolution_as_one_product_and_four_shifted_adds(
    cin: int, cout: int, size: int
) -> None:
    torch.manual_seed(cin)
    conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
    x = torch.randn(3, cin, size, size)
    with torch.no_grad():
        expected = conv(x)
        got = ConvTransposeGemm(conv)(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-5


def test_other_transposed_convolutions_are_refused_not_mistranslated() -> None:
    with pytest.raises(ValueError, match="kernel 4, stride 2, padding 1"):
        ConvTransposeGemm(nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1))


@pytest.mark.parametrize("blocks", [0, 1])
def test_the_fast_decoder_is_the_decoder(blocks: int) -> None:
    torch.manual_seed(blocks)
    decoder = Decoder(VAEConfig(latent_dim=6, channels=8, hidden=32, blocks=blocks)).eval()
    z = torch.randn(9, 6)
    with torch.no_grad():
        expected = decoder(z)
        eager = FastDecoder(decoder).eval()(z)
        scripted = torch.jit.script(FastDecoder(decoder).eval())(z)
    assert eager.shape == expected.shape == (9, 1, 28, 28)
    assert float((eager - expected).abs().max()) < 1e-5
    assert float((eager - scripted).abs().max()) < 1e-6  # TorchScript may round a last bit otherwise


def test_serving_forms_check_every_method_in_both_formats(tmp_path: Path) -> None:
    art = make_artifact(tmp_path, "tiny", latent_dim=4, classes=3)
    model, art = artifact.load(art.path)
    classifier = artifact.load_classifier(art)
    assert classifier is not None
    judge = nn.Sequential(nn.Flatten(), _centred(), nn.Linear(28 * 28, 3))
    judge.load_state_dict(classifier.classifier.state_dict())
    forms = serving_forms(model, classifier, classifier_module=judge)
    assert forms.methods == ("encode", "decode", "prior", "prior_given")
    assert all(v <= SERVING_FORM_TOLERANCE for k, v in forms.checks.items() if k != "images")
    assert forms.checks["encode_torchscript"] == 0.0  # the encoder is the trained one, as it was
    programs = load_programs(forms.programs)
    z = torch.randn(40, 4)  # a batch size that was not traced: the batch dimension is dynamic
    with torch.no_grad():
        assert float((programs["decode"](z) - model.decode(z)).abs().max()) <= SERVING_FORM_TOLERANCE
        assert torch.equal(forms.torchscript.decode(z), forms.torchscript.decode(z))
    assert forms.torchscript.decoder.original_name == "FastDecoder"
    assert set(load_programs(forms.classifier_programs or b"")) == {"classify"}


def test_vae_export_writes_a_new_version_from_the_same_weights(tmp_path: Path) -> None:
    base = make_artifact(tmp_path, "tiny", latent_dim=4, learned_prior=True)
    # format 3 without classes: a flow or mixture prior of any kind re-exports the same way
    written = reexport(base.path, tmp_path, None)
    assert written.version == "v2" and written.manifest["base"]["version"] == "v1"
    assert written.manifest["exported"]["methods"] == ["encode", "decode", "prior"]
    assert written.manifest["serving_form"]["checked_on"].endswith("random images (no data at hand)")
    new, _ = artifact.load(written.path)
    old, _ = artifact.load(base.path)
    u, t = torch.randn(7, 4), torch.full((7,), 0.8)
    with torch.no_grad():
        assert torch.equal(new.prior(u, t), old.prior(u, t))
        assert float((new.decode(u) - old.decode(u)).abs().max()) <= SERVING_FORM_TOLERANCE
    # The base is untouched (artifacts are immutable) and the new version cannot be re-exported again
    assert artifact.verify(base.path)
    with pytest.raises(Exception, match="already in the serving form"):
        reexport(written.path, tmp_path, None)


def test_a_corrupt_program_archive_is_refused_with_its_name(tmp_path: Path) -> None:
    base = make_artifact(tmp_path, "tiny", latent_dim=4, learned_prior=True)
    written = reexport(base.path, tmp_path, None)
    # Replace model.pt2 by other bytes and record their hash: verify passes, loading must not
    (written.path / artifact.PROGRAMS_FILE).write_bytes(b"not a zip archive")
    manifest = json.loads((written.path / artifact.MANIFEST_FILE).read_text())
    manifest["files"][artifact.PROGRAMS_FILE] = artifact.sha256_file(written.path / artifact.PROGRAMS_FILE)
    (written.path / artifact.MANIFEST_FILE).write_text(json.dumps(manifest))
    art = artifact.Artifact(written.path, artifact.verify(written.path))
    with pytest.raises(artifact.ArtifactError, match=r"model\.pt2 is not a loadable torch\.export archive"):
        artifact.load_programs(art)


def test_an_exported_entry_naming_another_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        artifact.ArtifactError, match=r"`exported` must be an object whose `file` is 'model\.pt2'"
    ):
        make_artifact(
            tmp_path, "tiny", latent_dim=4, exported={"file": "../x.pt2", "methods": ["encode", "decode"]}
        )


# ---------------------------------------------------------------------------- the shipped v4


@pytest.fixture(scope="module")
def test_digits() -> torch.Tensor:
    if not HAS_MNIST:
        pytest.skip(f"real MNIST not found in {MNIST_DIR}")
    from trainer.data import load_split

    images = load_split(MNIST_DIR, "test").images[:2000]
    return torch.from_numpy(np.asarray(images, np.float32) / 255.0).unsqueeze(1)


@needs_mnist
@pytest.mark.parametrize("name", ["mnist", "mnist-2d"])
def test_shipped_v4_is_v3_in_the_serving_form_on_real_digits(name: str, test_digits: torch.Tensor) -> None:
    v3, art3 = artifact.load(artifact.resolve(SHIPPED_STORE, name, "v3"))
    v4, art4 = artifact.load(artifact.resolve(SHIPPED_STORE, name, "v4"))
    assert art4.manifest["base"] == {**art4.manifest["base"], "name": name, "version": "v3"}
    assert art4.manifest["base"]["model_sha256"] == art3.manifest["files"]["model.pt"]
    assert art4.manifest["classes"] == art3.manifest["classes"]
    assert art4.manifest["priors"] == art3.manifest["priors"]
    assert art4.manifest["files"]["classifier.pt"] == art3.manifest["files"]["classifier.pt"]  # the same file
    assert v4.decoder.original_name == "FastDecoder" and v3.decoder.original_name == "Decoder"
    programs = artifact.load_programs(art4)
    d = art4.latent_dim
    with torch.no_grad():
        mu, sigma = v3.encode(test_digits)
        mu4, sigma4 = v4.encode(test_digits)
        assert torch.equal(mu, mu4) and torch.equal(sigma, sigma4)  # the encoder as trained, bit for bit
        reference = v3.decode(mu)
        assert float((v4.decode(mu) - reference).abs().max()) <= SERVING_FORM_TOLERANCE
        assert float((programs["decode"](mu) - reference).abs().max()) <= SERVING_FORM_TOLERANCE
        pmu, psigma = programs["encode"](test_digits)
        assert float((pmu - mu).abs().max()) <= 1e-5 and float((psigma - sigma).abs().max()) <= 1e-5
        u = torch.randn(500, d, generator=torch.Generator().manual_seed(0))
        y = torch.arange(500) % 11 - 1
        t = torch.full((500,), 0.9)
        assert torch.equal(v4.prior_given(u, y, t), v3.prior_given(u, y, t))
        assert float((programs["prior_given"](u, y, t) - v3.prior_given(u, y, t)).abs().max()) <= 1e-5
        classifier = artifact.load_classifier(art3)
        assert classifier is not None
        images = reference[:500]
        assert float((programs["classify"](images) - classifier(images)).abs().max()) <= 1e-5


def test_the_shipped_v4_manifests_record_what_was_checked() -> None:
    for name in ("mnist", "mnist-2d"):
        manifest = artifact.verify(artifact.resolve(SHIPPED_STORE, name, "v4"))
        form = manifest["serving_form"]
        assert form["checked_on"] == "1000 real test digits"
        assert 0 < form["largest_difference"]["decode_torchscript"] <= SERVING_FORM_TOLERANCE
        assert manifest["exported"]["classifier_file"] == "classifier.pt2"
        assert set(manifest["exported"]["methods"]) == {"encode", "decode", "prior", "prior_given"}


def test_the_exported_programs_load_without_torchscript(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading model.pt2 neither calls torch.jit nor raises or hides a deprecation warning."""

    def no_torchscript(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", no_torchscript)
    art = artifact.Artifact(
        artifact.resolve(SHIPPED_STORE, "mnist", "v4"),
        artifact.verify(artifact.resolve(SHIPPED_STORE, "mnist", "v4")),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        programs = artifact.load_programs(art)
        programs["decode"](torch.zeros(2, 32))
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], [
        str(w.message) for w in caught
    ]


def _centred() -> nn.Module:
    from tests.conftest import _Centred

    return _Centred()
