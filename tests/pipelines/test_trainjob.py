"""The TrainJob launcher: manifests against the Trainer CRD, launch_and_wait against an in-memory API."""
from __future__ import annotations

import itertools
import os
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from kubernetes.client.exceptions import ApiException

from linear_moe.pipelines import trainjob as tj
from linear_moe.pipelines.crd import load_crd_schemas, validate_custom_resource

CRD_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "k8s-schemas" / "kubeflow-trainer"
COMMAND = tj.train_command("tiny", steps=10, seq_length=64, data_dir="/workspace/data", output_dir="/workspace/run")


@pytest.fixture(scope="module")
def crd_schemas():
    if not CRD_DIR.is_dir():
        pytest.skip(f"Kubeflow Trainer CRDs not found at {CRD_DIR} (shared/k8s-schemas is test data beside the clone)")
    return load_crd_schemas(CRD_DIR)


# ---------------------------------------------------------------------- manifest
@pytest.mark.parametrize("nodes,gpus,cpu,memory", [(1, 0, "", ""), (2, 8, "32", "400Gi"), (4, 1, "", ""),
                                                   (1, 0, "500m", ""), (2, 8, "", "64G")],
                         ids=["N1-cpu", "N2-G8-sized", "N4-G1", "N1-cpu-500m", "N2-G8-memory"])
def test_manifest_matches_trainjob_crd_schema(crd_schemas, nodes, gpus, cpu, memory):
    manifest = tj.build_trainjob("lm-run-1", "ghcr.io/linear-moe/linear-moe:0.1.0", nodes, gpus, COMMAND,
                                 cpu_per_node=cpu, memory_per_node=memory)
    validate_custom_resource(manifest, crd_schemas, strict=True)
    trainer = manifest["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, max(gpus, 1))
    resources = trainer.get("resourcesPerNode", {})
    assert resources.get("limits", {}).get("nvidia.com/gpu", 0) == gpus
    given = {key: value for key, value in (("cpu", cpu), ("memory", memory)) if value}
    assert resources.get("requests", {}) == given
    assert {k: v for k, v in resources.get("limits", {}).items() if k != "nvidia.com/gpu"} == given
    assert manifest["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                              "name": "linear-moe-torch-distributed"}


def test_manifest_leaves_resources_to_the_runtime_by_default():
    """No CPU/memory given: a CPU job has no resourcesPerNode (the runtime's resources apply); a GPU job
    carries only its GPU limit."""
    assert "resourcesPerNode" not in tj.build_trainjob("lm-run", "img:1", 2, 0, COMMAND)["spec"]["trainer"]
    gpu = tj.build_trainjob("lm-run", "img:1", 2, 8, COMMAND)["spec"]["trainer"]["resourcesPerNode"]
    assert gpu == {"limits": {"nvidia.com/gpu": 8}}


@pytest.mark.parametrize("kwargs,name", [
    (dict(cpu_per_node="abc"), "cpu_per_node"), (dict(cpu_per_node="-2"), "cpu_per_node"),
    (dict(cpu_per_node="0"), "cpu_per_node"), (dict(memory_per_node="16GB"), "memory_per_node"),
    (dict(memory_per_node="400 Gi"), "memory_per_node"), (dict(memory_per_node=400), "memory_per_node"),
])
def test_manifest_rejects_bad_quantities_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} .* is not a positive Kubernetes quantity"):
        tj.build_trainjob("ok", "img:1", 1, 8, COMMAND, **kwargs)


@pytest.mark.parametrize("value", ["32", "500m", "400Gi", "64G", "1.5", ".5", "1e3", "+2", "2Ki"])
def test_resource_quantity_accepts_kubernetes_quantities(crd_schemas, value):
    """Reference: the quantity pattern of the Trainer CRD's resourcesPerNode."""
    assert tj.resource_quantity("cpu_per_node", value) == value
    manifest = tj.build_trainjob("ok", "img:1", 1, 0, COMMAND, cpu_per_node=value, memory_per_node=value)
    validate_custom_resource(manifest, crd_schemas, strict=True)


def test_manifest_runtime_exists_in_k8s_base():
    """The runtime the launcher references is the one k8s/base installs, in the same namespace."""
    import yaml

    text = (Path(__file__).resolve().parents[2] / "k8s" / "base" / "training-runtime.yaml").read_text()
    runtime = yaml.safe_load(text)
    manifest = tj.build_trainjob("lm-run-1", "img:1", 1, 0, COMMAND)
    assert (runtime["kind"], runtime["metadata"]["name"]) == (manifest["spec"]["runtimeRef"]["kind"],
                                                              manifest["spec"]["runtimeRef"]["name"])
    volumes = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["volumes"]
    patch = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    patched = patch["template"]["spec"]["template"]["spec"]["volumes"]
    assert [v["name"] for v in patched] == [v["name"] for v in volumes]


@pytest.mark.parametrize("name", ["Upper", "9starts-with-digit", "ends-", "x" * 64, "under_score"])
def test_manifest_rejects_non_dns_label_name(name):
    with pytest.raises(ValueError, match="DNS-1035"):
        tj.build_trainjob(name, "img:1", 1, 0, COMMAND)


def test_manifest_rejects_bad_sizes_and_command():
    with pytest.raises(ValueError, match="nodes"):
        tj.build_trainjob("ok", "img:1", 0, 0, COMMAND)
    with pytest.raises(ValueError, match="gpus_per_node"):
        tj.build_trainjob("ok", "img:1", 1, -1, COMMAND)
    with pytest.raises(ValueError, match="command"):
        tj.build_trainjob("ok", "img:1", 1, 0, [])


def test_train_command_parses_with_the_train_cli(valid_mixer):
    """Reference: the train step's own argument parser reads back what the launcher wrote."""
    cli = pytest.importorskip("linear_moe.components.train.__main__")
    layout = tj.ParallelLayout(tensor_parallel=2, pipeline_parallel=1, expert_parallel=2, sequence_parallel=1)
    command = tj.train_command("tiny", lsm_mixer=valid_mixer, layer_pattern="LlA", layout=layout, steps=7,
                               seq_length=32, data_dir="/workspace/data", output_dir="/workspace/out")
    assert command[:3] == ["torchrun", "-m", "linear_moe.components.train"]
    config = cli.config_from_args(command[3:])
    assert (config.tensor_parallel, config.expert_parallel, config.steps, config.seq_length) == (2, 2, 7, 32)
    assert config.model_overrides == {"lsm_mixer": valid_mixer, "layer_pattern": "LlA", "num_layers": 3}
    assert (config.data_dir, config.output_dir, config.resume) == ("/workspace/data", "/workspace/out", True)


# ---------------------------------------------------------------------- validation
def _train_config_accepts(world, tp, pp, ep, sp, mixer):
    """Reference: the train step's TrainConfig.data_parallel, which runs inside the job."""
    from linear_moe.components.train.config import TrainConfig

    config = TrainConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep, sequence_parallel=sp,
                         micro_batch_size=1, global_batch_size=world * 16, model_overrides={"lsm_mixer": mixer})
    try:
        config.data_parallel(world)
        return True
    except ValueError:
        return False


