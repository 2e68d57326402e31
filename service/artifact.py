"""The model artifact: the one contract between the trainer and the service.

This module alone knows the format (docs/artifact.md describes it for people). It writes
artifacts atomically, lists what a store holds, and verifies every file's sha256 before
anything is loaded. It depends on torch and the standard library only, so both the
trainer and the service can use it without importing each other.

    <store>/<name>/<version>/
        model.pt        TorchScript: encode(x) -> (mu, sigma), decode(z) -> x, forward(x),
                        and the learned prior's map when it has one: prior(u) -> z (format 2),
                        prior(u, t) -> z and, with classes, prior_given(u, y, t) -> z (format 3)
        classifier.pt   (format 3, optional) TorchScript: images -> class probabilities
        model.pt2       (format 3, optional) the same methods as torch.export programs
        classifier.pt2  (format 3, optional) the classifier as a torch.export program
        manifest.json   what the model is, how it was trained and evaluated, and files' sha256
        report/         figures and the model card, for people (and the latent map, for the UI)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# 2 added the priors: the manifest's `priors` and `default_prior`, and the model's prior(u).
# 3 added classes (`classes`, the class-conditional prior_given(u, y, t)), the temperature as
# an argument of the prior (it scales the spread inside a component, never which one is
# used), and the shipped classifier (`classifier`, classifier.pt) that gives verdicts.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
STANDARD_PRIOR = "standard"  # z = temperature * u, u ~ N(0, I): every model has it
LEARNED_PRIOR = "learned"  # z = prior(temperature * u): the model's own map from noise to latents
MODEL_FILE = "model.pt"
CLASSIFIER_FILE = "classifier.pt"
PROGRAMS_FILE = "model.pt2"  # torch.export programs, one per method of model.pt (manifest `exported`)
CLASSIFIER_PROGRAMS_FILE = "classifier.pt2"
MANIFEST_FILE = "manifest.json"
REPORT_DIR = "report"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^v(\d{1,9})$")
REQUIRED_FIELDS = (
    "format_version",
    "name",
    "version",
    "created_at",
    "image_shape",
    "latent_dim",
    "likelihood",
    "files",
)
REQUIRED_FIELDS_V2 = ("priors", "default_prior")


class ArtifactError(Exception):
    """An artifact is missing, incomplete, tampered with or of an unknown format."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def latent_dim(self) -> int:
        return int(self.manifest["latent_dim"])

    @property
    def priors(self) -> tuple[str, ...]:
        return priors(self.manifest)

    @property
    def default_prior(self) -> str:
        return default_prior(self.manifest)

    @property
    def format_version(self) -> int:
        return int(self.manifest["format_version"])

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, by index; empty for a model trained without labels (or before format 3)."""
        return classes(self.manifest)

    @property
    def conditional(self) -> bool:
        """Whether the model's learned prior draws a given class: prior_given(u, y, t)."""
        learned = (self.manifest.get("priors") or {}).get(LEARNED_PRIOR) or {}
        return self.format_version >= 3 and bool(self.classes) and bool(learned.get("conditional"))

    @property
    def has_classifier(self) -> bool:
        return self.format_version >= 3 and isinstance(self.manifest.get("classifier"), dict)

    @property
    def has_programs(self) -> bool:
        """Whether the artifact carries its methods as torch.export programs (model.pt2)."""
        return self.format_version >= 3 and isinstance(self.manifest.get("exported"), dict)


