"""Answer-server benchmark: `aftertune answer-server` against raw ONNX Runtime on the same
bundle, in one run, and failed requests across swaps under load.

    .venv/bin/python bench/answer_server.py [--bundle DIR | --kind generative|ranking]
        [--clients 4] [--seconds 5] [--rounds 1] [--batch 16] [--swaps 10] [--scale 1]
        [--server-args "OPTIONS"] [--json FILE]

--bundle: a published bundle (any format); without it a bundle of --kind is exported into a
temporary directory first: generative, the embedded tiny base (genai, fp32; with --scale N,
its architecture N times as wide with random weights, for a bigger model's cost); ranking, the
frozen embedded MiniLM (onnx-ranking) with agnews's four answers, each anchored on the
prototype of its bench/data train prompts. A task of the bundle that bench/data holds is
asked with that task's test records (real text), any other with short made-up inputs. The
bundle is installed as v1 of a temporary state dir and pulled (the verified pull) into a
consumer dir, whose `current` the server answers from; the server runs as its own process
(`python -m aftertune.daemon.cli answer-server` with --server-args), the clients are threads
here, one keep-alive connection each.

  raw single    --clients threads calling `Bundle.answer` on one record each, in process
  server single --clients threads POSTing one record to /v1/answer
  raw batch     the same with `Bundle.answer_many` on --batch records per call
  server batch  POST {"records": [--batch records]}
  swaps         --clients threads POST single records while the bundle is republished as
                v2..v(1+--swaps) and pulled into the consumer dir, one swap at a time (each
                waits until the server answers with the new version); every non-200 answer
                or connection error is a failed request

Each phase runs --seconds, and the four phases --rounds times in turn (a change in the
machine's load then falls on raw and server alike). Records/s; CPU ms per record (raw: this
process; server: the server's process, and this process's as its clients); the server's
p50/p99 latency per request (client side, HTTP included). Targets (issue 26), printed, never
asserted: server ≥ 0.8× raw, single and batch; 0 failed requests across the swaps.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aftertune.daemon.embedded_redis import free_port
from aftertune.store.bundles import install, new_staging_dir, set_latest
from aftertune.store.consumer import Bundle
from aftertune.store.consumer.format import MANIFEST, read_manifest, write_manifest
from aftertune.store.consumer.pull import DirSource, pull

DATA = Path(__file__).resolve().parent / "data"  # the real-task samples (data/README.md)
RANKING_TASK = "agnews"  # the task of --kind ranking's bundle

WORDS = [
    "parcel",
    "refund",
    "order",
    "late",
    "broken",
    "card",
    "account",
    "password",
    "delivery",
    "invoice",
]


def read_records(task: str, split: str) -> list[dict[str, Any]]:
    lines = (DATA / f"{task}.{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def questions(bundle: Bundle, n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    tasks = sorted(bundle.candidates) or [None]
    real = [t for t in tasks if t is not None and (DATA / f"{t}.test.jsonl").is_file()]
    if real:
        rows = [r for t in real for r in read_records(t, "test")]
        return [
            {"task": r["task"], "instruction": r["instruction"], "input": r.get("input", "")}
            for r in (rng.choice(rows) for _ in range(n))
        ]
    return [
        {
            "task": rng.choice(tasks),
            "instruction": "Answer the request.",
            "input": " ".join(rng.choices(WORDS, k=rng.randint(3, 12))),
        }
        for _ in range(n)
    ]


def publish(state: Path, source: Path, version: int) -> None:
    """``source``'s files as ``version`` of ``state``, made latest: a promotion."""
    bundles = state / "bundles"
    staging = new_staging_dir(bundles, version)
    for path in source.iterdir():
        if path.name != MANIFEST:
            shutil.copy2(path, staging / path.name)
    fields = {
        k: v for k, v in read_manifest(source).items() if k not in ("schema", "created_at", "files")
    }
    write_manifest(staging, {**fields, "version": version})
    install(staging, bundles, version)
    set_latest(bundles, version)


