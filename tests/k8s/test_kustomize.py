"""k8s/: every overlay builds with ``kubectl kustomize`` and its output validates offline.

References: kubernetes-validate's strict JSON schemas for core kinds, the Kubeflow Trainer CRD
openAPIV3 schemas (../shared/k8s-schemas) for the custom resources.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from linear_moe.pipelines.crd import load_crd_schemas, validate_custom_resource

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO.parent / "shared" / "k8s-schemas" / "kubeflow-trainer"
OVERLAYS = ["base", "overlays/cpu-dev", "overlays/gpu"]
TRAINER_GROUP = "trainer.kubeflow.org"


@pytest.fixture(scope="module")
def crd_schemas():
    if not CRD_DIR.is_dir():
        pytest.skip(f"Kubeflow Trainer CRDs not found at {CRD_DIR} (shared/k8s-schemas is test data beside the clone)")
    return load_crd_schemas(CRD_DIR)


_RENDERED: dict[str, list[dict]] = {}


def render(overlay: str) -> list[dict]:
    if overlay not in _RENDERED:
        if shutil.which("kubectl") is None:
            pytest.skip("kubectl is not installed: it renders the kustomize overlays")
        out = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / overlay)], capture_output=True, text=True)
        assert out.returncode == 0, f"kubectl kustomize k8s/{overlay} failed:\n{out.stderr}"
        _RENDERED[overlay] = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    return _RENDERED[overlay]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def pod_spec(runtime: dict) -> dict:
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return job["template"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_kinds_pass_kubernetes_validate_strict(overlay):
    core = [doc for doc in render(overlay) if not doc["apiVersion"].startswith(TRAINER_GROUP)]
    assert {doc["kind"] for doc in core} == {"Namespace", "ServiceAccount", "Role", "RoleBinding",
                                             "PersistentVolumeClaim"}
    for doc in core:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_resources_match_crd_schema(overlay, crd_schemas):
    custom = [doc for doc in render(overlay) if doc["apiVersion"].startswith(TRAINER_GROUP)]
    assert [doc["kind"] for doc in custom] == ["TrainingRuntime"]
    for doc in custom:
        validate_custom_resource(doc, crd_schemas, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_runtime_job_template_passes_kubernetes_validate_strict(overlay):
    """The runtime's Job template is a batch/v1 JobTemplate: check it with the core Job schema too."""
    (runtime,) = by_kind(render(overlay), "TrainingRuntime")
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    manifest = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "node", **job["template"]["metadata"]},
                "spec": job["template"]["spec"]}
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)


def test_strict_crd_validation_rejects_unknown_field(crd_schemas):
    """The API server would prune a misspelt field silently; the strict check must not."""
    (runtime,) = by_kind(render("base"), "TrainingRuntime")
    pod_spec(runtime)["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(ValueError, match="imagePullPolicyy"):
        validate_custom_resource(runtime, crd_schemas, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_read_only_and_drop_all_capabilities(overlay):
    (runtime,) = by_kind(render(overlay), "TrainingRuntime")
    spec = pod_spec(runtime)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in spec["containers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        for writable in ("/tmp", "/home/app/.cache"):
            assert "emptyDir" in volumes[mounts[writable]], f"{writable} must be a writable emptyDir"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_written(overlay):
    docs = render(overlay)
    assert not by_kind(docs, "Secret")
    (runtime,) = by_kind(docs, "TrainingRuntime")
    refs = [env["valueFrom"]["secretKeyRef"] for c in pod_spec(runtime)["containers"] for env in c["env"]
            if "valueFrom" in env]
    assert refs and all(ref["optional"] is True for ref in refs)
    assert all("value" not in env or "token" not in env["name"].lower() for c in pod_spec(runtime)["containers"]
               for env in c["env"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_launcher_role_is_least_privilege(overlay):
    docs = render(overlay)
    (role,) = by_kind(docs, "Role")
    rules = {(tuple(r["apiGroups"]), tuple(sorted(r["resources"]))): sorted(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("trainer.kubeflow.org",), ("trainjobs",)): sorted(["create", "get", "list", "watch", "delete"]),
        (("",), ("pods", "pods/log")): sorted(["get", "list", "watch"]),
    }
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    (binding,) = by_kind(docs, "RoleBinding")
    (account,) = by_kind(docs, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "linear-moe"}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespaced_resources_live_in_linear_moe_and_claim_the_workspace(overlay):
    docs = render(overlay)
    assert [d["metadata"]["name"] for d in by_kind(docs, "Namespace")] == ["linear-moe"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "linear-moe", doc["kind"]
    (pvc,) = by_kind(docs, "PersistentVolumeClaim")
    (runtime,) = by_kind(docs, "TrainingRuntime")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec(runtime)["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]]


def _gib(quantity: str) -> float:
    units = {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_gpu_overlay_adds_gpus_tolerations_node_selector_and_storage():
    base, gpu = render("base"), render("overlays/gpu")
    (base_runtime,), (gpu_runtime,) = by_kind(base, "TrainingRuntime"), by_kind(gpu, "TrainingRuntime")
    base_spec, gpu_spec = pod_spec(base_runtime), pod_spec(gpu_runtime)
    assert "nvidia.com/gpu" not in base_spec["containers"][0]["resources"]["limits"]
    assert int(gpu_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_spec["tolerations"])
    assert gpu_spec["nodeSelector"]
    assert "tolerations" not in base_spec and "nodeSelector" not in base_spec
    storage = [_gib(by_kind(d, "PersistentVolumeClaim")[0]["spec"]["resources"]["requests"]["storage"]) for d in (base, gpu)]
    assert storage[1] > storage[0]
    assert gpu_spec["containers"][0]["image"].endswith("-gpu")
