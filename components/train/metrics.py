"""Training metrics: one JSON object per line in ``metrics.jsonl``, mirrored to dvclive."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Rank-0 logger. ``log(step, {...})`` appends a line; ``close()`` finishes dvclive."""

    def __init__(self, output_dir: str | Path, use_dvclive: bool, resume: bool):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")
        self._live = None
        if use_dvclive:
            from dvclive import Live

            self._live = Live(str(Path(output_dir) / "dvclive"), resume=resume, save_dvc_exp=False,
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
