"""Runtime benchmark: the ONNX bundle (fp32, int8, int4, onnx-logits fallback) vs PyTorch eager.

    OMP_NUM_THREADS=1 .venv/bin/python bench/runtime.py [--prompts 64] [--held-out-per-task 2]
        [--max-new-tokens 32] [--variants fp32,int8,int4,logits] [--seed 0] [--json FILE]

Exports the embedded tiny base with `export_bundle` into temporary directories, one per
variant (export and parity-check seconds reported; int8/int4 with min_token_agreement 0 so
that agreement is measured here instead of failing the export), then decodes the same
prompts greedily, batch 1, on CPU with every engine:

  pytorch  `model.generate`, fp32, do_sample=False: the baseline of every ratio
  fp32, int8, int4  the bundle through `Bundle.generate_ids` (onnxruntime-genai, KV cache)
  logits   the torch.onnx fallback bundle: its greedy loop recomputes the whole sequence per
           token (no KV cache), so it is expected to be slower than the others

Prompts: the first --prompts of the curriculum stream (`curriculum.stream(seed)`, the base
model's own training stream) plus `curriculum.held_out(seed, --held-out-per-task)`.
Three timed passes, after a warm-up, with the engines interleaved prompt by prompt so that
load changes on a shared machine hit all of them alike:

  first token  generate one new token: prefill of the prompt + one step + call overhead
  EOS run      up to --max-new-tokens, stopping at EOS as consumers do; the tiny model's
               answers are short, so this is dominated by prefill and per-call overhead
  fixed run    exactly --max-new-tokens on every engine, EOS suppressed (HF min_new_tokens,
               genai min_length, EOS logit masked in the fallback): decode throughput

tokens/s = generated tokens (EOS included) / wall time of the calls, prefill included.
Greedy token agreement vs PyTorch is position-wise, as in `export.check_parity`: matching
positions / max(len(pytorch), len(bundle)) per prompt, summed over prompts; "identical" is
the share of prompts whose whole answer matches.

Threads: one for every engine (torch.set_num_threads(1), OMP_NUM_THREADS=1, ONNX Runtime
intra_op_num_threads=1 and inter_op_num_threads=1), so the comparison is fair on a loaded
machine. The bundles are patched for this after export (genai_config.json session options)
and opened without manifest verification.

Targets (issue 5), printed as PASS/MISS figures, never asserted: fp32 bundle ≥ 2× PyTorch
tokens/s; int4 bundle ≤ 0.35× the fp32 bundle's size with ≥ 95 % greedy token agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from aftertune.learners.base_model import EMBEDDED_TINY, resolve_base
from aftertune.learners.curriculum import held_out, stream
from aftertune.learners.errors import ExportError
from aftertune.learners.export import ExportSpec
from aftertune.learners.kinds.generative.export import export_bundle
from aftertune.store.consumer import Bundle
from aftertune.store.consumer.format import FORMAT_GENAI
from aftertune.store.prompt import DEFAULT_PROMPT

VARIANTS = ("fp32", "int8", "int4", "logits")
BASELINE = "pytorch"
WARMUP_PROMPTS = 4
FP32_SPEEDUP_TARGET = 2.0
INT4_SIZE_TARGET = 0.35
INT4_AGREEMENT_TARGET = 0.95


class Engine(Protocol):
    name: str

    def decode(self, ids: list[int], max_new_tokens: int, ignore_eos: bool) -> list[int]:
        """Greedy new tokens for ``ids``, the EOS included when one was generated."""
        ...


class TorchEngine:
    """PyTorch eager ``generate``, the way `export.reference_continuations` calls it."""

    name = BASELINE

    def __init__(self, model: Any, eos: int, pad: int) -> None:
        self.model, self.eos, self.pad = model, eos, pad

    def decode(self, ids: list[int], max_new_tokens: int, ignore_eos: bool) -> list[int]:
        import torch

        enc = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(
                input_ids=enc,
                attention_mask=torch.ones_like(enc),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if ignore_eos else 0,
                do_sample=False,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
            )
        return out[0, len(ids) :].tolist()


class BundleEngine:
    """A bundle as a consumer runs it; the fixed-length run needs EOS suppressed by hand."""

    def __init__(self, name: str, bundle: Bundle) -> None:
        self.name, self.bundle = name, bundle
        self.eos = int(bundle.eos_token_id) if bundle.eos_token_id is not None else -1
        self._og_model: Any = None
        if bundle.format == FORMAT_GENAI:
            import onnxruntime_genai as og

            self._og_model = og.Model(str(bundle.path))

    def decode(self, ids: list[int], max_new_tokens: int, ignore_eos: bool) -> list[int]:
        if not ignore_eos:
            out = self.bundle.generate_ids(ids, max_new_tokens)
            # generate_ids drops the EOS it generated; count it like generate's output does.
            return [*out, self.eos] if len(out) < max_new_tokens else out
        if self._og_model is not None:
            return self._genai_fixed(ids, max_new_tokens)
        return self._logits_fixed(ids, max_new_tokens)

    def _genai_fixed(self, ids: list[int], n: int) -> list[int]:
        import onnxruntime_genai as og

        params = og.GeneratorParams(self._og_model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        generator = og.Generator(self._og_model, params)
        generator.append_tokens(ids)
        out: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        return out

    def _logits_fixed(self, ids: list[int], n: int) -> list[int]:
        seq, out = list(ids), []
        for _ in range(n):
            last = self.bundle.logits(seq)[-1]
            last[self.eos] = -float("inf")
            token = int(last.argmax())
            out.append(token)
            seq.append(token)
        return out


@dataclass
class Row:
    """Everything measured for one engine; ratios are against the PyTorch row."""

    engine: str
    export_s: float | None = None
    parity_s: float | None = None
    size_bytes: int | None = None
    first_token_ms: float = 0.0  # median over prompts
    first_token_p90_ms: float = 0.0
    eos_tokens: int = 0
    eos_tokens_per_s: float = 0.0
    fixed_tokens_per_s: float = 0.0
    eos_agreement: float = 1.0
    eos_identical: float = 1.0
    fixed_agreement: float = 1.0
    fixed_identical: float = 1.0
    error: str | None = None


@dataclass
class Pass:
    seconds: dict[str, list[float]] = field(default_factory=dict)
    outputs: dict[str, list[list[int]]] = field(default_factory=dict)


def timed_pass(
    engines: list[Engine], prompt_ids: list[list[int]], max_new_tokens: int, ignore_eos: bool
) -> Pass:
    """Every engine on every prompt, interleaved; the engine order rotates per prompt."""
    result = Pass({e.name: [] for e in engines}, {e.name: [] for e in engines})
    for i, ids in enumerate(prompt_ids):
        k = i % len(engines)
        for engine in engines[k:] + engines[:k]:
            t0 = time.perf_counter()
            out = engine.decode(ids, max_new_tokens, ignore_eos)
            result.seconds[engine.name].append(time.perf_counter() - t0)
            result.outputs[engine.name].append(out)
    return result


def agreement(ref: list[list[int]], got: list[list[int]], eos: int) -> tuple[float, float]:
    """(position-wise token agreement, share of identical answers), EOS cut as in parity."""

    def cut(ids: list[int]) -> list[int]:
        return ids[: ids.index(eos)] if eos in ids else ids

    same = total = identical = 0
    for r, g in zip(map(cut, ref), map(cut, got), strict=True):
        same += sum(a == b for a, b in zip(r, g, strict=False))
        total += max(len(r), len(g))
        identical += r == g
    return (same / total if total else 1.0), identical / len(ref)


def single_thread_bundle(path: Path) -> Bundle:
    """Open an exported bundle with ONNX Runtime limited to one intra- and inter-op thread."""
    config_path = path / "genai_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options.update(intra_op_num_threads=1, inter_op_num_threads=1)
        config_path.write_text(json.dumps(config, indent=4))
    # The patched config no longer matches the manifest's hash: skip verification.
    bundle = Bundle.open(path, verify=False)
    if bundle.format != FORMAT_GENAI:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        # Bundle takes no session options; a benchmark may swap its runtime's session for a
        # 1-thread one (the onnx-logits runtime keeps it as ``session``).
        bundle.runtime.session = ort.InferenceSession(  # type: ignore[attr-defined]
            str(path / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
    return bundle


def export_variant(
    variant: str, base: Path, staging: Path, parity_prompts: list[str], row: Row
) -> Bundle | None:
    if variant == "logits":
        spec = ExportSpec(
            method="torch", parity_prompts=len(parity_prompts), template=DEFAULT_PROMPT
        )
    else:
        spec = ExportSpec(
            method="genai",
            precision=variant,
            parity_prompts=len(parity_prompts),
            min_token_agreement=0.0,
            template=DEFAULT_PROMPT,
        )
    staging.mkdir()
    t0 = time.monotonic()
    try:
        result = export_bundle(base, staging, spec, parity_prompts, {"name": "bench", "version": 1})
    except ExportError as exc:
        row.error = str(exc)
        row.export_s = time.monotonic() - t0
        return None
    row.export_s = result.seconds["export_s"]
    row.parity_s = result.seconds["parity_s"]
    row.size_bytes = sum(entry["bytes"] for entry in result.manifest["files"].values())
    return single_thread_bundle(staging)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)  # "8.1f" -> 8
    return "-".rjust(width) if value is None else format(value, spec)


def print_table(rows: list[Row]) -> None:
    base = rows[0]
    fp32_size = next((r.size_bytes for r in rows if r.engine == "fp32"), None)
    header = (
        f"{'engine':<8} {'export s':>8} {'size KiB':>9} {'×fp32':>6} {'1st tok ms':>10} "
        f"{'×pt':>5} {'tok/s EOS':>9} {'×pt':>5} {'tok/s fixed':>11} {'×pt':>5} "
        f"{'agree EOS':>9} {'ident EOS':>9} {'agree fixed':>11} {'ident fixed':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.error:
            print(f"{r.engine:<8} export failed after {r.export_s:.1f} s: {r.error}")
            continue
        export = None if r.export_s is None else r.export_s + (r.parity_s or 0.0)
        size = None if r.size_bytes is None else r.size_bytes / 1024
        print(
            f"{r.engine:<8} {fmt(export, '8.1f')} {fmt(size, '9.0f')} "
            f"{fmt(ratio(r.size_bytes, fp32_size), '6.2f')} "
            f"{r.first_token_ms:10.2f} {fmt(ratio(r.first_token_ms, base.first_token_ms), '5.2f')} "
            f"{r.eos_tokens_per_s:9.0f} {fmt(ratio(r.eos_tokens_per_s, base.eos_tokens_per_s), '5.2f')} "
            f"{r.fixed_tokens_per_s:11.0f} "
            f"{fmt(ratio(r.fixed_tokens_per_s, base.fixed_tokens_per_s), '5.2f')} "
            f"{r.eos_agreement:9.1%} {r.eos_identical:9.1%} "
            f"{r.fixed_agreement:11.1%} {r.fixed_identical:11.1%}"
        )


def check_targets(rows: list[Row]) -> list[dict[str, Any]]:
    by = {r.engine: r for r in rows if not r.error}
    base, fp32, int4 = by.get(BASELINE), by.get("fp32"), by.get("int4")
    targets: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, ok: bool, detail: str) -> None:
        targets.append({"target": name, "measured": measured, "met": ok, "detail": detail})

    if base and fp32:
        for run in ("eos", "fixed"):
            speed = ratio(
                getattr(fp32, f"{run}_tokens_per_s"), getattr(base, f"{run}_tokens_per_s")
            )
            add(
                f"fp32 bundle tokens/s ≥ {FP32_SPEEDUP_TARGET:g}× PyTorch ({run} run)",
                speed,
                speed is not None and speed >= FP32_SPEEDUP_TARGET,
                f"{getattr(fp32, f'{run}_tokens_per_s'):.0f} vs "
                f"{getattr(base, f'{run}_tokens_per_s'):.0f} tokens/s",
            )
    if fp32 and int4:
        size = ratio(int4.size_bytes, fp32.size_bytes)
        add(
            f"int4 size ≤ {INT4_SIZE_TARGET:g}× fp32",
            size,
            size is not None and size <= INT4_SIZE_TARGET,
            f"{int4.size_bytes:,} vs {fp32.size_bytes:,} bytes",
        )
        add(
            f"int4 greedy token agreement ≥ {INT4_AGREEMENT_TARGET:.0%} (EOS run)",
            int4.eos_agreement,
            int4.eos_agreement >= INT4_AGREEMENT_TARGET,
            f"{int4.eos_identical:.1%} of prompts identical",
        )
    for t in targets:
        shown = fmt(t["measured"], ".3f")
        print(f"{'PASS' if t['met'] else 'MISS'}  {t['target']}: {shown} ({t['detail']})")
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=64, help="curriculum-stream prompts")
    parser.add_argument(
        "--held-out-per-task", type=int, default=2, help="held-out prompts per curriculum task"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"bundles to export, of {VARIANTS}"
    )
    parser.add_argument(
        "--parity-prompts", type=int, default=8, help="prompts of export_bundle's own check"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads, also for the builder
    import onnxruntime
    import onnxruntime_genai
    import torch

    from aftertune.learners.base_model import load_base

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    started, load_at_start = time.monotonic(), os.getloadavg()[0]
    prompts = [e.prompt for e in islice(stream(args.seed), args.prompts)]
    prompts += [e.prompt for e in held_out(args.seed, args.held_out_per_task)]
    base_dir = resolve_base(EMBEDDED_TINY)
    model, tokenizer = load_base(base_dir, dtype=torch.float32)
    engines: list[Engine] = [TorchEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id)]
    rows = [Row(BASELINE)]
    with tempfile.TemporaryDirectory(prefix="aftertune-runtime-") as tmp:
        for variant in variants:
            row = Row(variant)
            rows.append(row)
            bundle = export_variant(
                variant, base_dir, Path(tmp) / variant, prompts[: args.parity_prompts], row
            )
            shown = f"{row.export_s:.1f} s + parity {row.parity_s or 0:.1f} s"
            print(f"export {variant}: {shown}" + (f" FAILED: {row.error}" if row.error else ""))
            if bundle is not None:
                engines.append(BundleEngine(variant, bundle))
        # Every engine encodes the same way (byte-level); one encoding feeds them all.
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        n = args.max_new_tokens
        for ignore_eos in (False, True):  # warm-up: sessions, allocators, HF generate setup
            timed_pass(engines, prompt_ids[:WARMUP_PROMPTS], n, ignore_eos)
        first = timed_pass(engines, prompt_ids, 1, ignore_eos=False)
        eos_run = timed_pass(engines, prompt_ids, n, ignore_eos=False)
        fixed = timed_pass(engines, prompt_ids, n, ignore_eos=True)

    eos = tokenizer.eos_token_id
    for row in rows:
        if row.error:
            continue
        name = row.engine
        ms = sorted(1000 * s for s in first.seconds[name])
        row.first_token_ms = statistics.median(ms)
        row.first_token_p90_ms = ms[int(0.9 * (len(ms) - 1))]
        row.eos_tokens = sum(len(o) for o in eos_run.outputs[name])
        row.eos_tokens_per_s = row.eos_tokens / sum(eos_run.seconds[name])
        fixed_tokens = sum(len(o) for o in fixed.outputs[name])
        row.fixed_tokens_per_s = fixed_tokens / sum(fixed.seconds[name])
        row.eos_agreement, row.eos_identical = agreement(
            eos_run.outputs[BASELINE], eos_run.outputs[name], eos
        )
        row.fixed_agreement, row.fixed_identical = agreement(
            fixed.outputs[BASELINE], fixed.outputs[name], eos
        )

    machine = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],  # start, end
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_genai": onnxruntime_genai.__version__,
    }
    print(
        f"\nmachine: {machine['machine']}, {machine['cpus']} CPUs, load average (1 min) "
        f"{load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at the end"
        f", python {machine['python']}, torch {machine['torch']}, onnxruntime "
        f"{machine['onnxruntime']}, onnxruntime-genai {machine['onnxruntime_genai']}"
    )
    print(
        "threads: 1 everywhere (torch.set_num_threads(1), OMP_NUM_THREADS="
        f"{os.environ['OMP_NUM_THREADS']}, ORT intra_op/inter_op 1)"
    )
    print(
        f"prompts: {len(prompts)} ({args.prompts} curriculum stream seed {args.seed} + "
        f"{len(prompts) - args.prompts} held-out), greedy, batch 1, max_new_tokens {n}; "
        f"EOS run: PyTorch generated {rows[0].eos_tokens} tokens "
        f"({rows[0].eos_tokens / len(prompts):.1f} a prompt, EOS included)\n"
    )
    print_table(rows)
    print("×pt: ratio to PyTorch (tokens/s: higher is better; first-token ms: lower is better)")
    print("sizes: sum of the files in each bundle's manifest; export s includes its parity check\n")
    targets = check_targets(rows)
    wall = time.monotonic() - started
    print(f"\nwall time: {wall:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "settings": {**vars(args), "json": str(args.json), "threads": 1},
                    "prompts": len(prompts),
                    "rows": [asdict(r) for r in rows],
                    "targets": targets,
                    "wall_s": round(wall, 1),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
