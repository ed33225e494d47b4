"""A cycle's training in several processes: ``train.processes = N`` runs it under torchrun.

The daemon (or ``aftertune cycle``) writes what the training needs to ``job.json`` in the
run's work dir — where the champion comes from (base + adapter chain, merged once here
before the processes start), the ``TrainJob`` (examples, specs, paths), and what the model
kind builds its objective from (answer sets, specs), serialized by pydantic — and starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m
aftertune.learners.train_job job.json``. Each process loads the champion, joins the job
(gloo on CPU, nccl on CUDA: learners/distributed.py), asks the base's model kind for its
objective and calls the same ``train_adapter``
as a single process, on its share of every step. Rank 0 writes checkpoints, the adapter,
``progress.json`` after every step and ``result.json`` at the end.

A warm stop: the caller's ``should_stop`` is asked with rank 0's progress; when it says
stop, every process gets SIGTERM, stops at the same step boundary after a checkpoint, and
the caller raises TrainingInterrupted as a single process would. Resume works as for one
process (the checkpoint's run id does not depend on N). One host, N processes; several
hosts would need torchrun's rendezvous (``--nnodes``, ``--rdzv-endpoint``) and a shared
work dir, which this launcher does not set up.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from aftertune.learners.champion import build_champion, load_champion
from aftertune.learners.distributed import ranks_from_env
from aftertune.learners.errors import LearnerError, TrainingInterrupted
from aftertune.learners.kinds import kind_for
from aftertune.learners.model_kind import AnswerSets
from aftertune.learners.recipe import TrainJob, TrainResult, train_adapter
from aftertune.learners.specs import LearningSpecs
from aftertune.store.files import write_atomic

log = logging.getLogger(__name__)

JOB, PROGRESS, RESULT = "job.json", "progress.json", "result.json"
POLL_S = 0.5


@dataclass(frozen=True)
class ModelSource:
    """Where the champion comes from: the base and the adapters merged onto it, in order."""

    base: str
    adapter_dirs: Sequence[Path]
    cache_dir: Path


@dataclass(frozen=True)
class ProcessJob:
    """What every process of the run reads from ``job.json``."""

    source: ModelSource
    job: TrainJob
    sets: dict[str, list[str] | None]  # the answer sets the kind's objective is built on
    specs: LearningSpecs

    def to_json(self) -> bytes:
        return _PROCESS_JOB_JSON.dump_json(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> ProcessJob:
        return _PROCESS_JOB_JSON.validate_json(data)


_PROCESS_JOB_JSON: TypeAdapter[ProcessJob] = TypeAdapter(ProcessJob)


def train_in_processes(
    processes: int,
    source: ModelSource,
    job: TrainJob,
    *,
    sets: AnswerSets,
    specs: LearningSpecs,
    should_stop: Callable[[int, int], bool] | None = None,
) -> TrainResult:
    """``train_adapter`` over ``processes`` processes started by torchrun (see the module)."""
    job_dir = Path(job.out_dir).parent / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    for stale in (PROGRESS, RESULT):
        (job_dir / stale).unlink(missing_ok=True)
    build_champion(source.base, list(source.adapter_dirs), source.cache_dir)  # once, not N times
    answer_sets = {t: (sorted(s) if s is not None else None) for t, s in sets.items()}
    write_atomic(job_dir / JOB, ProcessJob(source, job, answer_sets, specs).to_json())
    stopped = _run_torchrun(processes, job_dir, should_stop)
    progress = _read(job_dir / PROGRESS) or {"step": 0}
    if stopped:
        raise TrainingInterrupted(int(progress["step"]), job.checkpoint_dir)
    result = _read(job_dir / RESULT)
    if result is None:
        raise LearnerError(f"training in {processes} processes left no result; see the log above")
    return TrainResult(**{**result, "adapter_dir": Path(result["adapter_dir"])})


def _run_torchrun(
    processes: int, job_dir: Path, should_stop: Callable[[int, int], bool] | None
) -> bool:
    """Run the job; True when ``should_stop`` ended it (every process was asked to stop)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "aftertune.learners.train_job",
        str(job_dir / JOB),
    ]
    log.info("training in %d processes (torchrun)", processes)
    proc = subprocess.Popen(command, start_new_session=True)
    stopping = False
    while proc.poll() is None:
        time.sleep(POLL_S)
        progress = _read(job_dir / PROGRESS)
        if stopping or should_stop is None or progress is None:
            continue
        if should_stop(int(progress["step"]), int(progress["total"])):
            stopping = True
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun and every rank: stop at a step
    if proc.returncode != 0 and not stopping:
        raise LearnerError(
            f"training in {processes} processes failed (torchrun exit {proc.returncode})"
        )
    return stopping


def _read(path: Path) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found


# --- one process of the job (torchrun runs this module)


def run_rank(job_path: Path) -> int:
    """Train this process' share; 75 when asked to stop (after a checkpoint), else 0."""
    work = ProcessJob.from_json(job_path.read_bytes())
    ranks = ranks_from_env()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    source = work.source
    model, tokenizer = load_champion(source.base, list(source.adapter_dirs), source.cache_dir)
    objective = kind_for(source.base).objective(tokenizer, work.sets, work.specs)
    leader = ranks is None or ranks.leader

    def should_stop(step: int, total: int) -> bool:
        if leader:
            write_atomic(
                job_path.parent / PROGRESS, json.dumps({"step": step, "total": total}).encode()
            )
        return stop.is_set()

    try:
        result = train_adapter(
            model, tokenizer, work.job, objective=objective, should_stop=should_stop, ranks=ranks
        )
    except TrainingInterrupted:
        return 75
    if leader:
        blob = {**asdict(result), "adapter_dir": str(result.adapter_dir)}
        write_atomic(job_path.parent / RESULT, json.dumps(blob).encode())
    return 0


if __name__ == "__main__":
    import torch.distributed as dist

    code = run_rank(Path(sys.argv[1]))
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
