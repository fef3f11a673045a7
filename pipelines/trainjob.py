"""The TrainJob launcher: build a Kubeflow Trainer ``TrainJob``, submit it, wait, clean up.

The job references the ``linear-moe-torch-distributed`` TrainingRuntime from ``k8s/`` and runs
``torchrun -m linear_moe.components.train ...`` on ``nodes`` x ``procs_per_node`` processes.  Every
check that can fail without a cluster (parallel layout, preset, layer pattern, kubeconfig, host)
runs before anything is submitted.  Used by the in-cluster train step (``use_trainjob=True``).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
RUNTIME = "linear-moe-torch-distributed"
RUNTIME_KIND = "TrainingRuntime"
NAMESPACE = "linear-moe"
PVC = "linear-moe-workspace"
WORKSPACE = "/workspace"
TRAINER_CONTAINER = "node"  # the torch runtime's container and replicated job are both "node"
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"  # pods of a TrainJob carry its name here
PATCH_MANAGER = "linear-moe.io/launcher"
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# An unsigned (or "+") Kubernetes quantity: a number, then a binary/decimal SI suffix or a decimal exponent.
_QUANTITY_RE = re.compile(r"^\+?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")


class TrainJobFailed(RuntimeError):
    """The TrainJob reached ``Failed``; ``reason``/``message`` are the job's own condition."""

    def __init__(self, name: str, reason: str, message: str, logs: str = ""):
        self.name, self.reason, self.message, self.logs = name, reason, message, logs
        text = f"TrainJob {name!r} failed ({reason}): {message}"
        super().__init__(text + (f"\n--- pod logs ---\n{logs}" if logs else ""))


class TrainJobCancelled(KeyboardInterrupt):
    """Raised by SIGTERM while waiting, so cancellation takes the KeyboardInterrupt cleanup path."""


