"""Continual-learning benchmark: naive / replay / EWC / replay+EWC / joint on a task sequence.

Every strategy starts from the same base and gets the same budget. A sequential strategy
trains one fresh LoRA adapter per task on the current champion, merges it (the champion
chain the daemon builds), then evaluates on every task's test set, which fills row i of the
accuracy matrix R (R[i][j] = score on task j after training task i; points 0-100: accuracy
for label tasks, token F1 x 100 for free text). "joint" trains once on the union with the
whole sequence's step budget: the upper bound the others are measured against.

Every setting is the daemon's (``load_settings()``: the shipped defaults, ``AFTERTUNE_CONFIG``
and the environment) unless a flag changes it; ``--device`` defaults to cpu, so figures do
not depend on whether the machine has a GPU (CUDA trains with bf16 autocast).

    python bench/continual.py --data /tmp/learnable --tasks parity,vowel_end,last_digit,last_letter \\
        --strategies naive,replay,ewc,replay+ewc,joint --json /tmp/continual.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from aftertune.daemon.settings import load_settings
from aftertune.daemon.specs import LearningSpecs, specs_from
from aftertune.learners.evaluate import TaskScore, task_kind
from aftertune.learners.forgetting import continual_metrics
from aftertune.learners.replay import sample_past
from aftertune.store.examples import Example, ExampleStore
from aftertune.store.records import record_from_obj

log = logging.getLogger("bench.continual")

# The real-task samples shipped with the repository (see data/README.md).
DATA = Path(__file__).resolve().parent / "data"

STRATEGIES = ("naive", "replay", "ewc", "replay+ewc", "joint")


@dataclass(frozen=True)
class Suite:
    """A task sequence with its train/test examples and label sets (None: free text)."""

    tasks: tuple[str, ...]
    train: dict[str, list[Example]]
    test: dict[str, list[Example]]
    labels: dict[str, set[str] | None]


@dataclass(frozen=True)
class BenchConfig:
    """The knobs every strategy shares (one budget for all); ``of`` takes the daemon's."""

    # The budget is passes over each task's new examples, as the daemon's ``train.epochs``:
    # replayed examples ride along in the batches (more compute, not less new data), and
    # joint makes the same passes over the union. ``steps`` instead fixes optimizer steps per
    # task (joint: steps x number of tasks), which gives replay half the new data at ratio 1.
    epochs: int
    steps: int | None
    lr: float
    r: int
    batch_size: int
    replay_ratio: float
    replay_cap: int
    ewc_lambda: float  # our λ/2·ΣFΔW² convention (avalanche ewc_lambda = λ/2)
    ewc_decay: float
    fisher_samples: int
    max_length: int
    seed: int
    eval_batch_size: int
    max_new_tokens: int
    device: str  # "cuda" trains with bf16 autocast (the recipe's choice): not CPU-identical

    @classmethod
    def of(cls, specs: LearningSpecs, device: str = "cpu") -> BenchConfig:
        """The daemon's values for every knob (``device`` aside: see the module docstring)."""
        train, replay, ewc = specs.train, specs.replay, specs.ewc
        return cls(
            epochs=train.epochs,
            steps=train.max_steps,
            lr=train.lr,
            r=specs.lora.r,
            batch_size=train.batch_size,
            replay_ratio=replay.ratio,
            replay_cap=replay.cap,
            ewc_lambda=ewc.lam,
            ewc_decay=ewc.decay,
            fisher_samples=ewc.fisher_samples,
            max_length=train.max_length,
            seed=train.seed,
            eval_batch_size=specs.eval.batch_size,
            max_new_tokens=specs.eval.max_new_tokens,
            device=device,
        )


