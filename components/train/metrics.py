"""Training metrics: one JSON object per line in ``metrics.jsonl``, mirrored to dvclive."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Rank-0 logger. ``log(step, {...})`` appends a line; ``close()`` finishes dvclive.

    A fresh run (``resume_step=None``) starts a new ``metrics.jsonl``. A run resumed from the
    checkpoint of ``resume_step`` keeps the records up to that step and drops the later ones, which
    the killed run logged after its last checkpoint and the resumed run logs again.
    """

    def __init__(self, output_dir: str | Path, use_dvclive: bool, resume_step: int | None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._file = self.path.open("a")
        self._live = None
        if use_dvclive:
            from dvclive import Live

            self._live = Live(str(Path(output_dir) / "dvclive"), resume=resume_step is not None, save_dvc_exp=False,
                              dvcyaml=None)

    def log(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **values}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._live is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self._live.log_metric(f"train/{name}" if not name.startswith("eval") else name, value,
                                          plot=True)
            self._live.step = step
            self._live.next_step()

    def close(self) -> None:
        self._file.close()
        if self._live is not None:
            self._live.end()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