# ---------------------------------------------------------------------- validation
@dataclass(frozen=True)
class ParallelLayout:
    """Parallel sizes of one training run; ``world_size = nodes * procs_per_node``."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    expert_parallel: int = 1
    sequence_parallel: int = 1

    def check(self, world_size: int) -> None:
        """Raise ``ValueError`` unless the sizes tile ``world_size`` processes: the train step's own rule
        (:func:`linear_moe.components.train.config.data_parallel_size`)."""
        from linear_moe.components.train.config import data_parallel_size

        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        data_parallel_size(world_size, **vars(self))


def procs_per_node(gpus_per_node: int) -> int:
    """One process per GPU; CPU nodes (``gpus_per_node == 0``) run one process each."""
    if not isinstance(gpus_per_node, int) or gpus_per_node < 0:
        raise ValueError(f"gpus_per_node must be an integer >= 0, got {gpus_per_node!r}")
    return max(gpus_per_node, 1)


def resource_quantity(name: str, value: str) -> str:
    """``value`` if it is a positive Kubernetes quantity ("32", "500m", "400Gi") or "" (unset); otherwise
    ``ValueError`` naming the parameter ``name``."""
    match = _QUANTITY_RE.match(value) if isinstance(value, str) else None
    if value != "" and (not match or float(match.group(1)) == 0):
        raise ValueError(f"{name} {value!r} is not a positive Kubernetes quantity; pass e.g. \"32\" or \"500m\" "
                         f"(CPU), \"400Gi\" or \"64G\" (memory), or \"\" to leave it to the training runtime")
    return value


def validate_model(preset: str, lsm_mixer: str = "", layer_pattern: str = "") -> None:
    """Build the model config the job would train, so a bad preset/mixer/pattern fails here."""
    from linear_moe.model.config import preset as build_preset

    overrides: dict[str, Any] = {}
    if lsm_mixer:
        overrides["lsm_mixer"] = lsm_mixer
    if layer_pattern:
        overrides.update(layer_pattern=layer_pattern, num_layers=len(layer_pattern))
    build_preset(preset, **overrides)


# ---------------------------------------------------------------------- manifest
def train_command(preset: str, *, lsm_mixer: str = "", layer_pattern: str = "", layout: ParallelLayout = ParallelLayout(),
                  steps: int, seq_length: int, data_dir: str, output_dir: str, extra_args: list[str] = ()) -> list[str]:
    """The container command: ``torchrun -m linear_moe.components.train`` with the train CLI's flags.

    ``torchrun`` reads nodes, ranks and the rendezvous from the ``PET_*`` variables that the torch
    runtime injects, so the command itself carries no topology.
    """
    command = ["torchrun", "-m", "linear_moe.components.train", "--preset", preset,
               "--tensor-parallel", str(layout.tensor_parallel), "--pipeline-parallel", str(layout.pipeline_parallel),
               "--expert-parallel", str(layout.expert_parallel), "--sequence-parallel", str(layout.sequence_parallel),
               "--steps", str(steps), "--seq-length", str(seq_length), "--data-dir", data_dir,
               "--output-dir", output_dir, "--resume"]
    if lsm_mixer:
        command += ["--model", f"lsm_mixer={lsm_mixer}"]
    if layer_pattern:
        command += ["--model", f"layer_pattern={layer_pattern}", "--model", f"num_layers={len(layer_pattern)}"]
    return command + list(extra_args)


def build_trainjob(name: str, image: str, nodes: int, gpus_per_node: int, command: list[str], *,
                   namespace: str = NAMESPACE, pvc: str = PVC, runtime: str = RUNTIME,
                   runtime_kind: str = RUNTIME_KIND, cpu_per_node: str = "", memory_per_node: str = "",
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """A ``trainer.kubeflow.org/v1alpha1`` TrainJob manifest (a plain dict).

    ``nodes`` pods run ``max(gpus_per_node, 1)`` processes each; ``pvc`` is mounted at ``/workspace``
    (together with the runtime's emptyDirs, so the patch holds whether it merges or replaces).
    ``resourcesPerNode`` holds ``cpu_per_node`` / ``memory_per_node`` (Kubernetes quantities, request =
    limit) where given and the ``nvidia.com/gpu`` limit where ``gpus_per_node > 0``; with none of them it is
    omitted and the runtime's own resources apply.  Kubeflow Trainer replaces the node container's whole
    ``resources`` with a ``resourcesPerNode``, so a GPU job keeps CPU/memory requests only if given here.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 63:
        raise ValueError(f"TrainJob name {name!r} must be a DNS-1035 label: lower case letters, digits and '-', "
                         f"starting with a letter, at most 63 characters")
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive integer, got {nodes!r}")
    procs = procs_per_node(gpus_per_node)
    if not command or not all(isinstance(part, str) for part in command):
        raise ValueError(f"command must be a non-empty list of strings, got {command!r}")
    if not image:
        raise ValueError("image must name the training container image, e.g. pipelines.images.PROJECT_IMAGE")
    requests: dict[str, Any] = {key: resource_quantity(name, value) for key, name, value in (
        ("cpu", "cpu_per_node", cpu_per_node), ("memory", "memory_per_node", memory_per_node)) if value != ""}
    limits: dict[str, Any] = dict(requests)
    if gpus_per_node:
        limits["nvidia.com/gpu"] = gpus_per_node
    resources = {key: value for key, value in (("requests", requests), ("limits", limits)) if value}
    node_patch = {
        "name": TRAINER_CONTAINER,
        "template": {"spec": {"template": {"spec": {
            "containers": [{"name": TRAINER_CONTAINER, "volumeMounts": [
                {"name": "workspace", "mountPath": WORKSPACE},
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "cache", "mountPath": "/home/app/.cache"},
                {"name": "dshm", "mountPath": "/dev/shm"},
            ]}],
            "volumes": [
                {"name": "workspace", "persistentVolumeClaim": {"claimName": pvc}},
                {"name": "tmp", "emptyDir": {}},
                {"name": "cache", "emptyDir": {}},
                {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            ],
        }}}},
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "linear-moe"}},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": runtime_kind, "name": runtime},
            "trainer": {
                "image": image,
                "command": list(command),
                "numNodes": nodes,
                "numProcPerNode": procs,
                **({"resourcesPerNode": resources} if resources else {}),
                "env": [{"name": k, "value": v} for k, v in sorted((env or {}).items())],
            },
            "runtimePatches": [{"manager": PATCH_MANAGER,
                                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node_patch]}}}}],
        },
    }