def priors(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The priors a model offers, standard first. A format 1 artifact has the standard one only."""
    if manifest.get("format_version") == 1:
        return (STANDARD_PRIOR,)
    return (STANDARD_PRIOR, *sorted(set(manifest["priors"]) - {STANDARD_PRIOR}))


def default_prior(manifest: dict[str, Any]) -> str:
    """The prior /sample uses when a request names none."""
    if manifest.get("format_version") == 1:
        return STANDARD_PRIOR
    return manifest["default_prior"]


def classes(manifest: dict[str, Any]) -> tuple[str, ...]:
    if manifest.get("format_version", 0) < 3:
        return ()
    return tuple(str(c["name"]) for c in manifest.get("classes") or [])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_number(version: str) -> int:
    match = VERSION_RE.match(version)
    if not match:
        raise ArtifactError(f"bad version {version!r}: versions are 'v' followed by a number, e.g. v3")
    return int(match.group(1))


# ---------------------------------------------------------------------------- writing


def next_version(store: Path, name: str) -> str:
    existing = list_versions(store, name)
    return f"v{version_number(existing[-1]) + 1 if existing else 1}"


def write_artifact(
    store: Path | str,
    name: str,
    scripted_model: torch.jit.ScriptModule,
    manifest: dict[str, Any],
    report_files: dict[str, bytes] | None = None,
    version: str | None = None,
    classifier: torch.jit.ScriptModule | bytes | None = None,
    programs: bytes | None = None,
    classifier_programs: bytes | None = None,
) -> Artifact:
    """Writes a new version of `name` into the store and returns it.

    Everything goes into a hidden staging directory beside the final one, which is then
    renamed into place: readers see either no version or the complete one, never a part.
    A `classifier` (TorchScript, images -> class probabilities) is written as classifier.pt;
    the manifest's `classifier` entry then says what it is. `programs` and
    `classifier_programs` are .pt2 archives of torch.export programs (model.pt2, classifier.pt2);
    the manifest's `exported` entry says what they hold.
    """
    store = Path(store)
    if not NAME_RE.match(name):
        raise ArtifactError(f"bad model name {name!r}: use lowercase letters, digits, '.', '_' or '-'")
    model_dir = store / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version or next_version(store, name)
    version_number(version)
    final = model_dir / version
    if final.exists():
        raise ArtifactError(f"{final} already exists; artifacts are immutable, write a new version")

    staging = model_dir / f".staging-{version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write(staging / MODEL_FILE, _torchscript_bytes(scripted_model))
        if classifier is not None:
            # bytes: a classifier.pt copied as it is (a re-export keeps its base's file)
            data = classifier if isinstance(classifier, bytes) else _torchscript_bytes(classifier)
            _write(staging / CLASSIFIER_FILE, data)
        if programs is not None:
            _write(staging / PROGRAMS_FILE, programs)
        if classifier_programs is not None:
            _write(staging / CLASSIFIER_PROGRAMS_FILE, classifier_programs)
        for rel, data in (report_files or {}).items():
            target = staging / REPORT_DIR / rel
            if not target.resolve().is_relative_to((staging / REPORT_DIR).resolve()):
                raise ArtifactError(f"report file {rel!r} would land outside the report folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            _write(target, data)
        files = {
            p.relative_to(staging).as_posix(): sha256_file(p)
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        full = {
            # A model written without a word on priors offers the standard one only.
            "priors": {STANDARD_PRIOR: {}},
            "default_prior": STANDARD_PRIOR,
            **manifest,
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "files": files,
        }
        missing = [f for f in (*REQUIRED_FIELDS, *REQUIRED_FIELDS_V2) if f not in full]
        if missing:
            raise ArtifactError(f"manifest lacks required fields: {missing}")
        _check_priors(full, "the manifest to write")
        _check_classes(full, "the manifest to write")
        _check_exported(full, "the manifest to write")
        _write(staging / MANIFEST_FILE, json.dumps(full, indent=2, sort_keys=False).encode() + b"\n")
        _fsync_dir(staging)
        os.rename(staging, final)  # atomic on one filesystem; fails if `final` appeared meanwhile
        _fsync_dir(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Artifact(final, full)


def _torchscript_bytes(module: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # TorchScript is the contract's format; torch's deprecation notice is not news here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(module, buffer)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- reading


def list_models(store: Path | str) -> list[str]:
    store = Path(store)
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if p.is_dir() and NAME_RE.match(p.name))


def list_versions(store: Path | str, name: str) -> list[str]:
    """Complete (renamed-into-place) versions of a model, oldest first."""
    model_dir = Path(store) / name
    if not model_dir.is_dir():
        return []
    versions = [p.name for p in model_dir.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
    return sorted(versions, key=version_number)


def read_manifest(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: no {MANIFEST_FILE}; not an artifact, or an incomplete one")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: expected a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    if missing:
        raise ArtifactError(f"{manifest_path}: missing required fields {missing}")
    found = manifest["format_version"]
    if isinstance(found, bool) or found not in READABLE_VERSIONS:
        newer = isinstance(found, int) and not isinstance(found, bool) and found > FORMAT_VERSION
        raise ArtifactError(
            f"{manifest_path}: format_version {found!r}"
            + (" is newer than this code" if newer else " is not a format version")
            + f"; this code reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            + (" (upgrade the service, or serve an older version of the model)" if newer else "")
        )
    if found >= 2:
        missing = [f for f in REQUIRED_FIELDS_V2 if f not in manifest]
        if missing:
            raise ArtifactError(
                f"{manifest_path}: missing required fields {missing} (format_version {found})"
            )
        _check_priors(manifest, str(manifest_path))
    if found >= 3:
        _check_classes(manifest, str(manifest_path))
        _check_exported(manifest, str(manifest_path))
    return manifest


def _check_priors(manifest: dict[str, Any], where: str) -> None:
    offered = manifest["priors"]
    known = (STANDARD_PRIOR, LEARNED_PRIOR)
    if not isinstance(offered, dict) or STANDARD_PRIOR not in offered:
        raise ArtifactError(f"{where}: `priors` must be an object that has {STANDARD_PRIOR!r} among its keys")
    unknown = sorted(set(offered) - set(known))
    if unknown:
        raise ArtifactError(f"{where}: unknown priors {unknown}; known: {list(known)}")
    if manifest["default_prior"] not in offered:
        raise ArtifactError(
            f"{where}: default_prior {manifest['default_prior']!r} is not among the priors {sorted(offered)}"
        )


def _check_classes(manifest: dict[str, Any], where: str) -> None:
    """`classes`: [{index, name, train_share}] with indices 0, 1, ... in order and distinct
    names; `classifier`: its file among the artifact's files."""
    listed = manifest.get("classes")
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(c, dict) for c in listed):
            raise ArtifactError(f"{where}: `classes` must be a list of objects {{index, name, train_share}}")
        indices = [c.get("index") for c in listed]
        if indices != list(range(len(listed))):
            raise ArtifactError(
                f"{where}: `classes` must list indices 0 to {len(listed) - 1} in order, not {indices}"
            )
        names = [c.get("name") for c in listed]
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ArtifactError(f"{where}: class names must be distinct non-empty strings, not {names}")
    classifier = manifest.get("classifier")
    if classifier is not None:
        if not isinstance(classifier, dict) or classifier.get("file") != CLASSIFIER_FILE:
            raise ArtifactError(
                f"{where}: `classifier` must be an object whose `file` is {CLASSIFIER_FILE!r}"
            )
        if not listed:
            raise ArtifactError(f"{where}: a classifier needs the `classes` it tells apart")


