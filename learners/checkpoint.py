"""Training checkpoints of the LoRA recipe: safetensors for tensors, JSON for the rest.

A checkpoint is a ``step-NNNNNNNN/`` directory that appears whole (written to a temp dir,
fsynced, renamed): adapter weights, optimizer state, RNG states and the loop position.
Nothing is ever unpickled, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from aftertune.learners.errors import CheckpointError
from aftertune.store.files import staged_dir

log = logging.getLogger(__name__)

# --- checkpoints: safetensors for tensors, JSON for the rest; a step directory appears whole.


def save_checkpoint(
    checkpoint_dir: Path,
    run_id: str,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    state: dict[str, Any],
) -> Path:
    """Adapter weights, optimizer, scheduler, RNG and position, as ``step-NNNNNNNN/``."""
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"step-{state['step']:08d}"
    with staged_dir(final) as tmp:
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in params.items()},
            tmp / "adapter.safetensors",
        )
        opt = optimizer.state_dict()
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_scalars: dict[str, dict[str, Any]] = {}
        for idx, slots in opt["state"].items():
            for key, value in slots.items():
                if isinstance(value, torch.Tensor):
                    opt_tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    opt_scalars.setdefault(str(idx), {})[key] = value
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        save_file(rng, tmp / "rng.safetensors")
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        meta = {
            "run_id": run_id,
            "state": state,
            "param_names": list(params),
            "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
            "scheduler": sched,
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    for old in checkpoint_dir.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    checkpoint_dir: Path,
    run_id: str,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> dict[str, Any] | None:
    """Restore the newest checkpoint of this run into the given objects; None if there is none."""
    found = sorted(p for p in Path(checkpoint_dir).glob("step-*") if (p / "state.json").exists())
    if not found:
        return None
    path = found[-1]
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read {path}/state.json ({exc}); delete {path} to start over"
        ) from exc
    if meta.get("run_id") != run_id:
        log.warning(
            "checkpoint %s belongs to another run (data or settings differ); starting fresh", path
        )
        return None
    if meta["param_names"] != list(params):
        raise CheckpointError(f"{path} holds other adapter parameters; delete it to start over")
    adapter = load_file(str(path / "adapter.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(adapter[name].to(p.device, p.dtype))
    tensors = load_file(str(path / "optimizer.safetensors"))
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, _, slot = key.partition(".")
        slots.setdefault(int(idx), {})[slot] = value
    for idx, scalars in meta["optimizer"]["scalars"].items():
        slots.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": slots, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(
        {**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)}
    )
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    return dict(meta["state"])


def clear_checkpoints(checkpoint_dir: Path) -> None:
    """Remove this run's checkpoints (after its adapter is saved)."""
    for old in Path(checkpoint_dir).glob("step-*"):
        shutil.rmtree(old, ignore_errors=True)
