"""deploy/ checked offline. Kubernetes objects against the Kubernetes API's schemas with kubernetes-validate (its own
copy of the schemas of each release, here 1.37, strict: an unknown field is an error), including the pod templates
inside the RayService; the RayService's `serveConfigV2` against Ray Serve's own config schema and loraswap's builder;
and what ties the files together (probes, drain, ports, labels). Neither KubeRay's RayService CRD nor the inference
extension's InferencePool CRD ships in any PyPI package, so their own fields are checked here by what loraswap needs
of them, not against those CRDs' schemas."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a dev dependency")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUBERNETES = "1.37"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def of_kind(name: str, kind: str) -> dict[str, Any]:
    (found,) = [d for d in documents(name) if d["kind"] == kind]
    return found


def valid(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, KUBERNETES, strict=True)


def pod_template(template: dict[str, Any], name: str) -> dict[str, Any]:
    """A pod template as the Kubernetes object that holds one alone (a PodTemplate), to validate it."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_the_plain_manifests_are_valid_kubernetes_objects() -> None:
    kinds = []
    for resource in documents("loraswap.yaml"):
        valid(resource)
        kinds.append(resource["kind"])
    assert sorted(kinds) == ["Deployment", "Service"]


def test_the_validator_refuses_what_kubernetes_would() -> None:
    deployment = of_kind("loraswap.yaml", "Deployment")
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health"}}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            valid(bad)


def test_the_deployment_is_ready_on_health_drains_and_takes_its_keys_from_a_secret() -> None:
    deployment = of_kind("loraswap.yaml", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    env = env_of(container)
    assert pod["terminationGracePeriodSeconds"] > int(env["LORASWAP_DRAIN_SECONDS"])
    assert env["LORASWAP_REGISTRY"].startswith("s3://")
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert [s["secretRef"]["name"] for s in container["envFrom"]] == ["loraswap-registry"]
    assert not {"AWS_SECRET_ACCESS_KEY", "LORASWAP_API_KEY", "LORASWAP_ADMIN_KEY"} & set(env)  # never inline
    service = of_kind("loraswap.yaml", "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports and ports["http"] == int(env["LORASWAP_PORT"])


def test_the_rayservice_pods_are_valid_and_its_serve_config_builds_loraswap() -> None:
    import ray
    from ray.serve.schema import ServeDeploySchema

    from loraswap.server.cluster.app import build

    service = of_kind("rayservice.yaml", "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__  # the image's Ray (requirements.lock) runs the cluster
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    valid(pod_template(head["template"], "head"))
    for group in groups:
        valid(pod_template(group["template"], group["groupName"]))
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "loraswap.server.cluster.app:build" and app.route_prefix == "/"
    assert isinstance(build(app.args), ray.serve.Application)  # the options and settings are accepted
    settings, scale = app.args["settings"], app.args["ray"]
    # room for the most replicas the autoscaler may ask for
    cpus = sum(g["maxReplicas"] * float(g["rayStartParams"]["num-cpus"]) for g in groups)
    assert scale["max_replicas"] * scale["replica_cpus"] <= cpus
    for group in groups:  # a worker pod going away lets its replicas drain
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] > settings["drain_seconds"]
    for pod in [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]:
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"  # every process of the cluster, as Ray 2.60 requires
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        assert [s["secretRef"]["name"] for s in container["envFrom"]] == ["loraswap-registry"]
    assert config.http_options.port == 8000


def test_the_inference_pool_points_at_the_replicas() -> None:
    pool = of_kind("inferencepool.yaml", "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    deployment = of_kind("loraswap.yaml", "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [p["containerPort"] for p in container["ports"]]
    assert pool["spec"]["endpointPickerRef"]["name"] and pool["spec"]["endpointPickerRef"]["port"]["number"] > 0
