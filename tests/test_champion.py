"""The champion: base + promoted adapters merged in order, cached, rebuilt identically."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from learner_fixtures import save_tiny_base, single_thread  # noqa: F401 (autouse)
from peft import PeftModel
from safetensors.torch import load_file
from spec_fixtures import lora_spec

from aftertune.learners.base_model import load_base
from aftertune.learners.champion import build_champion, champion_key, load_champion
from aftertune.learners.errors import ChampionError
from aftertune.learners.lora import attach_fresh_adapter, save_adapter


def make_adapter(base_dir: Path, merged_before: list[Path], out: Path, seed: int) -> Path:
    """An adapter with non-zero B, made on the champion of ``merged_before`` (as a cycle would)."""
    model, _ = load_base(base_dir, dtype=torch.float32)
    for earlier in merged_before:
        model = PeftModel.from_pretrained(model, str(earlier)).merge_and_unload()
    torch.manual_seed(seed)
    peft_model = attach_fresh_adapter(model, lora_spec(r=4, target_modules=("q_proj", "down_proj")))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return save_adapter(peft_model, out)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("champion")
    base = save_tiny_base(root / "base")
    first = make_adapter(base, [], root / "v1", seed=1)
    second = make_adapter(base, [first], root / "v2", seed=2)
    return base, [first, second]


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])


def test_merged_chain_equals_applying_adapters_in_sequence(chain, tmp_path) -> None:
    base, adapters = chain
    path = build_champion(base, adapters, tmp_path / "cache")
    assert {"config.json", "model.safetensors", "tokenizer.json", "champion.json"} <= {
        p.name for p in path.iterdir()
    }
    weights = load_file(str(path / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in weights)
    champion, tok = load_champion(base, adapters, tmp_path / "cache")
    assert tok.decode(tok.encode("héllo 你好", add_special_tokens=False)) == "héllo 你好"
    # Sequentially: v1 merged into the base, then v2 applied as a live (unmerged) adapter.
    model, _ = load_base(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapters[0])).merge_and_unload()
    live = PeftModel.from_pretrained(model, str(adapters[1]))
    torch.testing.assert_close(logits_of(champion, IDS), logits_of(live, IDS), rtol=1e-5, atol=1e-5)
    # ...and it differs from the base: the adapters do something.
    plain, _ = load_base(base)
    assert not torch.allclose(logits_of(champion, IDS), logits_of(plain, IDS), atol=1e-3)


def test_rebuild_after_cache_loss_is_tensor_equal(chain, tmp_path) -> None:
    base, adapters = chain
    cache = tmp_path / "cache"
    first = build_champion(base, adapters, cache)
    saved = load_file(str(first / "model.safetensors"))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert build_champion(base, adapters, cache) == first  # a hit: nothing rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    shutil.rmtree(cache)
    rebuilt = build_champion(base, adapters, cache)
    assert rebuilt == first
    again = load_file(str(rebuilt / "model.safetensors"))
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_cache_key_follows_base_and_chain_order(chain) -> None:
    base, (first, second) = chain
    assert champion_key(base, [first, second]) != champion_key(base, [second, first])
    assert champion_key(base, [first]) != champion_key(base, [first, second])
    assert champion_key(base, [first, second]) == champion_key(base, [first, second])


def test_no_adapters_is_the_base_itself(chain, tmp_path) -> None:
    base, _ = chain
    assert build_champion(base, [], tmp_path / "cache") == base
    assert not (tmp_path / "cache").exists()


def test_missing_adapter_says_what_to_do(chain, tmp_path) -> None:
    base, (first, _) = chain
    with pytest.raises(ChampionError, match=r"has no adapter_config\.json.*Restore"):
        build_champion(base, [first, tmp_path / "gone"], tmp_path / "cache")
