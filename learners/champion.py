"""The champion: the base model with every promoted adapter merged in, in promotion order.

The merged checkpoint is a cache, never the source of truth: it lives under ``cache_dir``
keyed by the base's sha256 and the chain of adapter hashes, and is rebuilt from the chain
whenever it is missing (deleted, new machine). A build writes a temp directory and renames
it into place, so a crash never leaves a half-written champion that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aftertune.learners.base_model import base_sha256, load_base, resolve_base
from aftertune.learners.errors import ChampionError
from aftertune.store.files import files_sha256, staged_dir
from aftertune.store.layout import StateLayout
from aftertune.store.registry import Registry, Version

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "champion.json"  # written last inside the temp dir: its presence marks a whole build


def adapter_sha256(adapter_dir: Path) -> str:
    """sha256 over an adapter's config and weights (the files that decide what it does)."""
    paths = [Path(adapter_dir) / name for name in ADAPTER_FILES]
    for path in paths:
        if not path.is_file():
            raise ChampionError(
                f"adapter {adapter_dir} has no {path.name}; the champion chain cannot be rebuilt."
                " Restore the adapter from the registry's artifacts or retire that version."
            )
    return files_sha256(paths)


def champion_key(base_spec: str | Path, adapter_dirs: Sequence[Path]) -> str:
    """Cache key: sha256 of (base sha256, adapter hashes in order).

    It hashes a JSON blob, not files, so it does not use ``store.files``' file hashing.
    """
    chain = {
        "base": base_sha256(base_spec),
        "adapters": [adapter_sha256(Path(d)) for d in adapter_dirs],
    }
    return hashlib.sha256(json.dumps(chain, sort_keys=True).encode()).hexdigest()


def build_champion(base_spec: str | Path, adapter_dirs: Sequence[Path], cache_dir: Path) -> Path:
    """Directory of the merged champion (safetensors + config + tokenizer), built if missing.

    With no adapters the champion is the base itself and its own directory is returned.
    """
    if not adapter_dirs:
        return resolve_base(base_spec)
    key = champion_key(base_spec, adapter_dirs)
    final = Path(cache_dir) / key[:32]
    if (final / MANIFEST).is_file():
        return final
    log.info(
        "building champion %s: base + %d adapter%s merged in order",
        key[:12],
        len(adapter_dirs),
        "" if len(adapter_dirs) == 1 else "s",
    )
    with staged_dir(final) as tmp:
        model, tokenizer = merge_chain(base_spec, adapter_dirs)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "key": key,
            "base": str(base_spec),
            "base_sha256": base_sha256(base_spec),
            "adapters": [{"path": str(d), "sha256": adapter_sha256(Path(d))} for d in adapter_dirs],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return final


def merge_chain(base_spec: str | Path, adapter_dirs: Sequence[Path]) -> tuple[Any, Any]:
    """Base (fp32, CPU) with each adapter merged in turn: adapter k was trained on merge k-1."""
    import torch
    from peft import PeftModel

    model, tokenizer = load_base(base_spec, device="cpu", dtype=torch.float32)
    for adapter_dir in adapter_dirs:
        adapter_sha256(Path(adapter_dir))  # fail with a clear message before peft does
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model, tokenizer


def load_champion(
    base_spec: str | Path,
    adapter_dirs: Sequence[Path],
    cache_dir: Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) of the champion, from the cache (built first when missing)."""
    return load_base(build_champion(base_spec, adapter_dirs, cache_dir), device=device, dtype=dtype)


def load_version(
    registry: Registry, base: str, state_dir: Path, version: Version | None, device: str = "cpu"
) -> tuple[Any, Any]:
    """(model, tokenizer) for ``version`` (None = the base): base + its adapter chain merged."""
    chain = registry.chain(version.version) if version is not None else []
    return load_champion(
        base, [v.adapter_dir for v in chain], StateLayout(state_dir).champions, device=device
    )
