"""deploy/kubernetes/: every manifest validated against its schema, and checked against the server's contract.

Core objects go through kubernetes-validate (the Kubernetes OpenAPI schemas, strict: unknown fields fail);
KEDA's ScaledObject and Knative's Service through cloudcoil's models generated from those projects' CRDs,
with a round trip that catches unknown fields (the models themselves ignore them).
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate  # in the test extra: a missing one is a failure, not a skip
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent.parent
K8S = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0", "1.37.0")
SHUTDOWN_GRACE_DEFAULT = 30


def documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((str(path.relative_to(K8S)), doc))
    return found


def by_kind(kind: str, api_prefix: str = "") -> list[dict]:
    return [doc for _, doc in documents() if doc["kind"] == kind and doc["apiVersion"].startswith(api_prefix)]


def only(kind: str, api_prefix: str = "") -> dict:
    found = by_kind(kind, api_prefix)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def strip_nulls(value):
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def assert_round_trip(model_cls, doc: dict) -> None:
    """Validates types and required fields, then fails on any field the schema does not know.

    Strict: YAML gives real types, and in lax mode a quantity like "2" is first read as an int, which the
    generated models then reject with a TypeError instead of trying their string form.
    """
    model = model_cls.model_validate(doc, strict=True)
    dumped = strip_nulls(model.model_dump(by_alias=True, exclude_unset=True, mode="json"))
    assert dumped == strip_nulls(doc), "fields unknown to the schema (or changed by it):\n" \
        f"manifest: {doc}\nschema's reading: {dumped}"


def test_every_manifest_is_known_here():
    kinds = sorted((name, doc["apiVersion"], doc["kind"]) for name, doc in documents())
    assert kinds == [
        ("deployment.yaml", "apps/v1", "Deployment"),
        ("keda-scaledobject.yaml", "keda.sh/v1alpha1", "ScaledObject"),
        ("knative/service.yaml", "serving.knative.dev/v1", "Service"),
        ("models-pvc.yaml", "v1", "PersistentVolumeClaim"),
        ("service.yaml", "v1", "Service"),
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_match_the_kubernetes_schema(version):
    core = [doc for _, doc in documents() if doc["apiVersion"] in ("v1", "apps/v1")]
    assert len(core) == 3
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


def test_an_unknown_field_would_fail_validation():
    deployment = only("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37.0", strict=True)
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    scaled = yaml.safe_load(yaml.safe_dump(only("ScaledObject")))
    scaled["spec"]["minReplicas"] = 0
    with pytest.raises(AssertionError):
        assert_round_trip(ScaledObject, scaled)


def test_keda_scaled_object_matches_the_keda_schema_and_reads_the_queue_metrics():
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    scaled = only("ScaledObject")
    assert_round_trip(ScaledObject, scaled)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == only("Deployment")["metadata"]["name"]
    assert spec["minReplicaCount"] == 0, "scale to zero"
    assert spec["maxReplicaCount"] >= 1
    triggers = {t["name"]: t for t in spec["triggers"]}
    queue = triggers["queue-depth"]
    assert queue["type"] == "prometheus"
    metadata = queue["metadata"]
    assert re.match(r"^https?://", metadata["serverAddress"])
    assert "comfy_queue_pending" in metadata["query"] and "comfy_queue_running" in metadata["query"]
    assert float(metadata["threshold"]) > 0
    assert all(isinstance(v, str) for t in spec["triggers"] for v in t["metadata"].values()), \
        "KEDA trigger metadata values must be strings"


def test_the_metrics_keda_reads_exist_on_the_server(server):
    """The names in the KEDA query are the ones GET /metrics serves."""
    text = server.get("/metrics").text
    query = only("ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    for name in set(re.findall(r"comfy_[a-z_]+", query)):
        assert re.search(rf"^{name} \d", text, re.M), f"{name} is not served by /metrics"


def test_knative_service_matches_the_knative_schema():
    from cloudcoil.models.knative_serving.serving.v1 import Service

    service = only("Service", "serving.knative.dev")
    assert_round_trip(Service, service)
    template = service["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "0"
    container = template["spec"]["containers"][0]
    assert container["ports"] == [{"name": "http1", "containerPort": 8188}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    grace = int(env_of(container).get("COMFY_SHUTDOWN_GRACE", SHUTDOWN_GRACE_DEFAULT))
    assert template["spec"]["timeoutSeconds"] > grace


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_deployment_probes_drain_resources_and_security():
    deployment = only("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port == {"http": 8188}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # Drain: the kubelet must wait at least the server's grace plus the 10 s an interrupted prompt gets.
    grace = float(env_of(container).get("COMFY_SHUTDOWN_GRACE", SHUTDOWN_GRACE_DEFAULT))
    assert pod["terminationGracePeriodSeconds"] >= grace + 10
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/app/models"]["readOnly"] is True
    # With a read-only root, every directory the server writes must be a volume.
    writable = {"/app/input", "/app/output", "/tmp"}
    assert writable <= set(mounts)
    env = env_of(container)
    assert env["COMFY_TEMP_DIRECTORY"].startswith("/tmp") and env["COMFY_USER_DIRECTORY"].startswith("/tmp")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {only("PersistentVolumeClaim")["metadata"]["name"]}
    service = only("Service", "v1")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