@dataclass
class StrategyResult:
    name: str
    matrix: list[list[float]] = field(default_factory=list)  # points
    valid: list[list[float | None]] = field(default_factory=list)  # points, label tasks only
    nll: list[list[float]] = field(default_factory=list)  # nats per answer token
    base: dict[str, float] = field(default_factory=dict)  # score of the untouched base, points
    base_nll: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0  # tokens trained on, all cycles
    train_seconds: float = 0.0
    fisher_seconds: float = 0.0
    cycle_seconds: float = 0.0  # train_adapter + merge, all cycles
    eval_seconds: float = 0.0
    steps: int = 0

    def summary(self, n_tasks: int) -> dict[str, Any]:
        sequential = len(self.matrix) == n_tasks
        metrics = continual_metrics(self.matrix) if sequential else None
        last = self.matrix[-1]
        old = range(n_tasks - 1) if sequential else range(0)
        return {
            "matrix": self.matrix,
            "aa": metrics.aa if metrics else sum(last) / len(last),
            # BWT needs one row per task: undefined for joint (one training, one row).
            "bwt": metrics.bwt if metrics else None,
            "forgetting": list(metrics.forgetting) if metrics else None,
            "valid": self.valid,
            "nll": self.nll,
            "valid_old": _mean([self.valid[-1][j] for j in old]),
            "valid_old_min": _min(
                [self.valid[i][j] for i in range(len(self.valid)) for j in old if j < i]
            ),
            "nll_increase_old": _mean([self.nll[-1][j] - self.nll[j][j] for j in old]),
            "base_score": self.base,
            "base_nll": self.base_nll,
            "tokens_per_s": self.tokens / self.train_seconds if self.train_seconds else 0.0,
            "fisher_share": self.fisher_seconds / self.cycle_seconds if self.cycle_seconds else 0.0,
            "fisher_seconds": self.fisher_seconds,
            "cycle_seconds": self.cycle_seconds,
            "eval_seconds": self.eval_seconds,
            "steps": self.steps,
        }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _min(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return min(kept) if kept else None


# --- data ---------------------------------------------------------------------------------


def _read_examples(path: Path, split: str, limit: int | None) -> list[Example]:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; generate it with bench/tasks.py --out {path.parent}"
        )
    out: list[Example] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            record = record_from_obj({**row, "split": split})
            out.append(
                Example(
                    seq=len(out) + 1,
                    id=record.id,
                    task=record.task,
                    instruction=record.instruction,
                    input=record.input,
                    output=record.output,
                    split=split,
                )
            )
            if limit is not None and len(out) >= limit:
                break  # the files are already shuffled: a prefix is a fair sample
    return out


def load_suite(data: Path, tasks: list[str], max_train: int | None, max_test: int | None) -> Suite:
    """Read ``<task>.train.jsonl`` / ``.test.jsonl``; label sets from manifest.json or train data."""
    manifest: dict[str, Any] = {}
    if (data / "manifest.json").exists():
        manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
    train = {t: _read_examples(data / f"{t}.train.jsonl", "train", max_train) for t in tasks}
    test = {t: _read_examples(data / f"{t}.test.jsonl", "test", max_test) for t in tasks}
    labels: dict[str, set[str] | None] = {}
    for t in tasks:
        listed = manifest.get(t, {}).get("labels")
        if listed:
            labels[t] = set(listed)
        else:
            # Full train file, not the capped prefix: the label set must not depend on --max-train.
            outputs = [e.output for e in _read_examples(data / f"{t}.train.jsonl", "train", None)]
            labels[t] = task_kind(outputs)[1]
    return Suite(tuple(tasks), train, test, labels)


# --- one strategy ----------------------------------------------------------------------------


