"""Training metrics: one JSON object per line in ``metrics.jsonl``, mirrored to dvclive."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from linear_moe.components.files import atomic_write_text


class MetricsLogger:
    """Rank-0 logger. ``log(step, {...})`` appends a line; ``close()`` finishes dvclive.

    A fresh run (``resume_step=None``) starts a new ``metrics.jsonl``. A run resumed from the
    checkpoint of ``resume_step`` keeps the records up to that step and drops the later ones, which
    the killed run logged after its last checkpoint and the resumed run logs again (in dvclive's
    per-metric ``.tsv`` files too).
    """

    def __init__(self, output_dir: str | Path, use_dvclive: bool, resume_step: int | None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            _keep_lines(self.path, lambda line: json.loads(line)["step"] <= resume_step)
        self._file = self.path.open("a")
        self._live = None
        if use_dvclive:
            from dvclive import Live

            live_dir = Path(output_dir) / "dvclive"
            if resume_step is not None:
                for tsv in sorted((live_dir / "plots" / "metrics").rglob("*.tsv")):  # "step\t<name>" rows
                    _keep_lines(tsv, lambda line: not line[:1].isdigit() or int(line.split("\t")[0]) <= resume_step)
            self._live = Live(str(live_dir), resume=resume_step is not None, save_dvc_exp=False, dvcyaml=None)

    def log(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **values}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._live is not None:
            self._live.step = step  # before logging: dvclive files each value under its current step
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self._live.log_metric(f"train/{name}" if not name.startswith("eval") else name, value,
                                          plot=True)
            self._live.next_step()

    def close(self) -> None:
        self._file.close()
        if self._live is not None:
            self._live.end()


def _keep_lines(path: Path, keep) -> None:
    """Rewrite ``path`` (if it exists) atomically with only its non-empty lines that ``keep`` accepts."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and keep(line)]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
