"""The Kubernetes manifests (deploy/kubernetes), checked offline: every overlay renders with
kustomize, validates against the Kubernetes schemas in strict mode, and agrees with the app and
the image (probe routes and port, VAE_* variables, UID, drain and grace period, CPU and torch
threads). tests/deploy/test_containers.py starts the rendered Deployment with `podman kube play`."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
from deploy_files import (
    KUBERNETES,
    image_uid,
    one,
    render,
    served_variables,
    stage_env,
    stages,
    trained_variables,
    trainer_options,
)
from service_support import InProcess

OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The oldest Kubernetes release still supported upstream when this was written; the manifests
# use nothing newer (the preStop hook is an exec of sleep, not the 1.30 sleep action).
KUBERNETES_VERSION = "1.32.0"


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def api_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [container] = one(docs, "Deployment", "vae-api")["spec"]["template"]["spec"]["containers"]
    return container


def test_the_overlays_are_the_documented_ones() -> None:
    assert OVERLAYS == ["cpu", "cpu-volume", "gpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates_strictly(overlay: str) -> None:
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= set(kinds)
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
            raise AssertionError(f"{where}: {exc.message} at {list(exc.path)}") from exc


def test_strict_validation_would_catch_a_misspelt_field() -> None:
    """The check above can fail: a field kustomize happily renders but Kubernetes does not know."""
    deployment = copy.deepcopy(one(render("cpu"), "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_deployment_agrees_with_the_app_and_the_image(overlay: str, api: InProcess) -> None:
    docs = render(overlay)
    deployment = one(docs, "Deployment", "vae-api")
    pod = deployment["spec"]["template"]["spec"]
    container = api_container(docs)
    image_env = stage_env(stages(), "api")
    env = env_of(container)

    # Probes: real routes of the app, on the port the image's server listens on.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(image_env["VAE_PORT"])}
    probes = {
        kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes["startupProbe"]["path"] == probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():  # real endpoints of the app, answering 200 when it is ready
        assert api.get(probe["path"]).status_code == 200 and probe["port"] in ports

    # Every VAE_* variable is one vae-serve reads.
    unknown = {n for n in env if n.startswith("VAE_")} - served_variables()
    assert not unknown, f"the Deployment sets {sorted(unknown)}, which vae-serve does not read"

    # Hardening, as in the compose file, and the image's own user.
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert (
        pod["securityContext"]["runAsNonRoot"]
        and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == image_uid()
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert not pod["automountServiceAccountToken"]

    # Shutdown: the kubelet's SIGKILL comes only after preStop and the server's whole drain.
    drain = float(env.get("VAE_GRACEFUL_TIMEOUT", image_env["VAE_GRACEFUL_TIMEOUT"]))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0 and strategy["maxSurge"] >= 1

    # CPU: the limit is the torch threads, requested in full (no throttling surprise).
    resources = container["resources"]
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"] == env["VAE_TORCH_THREADS"]
    assert env["VAE_WORKERS"] == "1"

    # The API key comes from a Secret, never from the manifests.
    assert env["VAE_API_KEY"]["secretKeyRef"]["name"] == "vae-api-key"

    # Spread across nodes; scraped for /metrics on the api port.
    [spread] = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and api.get("/metrics").status_code == 200
    assert int(annotations["prometheus.io/port"]) == ports["http"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_other_objects_select_the_api_pods(overlay: str) -> None:
    docs = render(overlay)
    labels = one(docs, "Deployment", "vae-api")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    service = one(docs, "Service", "vae-api")["spec"]
    assert selects(service["selector"]) and [p["targetPort"] for p in service["ports"]] == ["http"]
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    policy = one(docs, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"])
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == ["http"], "only the api port"
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vae-api"}
    [metric] = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu" and hpa["minReplicas"] >= 2


def test_the_gpu_overlay_asks_for_one_gpu_and_the_cuda_image() -> None:
    docs = render("gpu")
    container = api_container(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(container)["VAE_DEVICE"] == "cuda"
    assert container["image"].endswith("-cuda")
    cpu = api_container(render("cpu"))
    assert "VAE_DEVICE" not in env_of(cpu) and not cpu["image"].endswith("-cuda")


def test_the_volume_overlay_seeds_trains_and_mounts_the_store_read_only() -> None:
    docs = render("cpu-volume")
    claim = one(docs, "PersistentVolumeClaim", "vae-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    store = stage_env(stages(), "api")["VAE_MODEL_STORE"]
    mounts = {m["name"]: m for m in api_container(docs)["volumeMounts"]}
    assert mounts["models"]["mountPath"] == store and mounts["models"]["readOnly"]

    trainer = one(docs, "Job", "vae-train")
    assert trainer["spec"]["suspend"], "applying the overlay must not start a training run"
    [container] = trainer["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("vae-service-trainer:")
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {
        store,
        stage_env(stages(), "trainer")["VAE_DATA_DIR"],
    }
    unknown = {n for n in env_of(container) if n.startswith("VAE_")} - trained_variables()
    assert not unknown, f"the trainer Job sets {sorted(unknown)}, which vae-train does not read"
    options = {a for a in container["args"] if a.startswith("--")}
    known = trainer_options()
    assert options <= known, f"vae-train has no {sorted(options - known)}"

    seed = one(docs, "Job", "vae-models-seed")
    [copier] = seed["spec"]["template"]["spec"]["containers"]
    assert copier["command"][:3] == ["cp", "-R", "-n"], "the seed never overwrites a version"
    for job in (trainer, seed):
        assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == image_uid()