def _specs(
    cfg: BenchConfig,
    daemon: LearningSpecs,
    *,
    steps: int | None,
    replay: bool,
    ewc: bool,
    seed: int,
) -> dict[str, Any]:
    """``train_adapter``'s specs: the daemon's, with the bench's knobs and this strategy's."""
    train = replace(
        daemon.train,
        lr=cfg.lr,
        max_steps=steps,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=seed,
        max_length=cfg.max_length,
        device=cfg.device,
        progress=False,
    )
    lora = daemon.lora if cfg.r == daemon.lora.r else replace(daemon.lora, r=cfg.r, alpha=None)
    return {
        "train": train,
        "lora": lora,
        "replay": replace(
            daemon.replay, ratio=cfg.replay_ratio, cap=cfg.replay_cap, enabled=replay
        ),
        "ewc": replace(
            daemon.ewc,
            lam=cfg.ewc_lambda,
            decay=cfg.ewc_decay,
            fisher_samples=cfg.fisher_samples,
            enabled=ewc,
        ),
    }


def _train_and_merge(
    model: Any,
    tokenizer: Any,
    new: list[Example],
    past: list[Example],
    specs: dict[str, Any],
    workdir: Path,
    cycle: int,
    result: StrategyResult,
) -> Any:
    """One cycle: a fresh adapter on the champion, merged in; timings go into ``result``."""
    from peft import PeftModel

    from aftertune.learners.recipe import TrainJob, train_adapter

    start = time.perf_counter()
    knobs = {k: v for k, v in specs.items() if k != "objective"}
    job = TrainJob.of(
        new,
        past,
        **knobs,
        fisher_path=workdir / "fisher.safetensors",
        out_dir=workdir / f"adapter-{cycle}",
    )
    trained = train_adapter(model, tokenizer, job, objective=specs["objective"])
    merged = PeftModel.from_pretrained(model, str(trained.adapter_dir)).merge_and_unload()
    # peft leaves its config on the unwrapped model; the next cycle's fresh adapter must not
    # find it (same cleanup as lora.detach_adapter).
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(merged):  # instance attributes only; the class may define defaults
            delattr(merged, attr)
    result.cycle_seconds += time.perf_counter() - start
    result.train_seconds += trained.train_seconds
    result.fisher_seconds += trained.fisher_seconds
    result.tokens += trained.tokens_per_s * trained.train_seconds
    result.steps += trained.steps
    log.info(
        "%s cycle %d: %d steps, loss %.3f -> %.3f, ewc %.3g, %.0f tok/s, fisher %.1fs, train %.1fs",
        result.name,
        cycle,
        trained.steps,
        trained.loss_first,
        trained.loss_last,
        trained.ewc_penalty_last,
        trained.tokens_per_s,
        trained.fisher_seconds,
        trained.train_seconds,
    )
    return merged


