"""The deployment files validate offline: Kubernetes kinds with kubernetes-validate's bundled schemas,
KEDA's kinds with the schema vendored in deploy/kubernetes/schemas/, and the settings they name exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KEDA_SCHEMA = ROOT / "deploy" / "kubernetes" / "schemas" / "keda.sh-v1alpha1.json"


def documents() -> list[tuple[str, dict]]:
    return [
        (path.name, doc)
        for path in MANIFESTS
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


@pytest.mark.parametrize("name,resource", documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates(name, resource):
    if resource["apiVersion"].startswith("keda.sh/"):
        import jsonschema

        schema = json.loads(KEDA_SCHEMA.read_text())
        jsonschema.validate(resource, {**schema, "$ref": f"#/$defs/{resource['kind']}"})
        return
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(resource, "1.30", strict=True)


def test_grace_periods_match_the_shutdown_settings():
    workers = {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == "Deployment"}
    spot = workers["genserve-worker-spot"]["spec"]["template"]["spec"]
    env = {item["name"]: item.get("value") for item in spot["containers"][0]["env"]}
    assert spot["terminationGracePeriodSeconds"] >= float(env["GENSERVE_SPOT_SHUTDOWN_SECONDS"]) + 5
    assert spot["terminationGracePeriodSeconds"] <= 15  # GKE: 15 s of the 30 s notice for non-system Pods
    assert {
        "key": "cloud.google.com/gke-spot",
        "operator": "Equal",
        "value": "true",
        "effect": "NoSchedule",
    } in spot["tolerations"]
    for worker in ("genserve-worker-spot", "genserve-worker-ondemand"):
        container = workers[worker]["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]


def test_keda_scales_to_zero_after_900_seconds_with_a_stabilization_window():
    scaled = [doc for _, doc in documents() if doc["kind"] == "ScaledObject"]
    assert len(scaled) == 2
    for doc in scaled:
        spec = doc["spec"]
        assert spec["minReplicaCount"] == 0 and spec["cooldownPeriod"] == 900
        assert (
            spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
                "stabilizationWindowSeconds"
            ]
            > 0
        )
        [trigger] = spec["triggers"]
        assert trigger["type"] == "postgresql" and "'queued'" in trigger["metadata"]["query"]


def test_config_keys_are_settings():
    from genserve.config import Settings

    fields = {f"GENSERVE_{name.upper()}" for name in Settings.model_fields}
    [config] = [
        doc
        for _, doc in documents()
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "genserve-config"
    ]
    assert set(config["data"]) <= fields