# ---------------------------------------------------------------------- cluster access
@dataclass
class ClusterApi:
    """The two kubernetes clients the launcher calls (``CustomObjectsApi``, ``CoreV1Api``)."""

    custom: Any
    core: Any


def kubeconfig_path(path: str | os.PathLike | None = None) -> Path:
    """``path``, else the first file of ``$KUBECONFIG``, else ``~/.kube/config``."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), "")
    return Path(first or "~/.kube/config").expanduser()


def connect(kubeconfig: str | os.PathLike | None = None, context: str | None = None) -> ClusterApi:
    """Load credentials (in-cluster service account when running in a pod) and check the host answers.

    Raises ``FileNotFoundError`` naming the kubeconfig path, or ``ConnectionError`` naming the host.
    """
    from kubernetes import client, config

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        path = kubeconfig_path(kubeconfig)
        if not path.is_file():
            raise FileNotFoundError(
                f"kubeconfig not found at {path}; pass --kubeconfig PATH or set KUBECONFIG to your cluster's config")
        config.load_kube_config(config_file=str(path), context=context)
    api_client = client.ApiClient()
    host = api_client.configuration.host
    try:
        client.VersionApi(api_client).get_code(_request_timeout=10)
    except Exception as error:  # urllib3 raises several connection error types
        if type(error).__name__ == "ApiException":
            return ClusterApi(client.CustomObjectsApi(api_client), client.CoreV1Api(api_client))
        raise ConnectionError(f"Kubernetes API server {host} is unreachable ({type(error).__name__}: {error}); "
                              f"check the kubeconfig's server address and your network/VPN") from error
    return ClusterApi(client.CustomObjectsApi(api_client), client.CoreV1Api(api_client))


# ---------------------------------------------------------------------- launch and wait
def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def _pod_logs(api: ClusterApi, namespace: str, name: str, tail_lines: int) -> str:
    """The last ``tail_lines`` lines of every pod of the job, each block headed by its pod name."""
    pods = api.core.list_namespaced_pod(namespace, label_selector=f"{JOBSET_LABEL}={name}").items
    blocks = []
    for pod in sorted(pods, key=lambda p: p.metadata.name):
        try:
            text = api.core.read_namespaced_pod_log(pod.metadata.name, namespace, container=TRAINER_CONTAINER,
                                                    tail_lines=tail_lines)
        except Exception as error:  # a pod that never started has no log
            text = f"<no log: {error}>"
        blocks.append(f"[{pod.metadata.name}] ({pod.status.phase})\n{text.rstrip()}")
    return "\n".join(blocks)


def _pod_phases(api: ClusterApi, namespace: str, name: str) -> str:
    pods = api.core.list_namespaced_pod(namespace, label_selector=f"{JOBSET_LABEL}={name}").items
    counts: dict[str, int] = {}
    for pod in pods:
        counts[pod.status.phase] = counts.get(pod.status.phase, 0) + 1
    return ", ".join(f"{n} {phase}" for phase, n in sorted(counts.items())) or "no pods yet"


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM (a cancelled pipeline run) into :class:`TrainJobCancelled` in the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise TrainJobCancelled(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def delete_trainjob(api: ClusterApi, namespace: str, name: str) -> None:
    """Delete the TrainJob and, through foreground propagation, its JobSet and pods."""
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                               propagation_policy="Foreground")


def launch_and_wait(manifest: dict[str, Any], api: ClusterApi, poll_s: float = 10.0, timeout_s: float | None = None,
                    log: Callable[[str], None] = print, log_tail_lines: int = 50) -> dict[str, Any]:
    """Create ``manifest``, report its state every ``poll_s`` seconds, return the finished job object.

    Failure raises :class:`TrainJobFailed` carrying the job's condition reason and message plus the
    tail of each pod's log.  Ctrl-C, SIGTERM and ``timeout_s`` delete the job before re-raising
    (``TimeoutError`` for the timeout), so no pods are left running.
    """
    namespace = manifest["metadata"].get("namespace", NAMESPACE)
    name = manifest["metadata"]["name"]
    try:
        api.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    except Exception as error:
        status = getattr(error, "status", None)
        hint = {409: "a TrainJob of that name exists; pick another name or delete it",
                404: f"namespace {namespace!r} or the TrainJob CRD is missing; install Kubeflow Trainer and apply k8s/",
                403: f"the service account may not create trainjobs in {namespace!r}; apply k8s/ (Role linear-moe-launcher)"}
        if status in hint:
            raise RuntimeError(f"creating TrainJob {name!r} in {namespace!r} failed: {hint[status]}") from error
        raise
    log(f"TrainJob {namespace}/{name} created ({manifest['spec']['trainer']['numNodes']} node(s))")
    start = time.monotonic()
    last_state = ""
    finished = False
    try:
        with _sigterm_raises():
            while True:
                job = api.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
                failed = _condition(job, "Failed")
                if failed:
                    finished = True
                    logs = _pod_logs(api, namespace, name, log_tail_lines)
                    raise TrainJobFailed(name, failed.get("reason", ""), failed.get("message", ""), logs)
                if _condition(job, "Complete"):
                    finished = True
                    log(f"TrainJob {name} complete after {time.monotonic() - start:.0f}s")
                    logs = _pod_logs(api, namespace, name, log_tail_lines)
                    if logs:
                        log(logs)
                    return job
                state = _pod_phases(api, namespace, name)
                if state != last_state:
                    log(f"TrainJob {name}: {state} ({time.monotonic() - start:.0f}s)")
                    last_state = state
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    raise TimeoutError(f"TrainJob {name!r} did not finish within timeout_s={timeout_s}; it was deleted")
                time.sleep(poll_s)
    except (KeyboardInterrupt, TimeoutError):
        if not finished:
            log(f"deleting TrainJob {namespace}/{name}")
            delete_trainjob(api, namespace, name)
        raise


def run_trainjob(name: str, image: str, *, preset: str, lsm_mixer: str = "", layer_pattern: str = "",
                 layout: ParallelLayout = ParallelLayout(), nodes: int = 1, gpus_per_node: int = 0,
                 cpu_per_node: str = "", memory_per_node: str = "", steps: int,
                 seq_length: int, data_dir: str, output_dir: str, namespace: str = NAMESPACE, pvc: str = PVC,
                 runtime: str = RUNTIME, kubeconfig: str | None = None, poll_s: float = 10.0,
                 timeout_s: float | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Validate everything, then launch one training TrainJob and wait for it (the in-cluster train step).

    ``data_dir`` and ``output_dir`` are paths under ``/workspace`` (the shared PVC), so the caller
    reads the checkpoint from there once the job is complete.
    """
    layout.check(nodes * procs_per_node(gpus_per_node))
    validate_model(preset, lsm_mixer, layer_pattern)
    command = train_command(preset, lsm_mixer=lsm_mixer, layer_pattern=layer_pattern, layout=layout, steps=steps,
                            seq_length=seq_length, data_dir=data_dir, output_dir=output_dir)
    manifest = build_trainjob(name, image, nodes, gpus_per_node, command, namespace=namespace, pvc=pvc, runtime=runtime,
                              cpu_per_node=cpu_per_node, memory_per_node=memory_per_node)
    api = connect(kubeconfig)
    return launch_and_wait(manifest, api, poll_s=poll_s, timeout_s=timeout_s, log=log)