def widened_tiny(out: Path, scale: int) -> Path:
    """The tiny base's architecture ``scale`` times as wide (hidden size, MLP, heads), with
    random weights and the tiny's byte tokenizer: the cost of a bigger model per token, not
    its answers (random weights rarely stop early, so most answers run to ANSWER_TOKENS)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aftertune.learners.base_model import EMBEDDED_TINY, resolve_base

    tiny = resolve_base(EMBEDDED_TINY)
    config = AutoConfig.from_pretrained(tiny)
    config.hidden_size *= scale
    config.intermediate_size *= scale
    config.num_attention_heads *= scale
    config.num_key_value_heads *= scale
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy2(tiny / name, out / name)
    return out


def export_tiny(out: Path, scale: int = 1) -> Path:
    from aftertune.daemon.specs import default_specs
    from aftertune.learners.base_model import EMBEDDED_TINY, resolve_base
    from aftertune.learners.curriculum import sample
    from aftertune.learners.kinds.generative.export import export_bundle

    rng = random.Random(11)
    base = resolve_base(EMBEDDED_TINY) if scale == 1 else widened_tiny(out.parent / "base", scale)
    export_bundle(
        base,
        out,
        replace(default_specs().export, method="genai", parity_prompts=4),
        [sample(rng).prompt for _ in range(4)],
        {"name": "aftertune", "version": 1},
    )
    return out


def export_minilm(out: Path) -> Path:
    """The frozen embedded MiniLM as an onnx-ranking bundle answering RANKING_TASK."""
    from aftertune.daemon.specs import default_specs
    from aftertune.learners.base_model import EMBEDDED_MINILM, resolve_base
    from aftertune.learners.kinds.ranking.candidates import AnswerSet
    from aftertune.learners.kinds.ranking.export import export_ranking

    specs = default_specs()
    if specs.export is None:
        raise SystemExit("export is disabled in this environment (AFTERTUNE_EXPORT__ENABLED)")
    train = read_records(RANKING_TASK, "train")
    exemplars: dict[str, list[str]] = {}
    for r in train:
        prompt = specs.export.template.render(r["instruction"], r.get("input", ""))
        exemplars.setdefault(r["output"].strip(), []).append(prompt)
    prompts = [
        (RANKING_TASK, specs.export.template.render(r["instruction"], r.get("input", "")))
        for r in read_records(RANKING_TASK, "test")[:8]
    ]
    out.mkdir(parents=True)
    export_ranking(
        resolve_base(EMBEDDED_MINILM),
        out,
        replace(specs.export, parity_prompts=len(prompts)),
        max_length=specs.train.max_length,
        candidates={RANKING_TASK: AnswerSet(sorted(exemplars), exemplars)},
        prompts=prompts,
        manifest_fields={"name": "aftertune", "version": 1},
    )
    return out


def run_threads(clients: int, seconds: float, work: Callable[[int], int]) -> tuple[int, float]:
    """``clients`` threads calling ``work(n)`` (records done) until ``seconds`` pass."""
    total = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def loop(n: int) -> None:
        nonlocal total
        done = 0
        while time.monotonic() < deadline:
            done += work(n)
        with lock:
            total += done

    started = time.monotonic()
    threads = [threading.Thread(target=loop, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total, time.monotonic() - started


class Client:
    """One keep-alive connection to the answer server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def reconnect(self) -> None:
        self.conn.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def post(self, body: Any) -> tuple[int, Any]:
        data = json.dumps(body)
        try:
            self.conn.request("POST", "/v1/answer", data, {"Content-Type": "application/json"})
            response = self.conn.getresponse()
            return response.status, json.loads(response.read())
        except (OSError, http.client.HTTPException):
            self.reconnect()
            raise


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--kind", choices=("generative", "ranking"), default="generative")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--server-args", default="", help="more answer-server options")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument(
        "--scale",
        type=int,
        default=1,
        help="generative: the tiny base this many times as wide, random weights (a bigger "
        "model's cost per answer)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-answer-"))
    try:
        if args.bundle is not None:
            source = args.bundle
        elif args.kind == "ranking":
            source = export_minilm(work / "exported")
        else:
            source = export_tiny(work / "exported", args.scale)
        state = work / "state"
        publish(state, Path(source), 1)
        consumer = work / "consumer"
        pull(DirSource(state), consumer)
        results = measure(args, state, consumer)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def measure(args: argparse.Namespace, state: Path, consumer: Path) -> dict[str, Any]:
    bundle = Bundle.open(consumer / "current")
    asked = questions(bundle, 512)
    batch = [asked[i : i + args.batch] for i in range(0, len(asked), args.batch)]
    as_tuple = [(q["task"], q["instruction"], q["input"]) for q in asked]
    results: dict[str, Any] = {
        "bundle_format": bundle.format,
        "scale": args.scale,
        "clients": args.clients,
        "batch": args.batch,
        "seconds_per_phase": args.seconds,
        "rounds": args.rounds,
        "server_args": args.server_args,
        "cpus": os.cpu_count(),
    }

    def raw_single(n: int) -> int:
        bundle.answer(*as_tuple[random.randrange(len(as_tuple))])
        return 1

    def raw_batch(n: int) -> int:
        chunk = as_tuple[: args.batch]
        bundle.answer_many(chunk, args.batch)
        return len(chunk)

    port = free_port()
    env = {
        **os.environ,
        "AFTERTUNE_STATE_DIR": str(state.parent / "s"),
        "AFTERTUNE_ANSWER_TOKEN": "",
    }
    env.pop("AFTERTUNE_REDIS__URL", None)
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "aftertune.daemon.cli", "answer-server"),
            *("--bundle", str(consumer / "current"), "--port", str(port)),
            *("--max-batch", str(args.batch), "--log-level", "WARNING"),
            *shlex.split(args.server_args),
        ],
        env=env,
    )
    try:
        clients = wait_up(port, args.clients)
        latencies: dict[str, list[float]] = {"single": [], "batch": []}
        failures = {"single": 0, "batch": 0}

        def server_call(kind: str, body: Callable[[], Any], records: int) -> Callable[[int], int]:
            def call(n: int) -> int:
                started = time.perf_counter()
                try:
                    code, _ = clients[n].post(body())
                except (OSError, http.client.HTTPException):
                    code = 0
                latencies[kind].append(time.perf_counter() - started)
                if code != 200:
                    failures[kind] += 1
                    return 0
                return records

            return call

        phases = {
            "raw_single": raw_single,
            "server_single": server_call("single", lambda: random.choice(asked), 1),
            "raw_batch": raw_batch,
            "server_batch": server_call("batch", lambda: {"records": batch[0]}, args.batch),
        }
        # records, seconds, CPU seconds of this process, CPU seconds of the server
        totals = {name: [0.0, 0.0, 0.0, 0.0] for name in phases}
        for _ in range(args.rounds):  # interleaved, so a change in the machine's load hits both
            for name, call in phases.items():
                for client in clients:  # the server closes connections idle past 5 s
                    client.reconnect()
                call(0)  # warm-up
                own, served = time.process_time(), cpu_seconds(server.pid)
                done, seconds = run_threads(args.clients, args.seconds, call)
                total = totals[name]
                total[0] += done
                total[1] += seconds
                total[2] += time.process_time() - own
                total[3] += cpu_seconds(server.pid) - served
        for name, (records, seconds, own, served) in totals.items():
            results[f"{name}_records_per_s"] = round(records / seconds, 1)
            per_record = 1000 / max(records, 1)
            if name.startswith("raw"):
                results[f"{name}_cpu_ms_per_record"] = round(own * per_record, 2)
            else:
                results[f"{name}_cpu_ms_per_record"] = round(served * per_record, 2)
                results[f"{name}_client_cpu_ms_per_record"] = round(own * per_record, 2)
        for kind in ("single", "batch"):
            ms = sorted(x * 1000 for x in latencies[kind])
            results[f"server_{kind}_p50_ms"] = round(statistics.median(ms), 2)
            results[f"server_{kind}_p99_ms"] = round(ms[int(0.99 * (len(ms) - 1))], 2)
            results[f"server_{kind}_failed"] = failures[kind]
            ratio = results[f"server_{kind}_records_per_s"] / results[f"raw_{kind}_records_per_s"]
            results[f"{kind}_ratio"] = round(ratio, 3)
            print(f"{kind}: server/raw {ratio:.2f}x ({'PASS' if ratio >= 0.8 else 'MISS'} ≥ 0.8x)")
        results.update(swaps_under_load(args, state, consumer, clients, asked))
        print(
            f"swaps: {results['swap_failed']} failed of {results['swap_requests']} requests "
            f"across {results['swaps']} swaps ({'PASS' if results['swap_failed'] == 0 else 'MISS'})"
        )
    finally:
        server.terminate()
        server.wait(15)
    return results


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_up(port: int, clients: int) -> list[Client]:
    deadline = time.monotonic() + 60
    while True:
        try:
            probe = Client(port)
            probe.post({"instruction": "up?"})
            return [Client(port) for _ in range(clients)]
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise SystemExit("the answer server did not start within 60 s") from None
            time.sleep(0.2)


def swaps_under_load(
    args: argparse.Namespace, state: Path, consumer: Path, clients: list[Client], asked: list[Any]
) -> dict[str, Any]:
    failed = requests = 0
    seen: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def ask(n: int) -> None:
        nonlocal failed, requests
        while not stop.is_set():
            try:
                code, got = clients[n].post(random.choice(asked))
            except (OSError, http.client.HTTPException):
                code, got = 0, {}
            with lock:
                requests += 1
                if code != 200:
                    failed += 1
                else:
                    seen.add(got["version"])

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(clients))]
    for t in threads:
        t.start()
    started = time.monotonic()
    try:
        for version in range(2, 2 + args.swaps):
            publish(state, state / "bundles" / "v1", version)
            pull(DirSource(state), consumer)
            deadline = time.monotonic() + 60
            while version not in seen and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return {
        "swaps": args.swaps,
        "swap_requests": requests,
        "swap_failed": failed,
        "swap_versions_seen": sorted(seen),
        "swap_seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    main()