def test_parallel_layout_check_matches_train_config(valid_mixer):
    pytest.importorskip("linear_moe.components.train.config")
    for world, tp, pp, ep, sp in itertools.product([1, 2, 4, 6, 8], [1, 2, 4], [1, 2], [1, 2, 4, 8], [1, 2]):
        layout = tj.ParallelLayout(tp, pp, ep, sp)
        try:
            layout.check(world)
            ours = True
        except ValueError as error:
            ours = False
            assert "world size" in str(error)
        assert ours == _train_config_accepts(world, tp, pp, ep, sp, valid_mixer), (world, tp, pp, ep, sp)


@pytest.mark.parametrize("kwargs,match", [
    (dict(preset="no-such-preset"), "unknown preset"),
    (dict(preset="tiny", layer_pattern="LXA"), "unknown symbol 'X' at position 1"),
    (dict(preset="tiny", lsm_mixer="no-such-mixer"), "lsm_mixer"),
    (dict(preset="tiny", layout=tj.ParallelLayout(tensor_parallel=3), nodes=2, gpus_per_node=4), "is not divisible by"),
    (dict(preset="tiny", layout=tj.ParallelLayout(expert_parallel=16), nodes=1, gpus_per_node=8), "expert_parallel"),
    (dict(preset="tiny", nodes=1, gpus_per_node=8, memory_per_node="lots"), "memory_per_node"),
], ids=["preset", "pattern", "mixer", "tp", "ep", "memory"])
def test_run_trainjob_fails_before_touching_the_cluster(monkeypatch, valid_mixer, kwargs, match):
    def no_cluster(*args, **kw):
        raise AssertionError("connect() must not be reached when the request is invalid")

    monkeypatch.setattr(tj, "connect", no_cluster)
    kwargs.setdefault("lsm_mixer", valid_mixer)
    with pytest.raises(ValueError, match=match):
        tj.run_trainjob("lm-run", "img:1", steps=1, seq_length=8, data_dir="/d", output_dir="/o", **kwargs)


