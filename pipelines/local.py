"""Run the whole pipeline on this machine with ``kfp.local`` (subprocesses, this Python environment)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def run_local(arguments: dict[str, Any], pipeline_root: str | Path = "runs/kfp-local") -> Path:
    """Run the DAG here (``use_trainjob`` must be off: training runs in-process); returns the run folder.

    ``kfp.local`` ignores container images and Kubernetes settings, so the steps run in this
    environment.  Artifacts land at ``<run folder>/<step>-component/<artifact name>``, and each
    step's metrics in its ``executor_output.json``.
    """
    from kfp import local

    from linear_moe.pipelines.pipeline import build_pipeline

    if arguments.get("use_trainjob"):
        raise ValueError("use_trainjob=True needs a cluster; run-local trains in-process (drop --use-trainjob)")
    root = Path(pipeline_root).resolve()
    before = set(root.iterdir()) if root.is_dir() else set()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    build_pipeline()(**arguments)
    (run_dir,) = set(root.iterdir()) - before
    return run_dir