def _check_exported(manifest: dict[str, Any], where: str) -> None:
    """`exported`: {file: "model.pt2", methods: [...], classifier_file: "classifier.pt2" or null}."""
    exported = manifest.get("exported")
    if exported is None:
        return
    if not isinstance(exported, dict) or exported.get("file") != PROGRAMS_FILE:
        raise ArtifactError(f"{where}: `exported` must be an object whose `file` is {PROGRAMS_FILE!r}")
    methods = exported.get("methods")
    if not isinstance(methods, list) or not {"encode", "decode"} <= set(methods):
        raise ArtifactError(
            f"{where}: `exported.methods` must list at least encode and decode, not {methods!r}"
        )
    if exported.get("classifier_file") not in (None, CLASSIFIER_PROGRAMS_FILE):
        raise ArtifactError(
            f"{where}: `exported.classifier_file` must be {CLASSIFIER_PROGRAMS_FILE!r} or null"
        )
    if exported.get("classifier_file") and not isinstance(manifest.get("classifier"), dict):
        raise ArtifactError(f"{where}: an exported classifier needs the `classifier` it exports")


def verify(path: Path | str) -> dict[str, Any]:
    """Checks that the artifact at `path` is complete and untampered; returns its manifest.

    Every file the manifest lists must exist with its recorded sha256, and no other file
    may be present: an added file is as suspicious as a changed one.
    """
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise ArtifactError(f"{path}: manifest lists no {MODEL_FILE}")
    for rel, expected in files.items():
        target = path / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ArtifactError(f"{path}: manifest names a file outside the artifact: {rel!r}")
        if not target.is_file():
            raise ArtifactError(f"{path}: {rel} is missing (the artifact is incomplete)")
        actual = sha256_file(target)
        if actual != expected:
            raise ArtifactError(
                f"{path}: {rel} has sha256 {actual[:12]}…, manifest says {expected[:12]}… "
                "(the file was changed after the artifact was written)"
            )
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    extra = sorted(present - set(files) - {MANIFEST_FILE})
    if extra:
        raise ArtifactError(f"{path}: files not listed in the manifest: {extra}")
    return manifest


def load(path: Path | str, device: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule, Artifact]:
    """Verifies the artifact, then loads its TorchScript model onto `device` in eval mode.

    The model is loaded from the very bytes whose hash was checked, so the file cannot be
    swapped between verification and loading."""
    path = Path(path)
    manifest = verify(path)
    model = _load_torchscript(path, manifest, MODEL_FILE, device)
    art = Artifact(path, manifest)
    needed = ["encode", "decode"]
    if LEARNED_PRIOR in art.priors:
        needed.append("prior")
    if art.conditional:
        needed.append("prior_given")
    for method in needed:
        if not hasattr(model, method):
            raise ArtifactError(f"{path}: the TorchScript model has no {method}() method")
    return model, art


