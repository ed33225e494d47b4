"""The state directory's layout: every path aftertune keeps under ``state_dir``, named once.

state_dir/
  examples.sqlite3          the example store (store/examples.py)
  registry.sqlite3          versions, lifecycle, audit (store/registry.py)
  adapters/vN/              each version's LoRA adapter, PEFT format (store/registry.py)
  champions/<chain>/        merged checkpoints, a cache rebuilt when missing (learners/champion.py)
  ewc/fisher.safetensors    the online EWC Fisher carried across cycles (learners/ewc.py)
  work/train-pP-sS/         a training run in progress on champion P, data up to seq S
  bundles/vN, latest        published ONNX bundles (store/bundles.py)
  redis/                    the embedded Redis server's files (daemon/embedded_redis.py)
  daemon.json               what a running daemon reports to `aftertune status`
  cycle.json                a learning cycle in progress, from any process (daemon/running_cycle.py)
  report.html               `aftertune report`'s page when no --html is given
  consumer/current, vN      `aftertune pull`'s install directory when no --to is given
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateLayout:
    """Paths under one state directory. ``StateLayout(state_dir).bundles`` and so on."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def examples_db(self) -> Path:
        return self.root / "examples.sqlite3"

    @property
    def registry_db(self) -> Path:
        return self.root / "registry.sqlite3"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def champions(self) -> Path:
        return self.root / "champions"

    @property
    def fisher(self) -> Path:
        return self.root / "ewc" / "fisher.safetensors"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def training_run(self, parent: int | None, until: int) -> Path:
        """Work dir of a training run on champion ``parent`` (None = base), data up to ``until``."""
        return self.work / f"train-p{parent or 0}-s{until}"

    def training_runs(self, parent: int | None = None) -> list[Path]:
        """Training runs left on champion ``parent``, or on any champion when None."""
        pattern = "train-*" if parent is None else f"train-p{parent}-s*"
        return sorted(self.work.glob(pattern))

    @staticmethod
    def training_run_until(path: Path) -> int | None:
        """The data watermark a training run's dir name records (None: not a run's dir)."""
        try:
            return int(path.name.rsplit("-s", 1)[1])
        except (IndexError, ValueError):
            return None

    @property
    def bundles(self) -> Path:
        return self.root / "bundles"

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def daemon_status(self) -> Path:
        return self.root / "daemon.json"

    @property
    def cycle_in_progress(self) -> Path:
        return self.root / "cycle.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def consumer(self) -> Path:
        return self.root / "consumer"
