"""Submit a compiled pipeline to a Kubeflow Pipelines backend and return the run's URL."""
from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any


def check_reachable(host: str, timeout_s: float = 10.0) -> None:
    """Raise ``ConnectionError`` naming ``host`` unless its healthz endpoint answers (any HTTP status)."""
    if not host.startswith(("http://", "https://")):
        raise ValueError(f"--host {host!r} must be a URL such as https://kubeflow.example.com/pipeline")
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered: authentication or routing is the client's business
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(f"Kubeflow Pipelines host {host} is unreachable ({reason}); check --host, "
                              f"port-forwarding (kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80) "
                              f"or your network") from error


def submit(package_path: str, host: str, arguments: dict[str, Any], *, namespace: str | None = None,
           experiment: str = "linear-moe", run_name: str | None = None, token: str | None = None,
           service_account: str | None = "linear-moe-launcher", enable_caching: bool | None = None,
           client_factory=None, check_host: bool = True) -> str:
    """Create a run of the compiled ``package_path``; returns its URL in the KFP UI."""
    if check_host:
        check_reachable(host)
    if client_factory is None:
        from kfp import Client as client_factory
    kwargs: dict[str, Any] = {"host": host, "existing_token": token}
    if namespace:
        kwargs["namespace"] = namespace
    client = client_factory(**kwargs)
    result = client.create_run_from_pipeline_package(
        package_path, arguments=arguments, run_name=run_name, experiment_name=experiment, namespace=namespace,
        service_account=service_account, enable_caching=enable_caching)
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"