def load_model_file(art: Artifact, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """model.pt of an artifact already verified, loaded once more from bytes checked against its
    manifest: a second, independent copy (a ScriptModule's deepcopy has non-leaf parameters)."""
    return _load_torchscript(art.path, art.manifest, MODEL_FILE, device)


def load_classifier(art: Artifact, device: str | torch.device = "cpu") -> torch.jit.ScriptModule | None:
    """The artifact's classifier (images [B, 1, 28, 28] -> probabilities [B, classes]), from
    bytes checked against the manifest, or None when it ships none."""
    if not art.has_classifier:
        return None
    return _load_torchscript(art.path, art.manifest, CLASSIFIER_FILE, device)


def load_programs(art: Artifact, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The torch.export programs of model.pt2 (and classifier.pt2, as "classify"), by method
    name, as callables on `device`, from bytes checked against the manifest. Refuses an
    artifact that carries none (ArtifactError)."""
    if not art.has_programs:
        raise ArtifactError(
            f"{art.path}: carries no torch.export programs (no `exported` in its manifest); "
            "serve it with VAE_RUNTIME=torchscript, or re-export it (vae-export)"
        )
    exported = art.manifest["exported"]
    programs = _load_pt2(art, PROGRAMS_FILE, device)
    missing = sorted(set(exported["methods"]) - set(programs))
    if missing:
        raise ArtifactError(f"{art.path}: {PROGRAMS_FILE} lacks the programs {missing} its manifest lists")
    if exported.get("classifier_file"):
        programs["classify"] = _load_pt2(art, CLASSIFIER_PROGRAMS_FILE, device)["classify"]
    return programs


def _load_pt2(art: Artifact, rel: str, device: str | torch.device) -> dict[str, Any]:
    data = read_listed_file(art, rel)
    if data is None:
        raise ArtifactError(f"{art.path}: manifest lists no {rel}")
    # The .pt2 archive reader of torch 2.13 (torch.export.load reads one program per file).
    from torch.export.passes import move_to_device_pass
    from torch.export.pt2_archive._package import load_pt2

    try:
        with warnings.catch_warnings():
            # torch 2.13's reader warns that weights it groups by storage may not be on the CPU:
            # they are (they were written from the CPU), and the move below is explicit.
            warnings.filterwarnings("ignore", "No complete tensor found", UserWarning)
            contents = load_pt2(io.BytesIO(data))
        programs = {}
        for name, program in contents.exported_programs.items():
            if str(device) != "cpu":
                # Moves the weights and rewrites the device constants traced on the CPU
                program = move_to_device_pass(program, device)
            programs[name] = program.module()
    except Exception as exc:  # torch raises many kinds for a corrupt or foreign archive
        raise ArtifactError(f"{art.path}: {rel} is not a loadable torch.export archive ({exc})") from exc
    return programs


def _load_torchscript(
    path: Path, manifest: dict[str, Any], rel: str, device: str | torch.device
) -> torch.jit.ScriptModule:
    expected = manifest["files"].get(rel)
    if expected is None:
        raise ArtifactError(f"{path}: manifest lists no {rel}")
    data = (path / rel).read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise ArtifactError(f"{path}: {rel} changed while it was being loaded")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(data), map_location=device)
    except Exception as exc:  # torch raises RuntimeError and friends for corrupt archives
        raise ArtifactError(f"{path}: {rel} is not a loadable TorchScript model ({exc})") from exc
    return module.eval()


def read_listed_file(art: Artifact, rel: str) -> bytes | None:
    """The bytes of one file that the artifact's manifest lists (a report file, say), or None
    when it lists no such file. The bytes are checked against the manifest's sha256 as they
    are read, as load() does for the model: a file changed since verify() is refused. Only
    listed paths are ever read, so no caller can be steered to another file."""
    expected = art.manifest["files"].get(rel)
    if expected is None:
        return None
    try:
        data = (art.path / rel).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{art.path}: {rel} cannot be read ({exc})") from exc
    if hashlib.sha256(data).hexdigest() != expected:
        raise ArtifactError(f"{art.path}: {rel} changed after the artifact was verified")
    return data


def resolve(store: Path | str, name: str, version: str | None = None) -> Path:
    """The directory of `name` at `version`, or at its latest version when none is given."""
    versions = list_versions(store, name)
    if not versions:
        raise ArtifactError(f"no versions of model {name!r} in {store}")
    if version is None:
        return Path(store) / name / versions[-1]
    if version not in versions:
        raise ArtifactError(f"model {name!r} has no version {version!r}; available: {versions}")
    return Path(store) / name / version