def _prime_fisher(
    model: Any,
    tokenizer: Any,
    past: list[Example],
    cfg: BenchConfig,
    targets: tuple[str, ...],
    fisher_path: Path,
    result: StrategyResult,
    objective: Any,
) -> None:
    """EWC without replay: estimate the champion's Fisher on stored past examples ourselves.

    The recipe estimates the Fisher on its capped replay pool, which is empty when replay is
    disabled; with the online Fisher file already holding this champion, it reuses ours.
    """
    from aftertune.learners.ewc import target_weights, update_online_fisher, weights_fingerprint
    from aftertune.learners.kinds.generative.fisher import estimate_fisher

    start = time.perf_counter()
    stride = max(1, len(past) // cfg.fisher_samples)
    samples = past[::stride][: cfg.fisher_samples]
    if objective.peft_task_type == "CAUSAL_LM":
        fresh = estimate_fisher(
            model, tokenizer, samples, targets, batch_size=1, max_length=cfg.max_length
        )
    else:
        device = next(model.parameters()).device
        fresh = objective.fisher(
            model, tokenizer, samples, targets, max_length=cfg.max_length, device=device
        )
    champion = weights_fingerprint(target_weights(model, targets))
    update_online_fisher(fisher_path, fresh, cfg.ewc_decay, champion=champion)
    seconds = time.perf_counter() - start
    result.fisher_seconds += seconds
    result.cycle_seconds += seconds


def _record_row(
    result: StrategyResult, scores: dict[str, TaskScore], tasks: tuple[str, ...]
) -> None:
    result.matrix.append([100 * scores[t].score for t in tasks])
    result.valid.append([None if scores[t].valid is None else 100 * scores[t].valid for t in tasks])
    result.nll.append([scores[t].nll for t in tasks])


def run_strategy(
    name: str, suite: Suite, cfg: BenchConfig, daemon: LearningSpecs, workdir: Path
) -> StrategyResult:
    """Train ``name`` over the suite from a freshly loaded base; evaluate after every task."""
    import torch

    from aftertune.learners.base_model import load_base

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_base(daemon.base, device=cfg.device)
    run = _Strategy(StrategyResult(name), suite, cfg, daemon, workdir, tokenizer)
    base_scores = run.evaluate(model)
    run.result.base = {t: 100 * s.score for t, s in base_scores.items()}
    run.result.base_nll = {t: s.nll for t, s in base_scores.items()}
    if name == "joint":
        run.joint(model)
    else:
        run.sequential(model, replay=name in ("replay", "replay+ewc"), ewc="ewc" in name)
    return run.result


@dataclass
class _Strategy:
    """One strategy's run: its cycles, evaluated after each, recorded in ``result``."""

    result: StrategyResult
    suite: Suite
    cfg: BenchConfig
    daemon: LearningSpecs
    workdir: Path
    tokenizer: Any

    def evaluate(self, model: Any) -> dict[str, TaskScore]:
        """The daemon's scoring path for the base's model kind, with the bench's knobs."""
        start = time.perf_counter()
        cfg = self.cfg
        specs = replace(
            self.daemon,
            eval=replace(
                self.daemon.eval,
                batch_size=cfg.eval_batch_size,
                max_new_tokens=cfg.max_new_tokens,
                max_length=cfg.max_length,
            ),
            train=replace(self.daemon.train, max_length=cfg.max_length),
        )
        scores = self.kind.score(model, self.tokenizer, self.suite.test, self.sets, specs)
        self.result.eval_seconds += time.perf_counter() - start
        return scores

    @property
    def kind(self) -> Any:
        from aftertune.learners.kinds import kind_for

        return kind_for(self.daemon.base)

    @property
    def sets(self) -> dict[str, Any]:
        """What answers are judged against: label sets, or a ranking task's candidates."""
        if self.kind.name != "ranking":
            return dict(self.suite.labels)
        from aftertune.learners.kinds.ranking.candidates import answer_set, candidates_of

        cap, k = self.daemon.ranking.max_candidates, self.daemon.ranking.exemplars
        template = self.daemon.train.template
        sets: dict[str, Any] = {}
        for t in self.suite.tasks:
            train = self.suite.train[t]
            found = candidates_of([e.output for e in train], cap)
            n = k * len(found or ())
            drawn = random.Random(f"exemplars:{t}").sample(train, min(n, len(train)))
            sets[t] = answer_set(found, drawn, template) if found else None
        return sets

    @property
    def objective(self) -> Any:
        """The kind's training loss (a ranking objective knows every task's candidates)."""
        specs = replace(
            self.daemon, train=replace(self.daemon.train, max_length=self.cfg.max_length)
        )
        return self.kind.objective(self.tokenizer, self.sets, specs)

    def joint(self, model: Any) -> None:
        """One training on the union, with the whole sequence's budget."""
        cfg, suite = self.cfg, self.suite
        union = [ex for t in suite.tasks for ex in suite.train[t]]
        steps = cfg.steps * len(suite.tasks) if cfg.steps else None
        specs = _specs(cfg, self.daemon, steps=steps, replay=False, ewc=False, seed=cfg.seed)
        specs["objective"] = self.objective
        model = _train_and_merge(
            model, self.tokenizer, union, [], specs, self.workdir, 0, self.result
        )
        _record_row(self.result, self.evaluate(model), suite.tasks)

    def sequential(self, model: Any, *, replay: bool, ewc: bool) -> None:
        """One cycle per task on the current champion; the past lives in a real example store,
        sampled task-balanced as the daemon does it."""
        cfg, suite = self.cfg, self.suite
        with ExampleStore(self.workdir / "examples.sqlite3") as store:
            for i, task in enumerate(suite.tasks):
                # EWC-only still needs past examples: the Fisher is estimated on them.
                wanted = replay or ewc
                past = (
                    sample_past(store, cfg.replay_cap, cfg.seed + i, store.max_seq())
                    if wanted
                    else []
                )
                specs = _specs(
                    cfg,
                    self.daemon,
                    steps=cfg.steps,
                    replay=replay,
                    ewc=ewc and bool(past),
                    seed=cfg.seed + i,
                )
                specs["objective"] = objective = self.objective
                if ewc and not replay and past:
                    targets = self.daemon.lora.target_modules
                    fisher = self.workdir / "fisher.safetensors"
                    _prime_fisher(
                        model, self.tokenizer, past, cfg, targets, fisher, self.result, objective
                    )
                model = _train_and_merge(
                    model,
                    self.tokenizer,
                    suite.train[task],
                    past,
                    specs,
                    self.workdir,
                    i,
                    self.result,
                )
                store.add([_train_record(e) for e in suite.train[task]])
                _record_row(self.result, self.evaluate(model), suite.tasks)
                row = " ".join(f"{v:5.1f}" for v in self.result.matrix[-1])
                log.info("%s after %s: %s", self.result.name, task, row)


def _train_record(example: Example) -> Any:
    fields = ("task", "instruction", "input", "output")
    return record_from_obj({**{f: getattr(example, f) for f in fields}, "split": "train"})


# --- report -----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = "6.1f") -> str:
    return "     -" if value is None else format(value, spec)


def print_report(suite: Suite, results: dict[str, dict[str, Any]], cfg: BenchConfig) -> None:
    tasks = suite.tasks
    budget = f"{cfg.steps} steps/task" if cfg.steps else f"{cfg.epochs} epochs/task"
    print(
        f"\ntasks: {', '.join(tasks)}; {budget}, lr {cfg.lr}, r {cfg.r}, "
        f"replay ratio {cfg.replay_ratio}, EWC lambda {cfg.ewc_lambda}"
    )
    for name, res in results.items():
        print(f"\n[{name}] R[i][j] (points; rows: after training task i)")
        print("  after        " + " ".join(f"{t[:10]:>10}" for t in tasks))
        print("  base         " + " ".join(f"{res['base_score'][t]:10.1f}" for t in tasks))
        rows = tasks if len(res["matrix"]) == len(tasks) else ("union",)
        for label, row in zip(rows, res["matrix"], strict=True):
            print(f"  {label[:12]:<12} " + " ".join(f"{v:10.1f}" for v in row))
    print("\nstrategy      AA     BWT  valid_old  dNLL_old  tok/s  fisher%  cycle_s  eval_s")
    for name, res in results.items():
        print(
            f"{name:<11} {res['aa']:6.1f} {_fmt(res['bwt'])} {_fmt(res['valid_old'], '10.1f')}"
            f" {_fmt(res['nll_increase_old'], '9.3f')} {res['tokens_per_s']:6.0f}"
            f" {100 * res['fisher_share']:7.1f}% {res['cycle_seconds']:8.1f} {res['eval_seconds']:7.1f}"
        )


def markdown_report(payload: dict[str, Any]) -> str:
    """The results as Markdown tables (for docs/benchmarks.md)."""
    tasks = payload["tasks"]
    lines = [
        "| strategy | AA | BWT | valid (old tasks, final) | min valid (old tasks) "
        "| ΔNLL (old tasks) | tokens/s | Fisher share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in payload["strategies"].items():
        cells = [
            _fmt(res["aa"], ".1f"),
            _fmt(res["bwt"], ".1f"),
            _fmt(res["valid_old"], ".1f"),
            _fmt(res["valid_old_min"], ".1f"),
            _fmt(res["nll_increase_old"], ".3f"),
            f"{res['tokens_per_s']:.0f}",
            f"{100 * res['fisher_share']:.1f} %",
        ]
        lines.append(f"| {name} | " + " | ".join(c.strip() for c in cells) + " |")
    for name, res in payload["strategies"].items():
        lines += ["", f"R for **{name}** (points; row = after training that task):", ""]
        lines += ["| after \\ on | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        lines.append(
            "| (base) | " + " | ".join(f"{res['base_score'][t]:.1f}" for t in tasks) + " |"
        )
        rows = tasks if len(res["matrix"]) == len(tasks) else ["all (joint)"]
        for label, row, nll in zip(rows, res["matrix"], res["nll"], strict=True):
            cells = [f"{v:.1f} ({n:.2f})" for v, n in zip(row, nll, strict=True)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser(defaults: BenchConfig, base: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", type=Path, default=DATA, help="folder of <task>.train/.test.jsonl (bench/data)"
    )
    p.add_argument("--tasks", required=True, help="comma-separated, in training order")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument(
        "--base", default=base, help="embedded:tiny, embedded:minilm or a local HF model dir"
    )
    p.add_argument("--max-train", type=int, default=None, help="train examples per task")
    p.add_argument("--max-test", type=int, default=None, help="test examples per task")
    p.add_argument(
        "--epochs",
        type=_positive,
        default=defaults.epochs,
        help="the budget: passes over each task's train examples (replay rides along; joint"
        " makes as many passes over the union)",
    )
    p.add_argument(
        "--steps",
        type=_positive,
        default=defaults.steps,
        help="instead of --epochs: optimizer steps per task, every strategy (joint: x tasks)",
    )
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--r", type=int, default=defaults.r, help="LoRA rank")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--replay-ratio", type=float, default=defaults.replay_ratio)
    p.add_argument("--ewc-lambda", type=float, default=defaults.ewc_lambda)
    p.add_argument("--fisher-samples", type=int, default=defaults.fisher_samples)
    p.add_argument("--max-length", type=int, default=defaults.max_length)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device, help="cpu or cuda")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--markdown", type=Path, default=None, help="write Markdown tables here")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 unless the machine is otherwise idle (oversubscribed"
        " OpenMP threads spin and ran ~10x slower on a loaded 2-core box)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    # --base first: the model kind decides what an unset train.lr / train.epochs mean.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--base", default=None)
    chosen = early.parse_known_args(argv)[0].base
    settings = load_settings()
    if chosen is not None:
        settings = settings.model_copy(
            update={"model": settings.model.model_copy(update={"base": chosen})}
        )
    daemon = specs_from(settings)
    defaults = BenchConfig.of(daemon)
    args = _parser(defaults, daemon.base).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        print(
            f"error: unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}",
            file=sys.stderr,
        )
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    flags = {f: getattr(args, f) for f in BenchConfig.__dataclass_fields__ if hasattr(args, f)}
    cfg = replace(defaults, **flags)
    try:
        suite = load_suite(args.data, tasks, args.max_train, args.max_test)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    payload = _run_all(strategies, suite, cfg, replace(daemon, base=args.base), args.threads)
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(markdown_report(payload), encoding="utf-8")
    return 0


def _run_all(
    strategies: list[str], suite: Suite, cfg: BenchConfig, daemon: LearningSpecs, threads: int
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for name in strategies:
        with tempfile.TemporaryDirectory(prefix=f"continual-{name.replace('+', '_')}-") as tmp:
            result = run_strategy(name, suite, cfg, daemon, Path(tmp))
            results[name] = result.summary(len(suite.tasks))
    wall = time.perf_counter() - started
    print_report(suite, results, cfg)
    print(f"\nwall time: {wall:.0f} s")
    return {
        "tasks": list(suite.tasks),
        "config": asdict(cfg),
        "wall_seconds": wall,
        "threads": threads,
        "strategies": results,
    }


if __name__ == "__main__":
    sys.exit(main())