def test_connect_missing_kubeconfig_names_the_path(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    missing = tmp_path / "nope" / "config"
    monkeypatch.setenv("KUBECONFIG", str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        tj.connect()


def test_connect_unreachable_host_names_the_host(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    host = f"https://127.0.0.1:{port}"
    config = tmp_path / "config"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: k, cluster: {{server: '{host}', insecure-skip-tls-verify: true}}}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n")
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}.*unreachable"):
        tj.connect(config)


# ---------------------------------------------------------------------- launch_and_wait
class FakeCluster:
    """In-memory CustomObjectsApi + CoreV1Api: a scripted sequence of job states, one per get()."""

    def __init__(self, states, logs=None, on_get=None, create_error=None):
        self.states = list(states)
        self.logs = logs or {}
        self.on_get = on_get
        self.create_error = create_error
        self.jobs: dict[str, dict] = {}
        self.deleted: list[str] = []
        self.gets = 0

    # CustomObjectsApi
    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        if self.create_error:
            raise self.create_error
        self.jobs[body["metadata"]["name"]] = body
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.gets += 1
        if self.on_get:
            self.on_get(self.gets)
        state = self.states[min(self.gets, len(self.states)) - 1]
        return {**self.jobs[name], "status": state}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.deleted.append(name)
        self.jobs.pop(name)

    # CoreV1Api
    def list_namespaced_pod(self, namespace, label_selector=""):
        assert label_selector.startswith(tj.JOBSET_LABEL + "=")
        phase = "Running" if self.gets < len(self.states) else "Succeeded"
        return SimpleNamespace(items=[SimpleNamespace(metadata=SimpleNamespace(name=pod), status=SimpleNamespace(phase=phase))
                                      for pod in self.logs])

    def read_namespaced_pod_log(self, name, namespace, container=None, tail_lines=None):
        return "\n".join(self.logs[name].splitlines()[-tail_lines:])


def _cond(kind, reason="", message=""):
    return {"conditions": [{"type": kind, "status": "True", "reason": reason, "message": message,
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}


def _launch(fake, **kwargs):
    manifest = tj.build_trainjob("lm-run", "img:1", 2, 0, COMMAND)
    lines: list[str] = []
    kwargs.setdefault("poll_s", 0)
    result = None
    try:
        result = tj.launch_and_wait(manifest, tj.ClusterApi(fake, fake), log=lines.append, **kwargs)
    finally:
        fake.log_lines = lines
    return result


def test_launch_and_wait_success_reports_status_and_logs():
    fake = FakeCluster([{}, _cond("Created"), _cond("Complete", "JobsCompleted", "done")],
                       logs={"lm-run-node-0-0": "step 1 loss 5.0\nstep 2 loss 4.0", "lm-run-node-0-1": "worker ok"})
    job = _launch(fake)
    assert job["status"]["conditions"][0]["type"] == "Complete"
    assert fake.deleted == [] and "lm-run" in fake.jobs
    text = "\n".join(fake.log_lines)
    assert "created" in text and "2 Running" in text and "complete" in text
    assert "step 2 loss 4.0" in text and "worker ok" in text


def test_launch_and_wait_failure_carries_the_jobs_message_and_logs():
    fake = FakeCluster([{}, _cond("Failed", "JobsFailed", "node-0 exited with code 1: CUDA out of memory")],
                       logs={"lm-run-node-0-0": "Traceback ...\nRuntimeError: CUDA out of memory"})
    with pytest.raises(tj.TrainJobFailed) as info:
        _launch(fake)
    assert info.value.reason == "JobsFailed"
    assert info.value.message == "node-0 exited with code 1: CUDA out of memory"
    assert "RuntimeError: CUDA out of memory" in str(info.value)
    assert fake.deleted == []  # a failed job is kept for inspection


def test_launch_and_wait_deletes_the_job_on_keyboard_interrupt():
    def interrupt(n):
        if n == 3:
            raise KeyboardInterrupt

    fake = FakeCluster([{}], logs={"lm-run-node-0-0": ""}, on_get=interrupt)
    with pytest.raises(KeyboardInterrupt):
        _launch(fake)
    assert fake.deleted == ["lm-run"]


def test_launch_and_wait_deletes_the_job_on_sigterm():
    previous = signal.getsignal(signal.SIGTERM)

    def terminate(n):
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    fake = FakeCluster([{}], logs={"lm-run-node-0-0": ""}, on_get=terminate)
    with pytest.raises(tj.TrainJobCancelled):
        _launch(fake)
    assert fake.deleted == ["lm-run"]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_launch_and_wait_deletes_the_job_on_timeout():
    fake = FakeCluster([{}], logs={})
    with pytest.raises(TimeoutError, match="timeout_s"):
        _launch(fake, poll_s=0.01, timeout_s=0.05)
    assert fake.deleted == ["lm-run"]


@pytest.mark.parametrize("status,match", [(409, "exists"), (404, "install Kubeflow Trainer"), (403, "Role")])
def test_launch_and_wait_explains_create_errors(status, match):
    fake = FakeCluster([{}], create_error=ApiException(status=status, reason="x"))
    with pytest.raises(RuntimeError, match=match):
        _launch(fake)
    assert fake.gets == 0
