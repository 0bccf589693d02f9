"""Run metrics: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard events.

Only rank 0 writes. On resume from step ``s``, rows after ``s`` left by an interrupted run are dropped
(and TensorBoard purges them), so the curves of a resumed run match an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_path


class MetricsLogger:
    """Append-only metrics of one run.

    Args:
        run_dir: The run folder (``metrics.jsonl`` and ``tensorboard/`` go there).
        enabled: False on ranks other than 0 (every call is then a no-op).
        start_step: Step the run (re)starts from; later rows of a previous attempt are dropped.
    """

    def __init__(self, run_dir: Path, enabled: bool, start_step: int) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        _truncate_after(self.path, start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is optional for the loop itself
            self._tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record ``values`` at ``step`` (numbers go to TensorBoard as scalars)."""
        if not self.enabled:
            return
        row = {"step": step, **values}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) == len(rows):
        return
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
