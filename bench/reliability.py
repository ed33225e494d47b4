"""Reliability under attack: what was attacked, how often, with what result.

    .venv/bin/python bench/reliability.py [--records 100000] [--kills 20] [--redis-restarts 5]
        [--hostile-rounds 25] [--corruptions 30] [--manifest-flips 200] [--http-rounds 10]
        [--seed 1] [--only abcd] [--json PATH]

Each case starts its own redis-server on a free port and real daemons
(`python -m aftertune.daemon.cli serve`) as subprocesses, cycles off (no training), all on
127.0.0.1, each bounded in count and time:

(a) ingest: ``--records`` mixed entries (94 % valid, 3 % resent copies, 3 % invalid) in
    three tranches, through ``--kills`` kill -9s of the daemon at random moments (0-200 ms)
    once storing is underway (half in the first tranche, the rest in the third), and
    ``--redis-restarts`` stops of the Redis server mid-ingest (2 s each) in the second: lost,
    duplicated and dead-lettered records against what was sent, the daemon alive through
    the outages, one log line per outage;
(b) hostile records, ``--hostile-rounds`` of each kind: dead-lettered with which reason, none
    stored, the daemon alive and ready;
(c) ``--corruptions`` flipped bytes in published bundles' model or tokenizer (small bundles
    built as tests/test_server.py builds them, no export): served? listed? latest?; half
    under a running daemon, then requested, half while it is stopped (its start-up sweep);
    ``--manifest-flips`` single-bit flips in their manifest.json: served with other contents?
(d) hostile HTTP, ``--http-rounds`` of each: status codes for malformed versions and paths,
    and whether idle, slow-header and idle keep-alive connections are closed, and when.

Prints one table (case, trials, result); ``--json`` also writes every figure. Exits 1 when
a case did not hold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from aftertune.daemon.embedded_redis import RedisServer, free_port
from aftertune.store.bundles import install, new_staging_dir, set_latest
from aftertune.store.consumer.format import CONTENTS_SHA256, write_manifest
from aftertune.store.layout import StateLayout

STREAM, DEAD = "aftertune:feedback", "aftertune:feedback:dead"
TOKEN = "bench-token"
INGEST_ONLY = {"AFTERTUNE_CYCLE__ENABLED": "false", "AFTERTUNE_SERVER__ENABLED": "false"}


@dataclass
class Case:
    name: str
    trials: int
    result: str
    held: bool
    figures: dict[str, Any] = field(default_factory=dict)


# --- the daemon, a subprocess


class Daemon:
    """One `aftertune serve`; its log goes to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aftertune.daemon.cli", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._out,
        )

    def count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self._out.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._out.close()
        return self.proc.returncode


def daemon_env(state: Path, redis_url: str, **settings: str) -> dict[str, str]:
    """A hermetic environment: no AFTERTUNE_* or systemd variables from the caller's shell."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AFTERTUNE_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")
    }
    env.update(
        {
            "AFTERTUNE_REDIS__URL": redis_url,
            "AFTERTUNE_STATE_DIR": str(state),
            "AFTERTUNE_CYCLE__ENABLED": "false",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(settings)
    return env


def wait_for(what: str, done: Callable[[], bool], timeout_s: float, every: float = 0.01) -> float:
    """Seconds until ``done()``; RuntimeError after ``timeout_s``."""
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(every)
    return time.monotonic() - started


def stored_count(state: Path) -> int:
    db = StateLayout(state).examples_db
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM examples").fetchone()[0])
        except sqlite3.OperationalError:  # the daemon has not created the table yet
            return 0


def stored_inputs(state: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(StateLayout(state).examples_db, timeout=10)) as conn:
        return [row[0] for row in conn.execute("SELECT input FROM examples")]


def http(
    url: str, path: str, token: str | None = TOKEN, timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one GET; the path is sent as given."""
    request = urllib.request.Request(url + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# --- (a) kill -9s and Redis restarts during ingest


def record(i: int) -> dict[str, str]:
    return {"task": "echo", "instruction": "Repeat.", "input": f"item {i}", "output": str(i)}


INVALID: list[Callable[[int], bytes]] = [
    lambda i: f"{{broken {i}".encode(),
    lambda i: json.dumps({"task": "echo", "instruction": "Repeat.", "input": f"bad {i}"}).encode(),
    lambda i: json.dumps({**record(i), "input": f"bad {i}", "weight": -1}).encode(),
]


def tranche(start: int, n: int, rng: random.Random) -> tuple[list[bytes], set[str], int]:
    """``n`` entries: ~94 % distinct valid records, ~3 % resent copies, ~3 % invalid.
    Returns (payloads in random order, the inputs that must be stored, invalid count)."""
    n_invalid = n_copies = n * 3 // 100
    valid = [record(i) for i in range(start, start + n - n_invalid - n_copies)]
    payloads = [json.dumps(r).encode() for r in valid]
    payloads += [json.dumps(rng.choice(valid)).encode() for _ in range(n_copies)]
    payloads += [INVALID[k % len(INVALID)](start + k) for k in range(n_invalid)]
    rng.shuffle(payloads)
    return payloads, {r["input"] for r in valid}, n_invalid


def xadd_all(client: redis.Redis, payloads: list[bytes]) -> None:
    pipe = client.pipeline(transaction=False)
    for i, payload in enumerate(payloads, 1):
        pipe.xadd(STREAM, {"record": payload})
        if i % 1000 == 0:
            pipe.execute()
    pipe.execute()


def kill_once_storing(daemon: Daemon, state: Path, before: int, rng: random.Random) -> None:
    """kill -9 ``daemon`` at a random moment (0-200 ms) after it stored its first record."""
    wait_for("storing begins", lambda: stored_count(state) > before, 60, every=0.002)
    time.sleep(rng.uniform(0.0, 0.2))
    daemon.kill()


def attack_ingest(records: int, kills: int, restarts: int, rng: random.Random, tmp: Path) -> Case:
    server = RedisServer(tmp / "redis-a", port=free_port()).start()
    state = tmp / "state-a"
    log = tmp / "daemon-a.log"
    env = daemon_env(state, server.url, **INGEST_ONLY, AFTERTUNE_INGEST__BATCH_SIZE="50")
    expected: set[str] = set()
    invalid = 0
    killed = mid = 0
    t0 = time.monotonic()
    try:
        client = redis.Redis.from_url(server.url)
        sizes = [records * 4 // 10, records * 3 // 10]
        sizes.append(records - sum(sizes))
        tranches = []
        start = 0
        for size in sizes:
            tranches.append(tranche(start, size, rng))
            start += size
        kills_early = (kills + 1) // 2

        def push(k: int) -> None:
            nonlocal expected, invalid
            payloads, inputs, bad = tranches[k]
            xadd_all(client, payloads)
            expected |= inputs
            invalid += bad

        def kill(daemon: Daemon, before: int) -> None:
            nonlocal killed, mid
            kill_once_storing(daemon, state, before, rng)
            killed += daemon.proc.returncode == -signal.SIGKILL
            mid += stored_count(state) < len(expected)  # records were left to store

        # Tranche 1, then kill -9s at random moments once storing is underway.
        push(0)
        for _ in range(kills_early):
            kill(Daemon(env, log), stored_count(state))
        # Tranche 2: Redis stopped while the daemon stores it, started again 2 s later;
        # again each time the daemon stores anew.
        push(1)
        daemon = Daemon(env, log)
        alive_through_outages = True
        stored_at_outage = stored_count(state)
        for outage in range(1, restarts + 1):
            wait_for(
                "storing (again)",
                lambda at=stored_at_outage: stored_count(state) > at,
                60,
                every=0.002,
            )
            server.stop()  # SIGTERM: Redis writes its append-only file
            stored_at_outage = stored_count(state)
            wait_for(
                "the outage logged",
                lambda n=outage: daemon.count("redis unavailable") >= n,
                60,
            )
            time.sleep(2.0)
            alive_through_outages &= daemon.alive()
            server.start()
        client = redis.Redis.from_url(server.url)
        # Tranche 3 pushed while the same daemon recovers; the rest of the kills, the
        # first of them that daemon's once it stores again.
        push(2)
        if kills > kills_early:
            kill(daemon, stored_at_outage)
        else:
            daemon.stop()
        for _ in range(kills - kills_early - 1):
            kill(Daemon(env, log), stored_count(state))
        # A last daemon drains the stream and stops warm.
        final = Daemon(env, log)
        last_id = client.xrevrange(STREAM, count=1)[0][0]

        def drained() -> bool:
            for group in client.xinfo_groups(STREAM):
                if group["last-delivered-id"] == last_id and group["pending"] == 0:
                    return True
            return False

        wait_for("the stream drained", drained, 300, every=0.1)
        warm_exit = final.stop()
        inputs = stored_inputs(state)
        dead = client.xrange(DEAD)
        dead_entries = [fields[b"entry_id"] for _, fields in dead]
        outage_lines = final.count("redis unavailable")
    finally:
        server.stop()
    lost = len(expected - set(inputs))
    duplicated = len(inputs) - len(set(inputs))
    extra = len(set(inputs) - expected)
    dead_twice = len(dead_entries) - len(set(dead_entries))
    held = (
        lost == duplicated == extra == dead_twice == 0
        and len(dead) == invalid
        and alive_through_outages
        and outage_lines == restarts
        and warm_exit == 0
    )
    figures = {
        "entries": records,
        "expected_stored": len(expected),
        "stored": len(inputs),
        "lost": lost,
        "duplicated": duplicated,
        "unexpected": extra,
        "invalid_sent": invalid,
        "dead_lettered": len(dead),
        "dead_lettered_twice": dead_twice,
        "kills": killed,
        "kills_mid_ingest": mid,
        "redis_restarts": restarts,
        "alive_through_outages": alive_through_outages,
        "outage_log_lines": outage_lines,
        "warm_exit_code": warm_exit,
        "seconds": round(time.monotonic() - t0, 1),
    }
    result = (
        f"{len(inputs)}/{len(expected)} stored, {lost} lost, {duplicated} duplicated, "
        f"{len(dead)}/{invalid} dead-lettered ({dead_twice} twice); {killed} kill -9 "
        f"({mid} mid-ingest), {restarts} Redis restarts (daemon alive through them: "
        f"{alive_through_outages}; {outage_lines} outage log lines)"
    )
    name = "(a) kill -9 + Redis restarts during ingest"
    return Case(name, killed + restarts, result, held, figures)


# --- (b) hostile records


def hostile_entries(r: int) -> dict[str, list[list[bytes]]]:
    """Kind → the entries of round ``r``, each as its flat field, value list (XADD order)."""

    def rec(**extra: object) -> bytes:
        return json.dumps({**record(10_000_000 + r), "input": f"hostile {r}", **extra}).encode()

    good = json.dumps(record(20_000_000 + r)).encode()
    first = json.dumps({**record(30_000_000 + r), "id": f"order-{r}"}).encode()
    reused = json.dumps({**record(30_000_000 + r), "output": "other", "id": f"order-{r}"}).encode()
    return {
        "weight 1e308": [[b"record", rec(weight=1e308)]],
        "weight NaN": [[b"record", rec().replace(b"}", b', "weight": NaN}')]],
        # The first use of the id is legitimate (stored); the second is the attack.
        "id reused, other content": [[b"record", first], [b"record", reused]],
        "two record fields": [[b"record", good, b"record", rec()]],
        "control chars in a record field name": [[b"record", rec(**{"in\nput\x1b[31m": "x"})]],
        "control chars in an entry field name": [[b"rec\nord\x1b[2J", good]],
        "oversize (1 MiB)": [[b"record", rec(input="x" * 1024 * 1024)]],
        "bad UTF-8": [[b"record", b'{"task": "echo", "instruction": "\xff\xfe", "input": "a"}']],
    }


def attack_records(rounds: int, tmp: Path) -> Case:
    server = RedisServer(tmp / "redis-b", port=free_port()).start()
    state = tmp / "state-b"
    port = free_port()
    env = daemon_env(
        state, server.url, AFTERTUNE_SERVER__PORT=str(port), AFTERTUNE_SERVER__TOKEN=TOKEN
    )
    daemon = Daemon(env, tmp / "daemon-b.log")
    url = f"http://127.0.0.1:{port}"
    by_kind: dict[str, list[str]] = {}
    sent = 0
    try:
        client = redis.Redis.from_url(server.url)
        wait_for("ready", lambda: _status(url, "/readyz") == 200, 60, every=0.1)
        hostile_ids: dict[bytes, str] = {}
        for r in range(rounds):
            for kind, entries in hostile_entries(r).items():
                for n, flat in enumerate(entries):
                    entry_id = client.execute_command("XADD", STREAM, "*", *flat)
                    if not (kind == "id reused, other content" and n == 0):
                        hostile_ids[entry_id] = kind
                        sent += 1
        sentinel = client.xadd(STREAM, {"record": json.dumps(record(40_000_000))})

        def sentinel_read() -> bool:
            return any(
                g["last-delivered-id"] == sentinel and g["pending"] == 0
                for g in client.xinfo_groups(STREAM)
            )

        wait_for("the hostile entries read", sentinel_read, 120, every=0.05)
        for _, fields in client.xrange(DEAD):
            kind = hostile_ids.get(fields[b"entry_id"], "?")
            by_kind.setdefault(kind, []).append(fields[b"reason"].decode())
        stored = stored_count(state)
        alive, ready = daemon.alive(), _status(url, "/readyz") == 200
    finally:
        exit_code = daemon.stop()
        server.stop()
    dead = sum(len(v) for v in by_kind.values())
    reasons = {kind: sorted(set(found)) for kind, found in by_kind.items()}
    held = (
        dead == sent
        and "?" not in by_kind
        and all(len(by_kind.get(k, [])) == rounds for k in hostile_entries(0))
        and stored == rounds + 1  # the first use of each id, and the sentinel
        and alive
        and ready
        and exit_code == 0
    )
    figures = {
        "kinds": len(hostile_entries(0)),
        "rounds": rounds,
        "hostile_entries": sent,
        "dead_lettered": dead,
        "stored": stored,
        "reasons": reasons,
        "alive": alive,
        "ready": ready,
        "exit_code": exit_code,
    }
    result = (
        f"{dead}/{sent} dead-lettered with a reason, none stored; daemon alive: {alive}, "
        f"/readyz 200: {ready}, SIGTERM exit {exit_code}"
    )
    return Case("(b) hostile records", sent, result, held, figures)


def _status(url: str, path: str) -> int:
    try:
        return http(url, path, timeout=2)[0]
    except OSError:
        return 0


# --- (c) corrupt published bundles


def publish(bundles: Path, version: int, rng: random.Random) -> None:
    """A small bundle as tests/test_server.py builds one: random model bytes, a tokenizer."""
    staging = new_staging_dir(bundles, version)
    (staging / "model.onnx").write_bytes(rng.randbytes(256 * 1024))
    (staging / "tokenizer.json").write_text(json.dumps({"version": "1.0", "v": version}))
    write_manifest(
        staging, {"name": "bench", "version": version, "format": "onnx-logits", "precision": "fp32"}
    )
    install(staging, bundles, version)
    set_latest(bundles, version)


def flip_byte(path: Path, rng: random.Random) -> None:
    """One bit of ``path`` flipped, at a random place (the file rewritten, as bit rot is not)."""
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def serving(state: Path, redis_url: str, log: Path) -> Iterator[tuple[Daemon, str]]:
    port = free_port()
    env = daemon_env(
        state, redis_url, AFTERTUNE_SERVER__PORT=str(port), AFTERTUNE_SERVER__TOKEN=TOKEN
    )
    daemon = Daemon(env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("ready", lambda: _status(url, "/readyz") == 200, 60, every=0.1)
        yield daemon, url
    finally:
        daemon.stop()


def _served_manifest(url: str, version: int) -> bytes | None:
    """The manifest the server sends for ``version``; None when not served."""
    status, _, body = http(url, f"/v1/models/{version}/manifest")
    return body if status == 200 else None


def _same_contents(original: bytes, served: bytes) -> bool:
    """Whether ``served`` says what ``original`` said, its own checksum aside (a flip in that
    key's name leaves every other field as published)."""
    try:
        got = json.loads(served)
    except ValueError:
        return False
    want = {k: v for k, v in json.loads(original).items() if k != CONTENTS_SHA256}
    return {k: v for k, v in got.items() if k in want} == want and got.keys() >= want.keys()


def attack_bundles(
    corruptions: int, manifest_flips: int, rng: random.Random, tmp: Path
) -> list[Case]:
    """Payload files flipped (half under a running daemon and then requested, half while it
    is stopped, for its start-up sweep), then manifests flipped while it is stopped."""
    server = RedisServer(tmp / "redis-c", port=free_port()).start()
    state = tmp / "state-c"
    bundles = StateLayout(state).bundles
    trials: list[dict[str, Any]] = []
    manifests: list[dict[str, Any]] = []
    try:
        publish(bundles, 1, rng)
        on_request = list(range(2, 2 + (corruptions + 1) // 2))
        at_start = list(range(on_request[-1] + 1, 2 + corruptions))
        for version in on_request:
            publish(bundles, version, rng)
        with serving(state, server.url, tmp / "daemon-c1.log") as (daemon, url):
            for version in on_request:
                http(url, f"/v1/models/{version}/files/model.onnx")  # served whole before
                name = rng.choice(["model.onnx", "tokenizer.json"])
                flip_byte(bundles / f"v{version}" / name, rng)
                status = http(url, f"/v1/models/{version}/files/{name}")[0]
                trials.append(_after(url, bundles, daemon, version, name, "on request", status))
        flipped: dict[int, str] = {}
        for version in at_start:
            publish(bundles, version, rng)
            flipped[version] = rng.choice(["model.onnx", "tokenizer.json"])
            flip_byte(bundles / f"v{version}" / flipped[version], rng)
        with serving(state, server.url, tmp / "daemon-c2.log") as (daemon, url):
            wait_for(
                "the start-up sweep",
                lambda: daemon.count("is damaged") >= len(at_start),
                30,
            )
            for version, name in flipped.items():
                status = http(url, f"/v1/models/{version}/files/{name}")[0]
                trials.append(_after(url, bundles, daemon, version, name, "start-up sweep", status))
        first_flipped = 2 + corruptions
        originals = {}
        for version in range(first_flipped, first_flipped + manifest_flips):
            publish(bundles, version, rng)
            originals[version] = (bundles / f"v{version}" / "manifest.json").read_bytes()
            flip_byte(bundles / f"v{version}" / "manifest.json", rng)
        with serving(state, server.url, tmp / "daemon-c3.log") as (daemon, url):
            time.sleep(3.0)  # the start-up sweep of small bundles takes milliseconds
            listed = {m["version"] for m in json.loads(http(url, "/v1/models")[2])["models"]}
            for version, original in originals.items():
                served = _served_manifest(url, version)
                manifests.append(
                    {
                        "version": version,
                        "listed": version in listed,
                        "served": served is not None,
                        "served_other_bytes": served is not None and served != original,
                        "served_other_contents": served is not None
                        and not _same_contents(original, served),
                    }
                )
    finally:
        server.stop()
    served = sum(t["served"] for t in trials)
    listed = sum(t["listed"] for t in trials)
    aside = sum(t["out_of_service"] for t in trials)
    logged_once = sum(t["logged"] == 1 for t in trials)
    held = (
        served == listed == 0
        and aside == logged_once == len(trials)
        and all(t["latest"] != t["version"] for t in trials)
        and all(t["previous_served"] == 200 for t in trials)
    )
    files_case = Case(
        "(c) flipped byte in a bundle's model/tokenizer",
        len(trials),
        f"served {served}/{len(trials)}, listed {listed}/{len(trials)}, out of service "
        f"{aside}/{len(trials)} ({len(on_request)} caught on request, {len(at_start)} by the "
        f"start-up sweep), logged once {logged_once}/{len(trials)}; never latest after, an undamaged "
        "bundle still served",
        held,
        {"trials": trials},
    )
    other_bytes = sum(m["served_other_bytes"] for m in manifests)
    other_contents = sum(m["served_other_contents"] for m in manifests)
    caught = sum(not m["listed"] and not m["served"] for m in manifests)
    manifest_case = Case(
        "(c2) flipped bit in a bundle's manifest.json",
        len(manifests),
        f"out of service {caught}/{len(manifests)}; served with other contents "
        f"{other_contents}/{len(manifests)}; served with the same contents but other bytes "
        f"{other_bytes - other_contents}/{len(manifests)} (a flip in the name of the "
        "checksum's own key)",
        other_contents == 0,
        {"trials": manifests},
    )
    return [files_case, manifest_case]


def _after(
    url: str, bundles: Path, daemon: Daemon, version: int, name: str, found: str, status: int
) -> dict[str, Any]:
    """What the server says about ``version`` after its damage was found."""
    listing = json.loads(http(url, "/v1/models")[2])
    return {
        "version": version,
        "file": name,
        "found": found,
        "status": status,
        "served": status == 200,
        "listed": version in [m["version"] for m in listing["models"]],
        "latest": listing["latest"],
        "out_of_service": (bundles / f".damaged-v{version}").is_dir(),
        "logged": daemon.count(f"bundle v{version} is damaged"),
        "previous_served": http(url, "/v1/models/1/files/model.onnx")[0],
    }


# --- (d) hostile HTTP


MALFORMED = {
    "version of 3000 nines": "/v1/models/" + "9" * 3000 + "/manifest",
    "version of 10 digits": "/v1/models/9999999999/manifest",
    "Arabic-Indic digit (v١)": "/v1/models/%D9%A1/manifest",
    "fullwidth digit (１)": "/v1/models/%EF%BC%91/manifest",
    "negative version": "/v1/models/-1/manifest",
    "version with a sign": "/v1/models/+1/manifest",
    "dotted path out": "/v1/models/1/files/..%2Fsecret.txt",
    "dotted path out, deeper": "/v1/models/1/files/..%2F..%2F..%2Fetc%2Fpasswd",
    "file not in the manifest": "/v1/models/1/files/secret.txt",
}


def closed_after(
    port: int, limit_s: float, send: bytes = b"", every_s: float = 1.0
) -> float | None:
    """Seconds until the server closes a connection that sends ``send`` every ``every_s``
    (nothing: idle); None if still open after ``limit_s``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if send:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        sock.settimeout(every_s)
        while time.monotonic() - started < limit_s:
            try:
                if sock.recv(65536) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                if send:
                    try:
                        sock.sendall(send)
                    except OSError:
                        return time.monotonic() - started
            except OSError:
                return time.monotonic() - started
    return None


def idle_after_response(port: int, limit_s: float) -> float | None:
    """Seconds until a kept-alive connection, idle after one response, is closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(limit_s)
        data = sock.recv(65536)
        started = time.monotonic()
        if not data:
            return 0.0
        try:
            while time.monotonic() - started < limit_s:
                if sock.recv(65536) == b"":
                    return time.monotonic() - started
        except OSError:
            return time.monotonic() - started
    return None


def attack_http(rounds: int, rng: random.Random, tmp: Path) -> Case:
    server = RedisServer(tmp / "redis-d", port=free_port()).start()
    state = tmp / "state-d"
    publish(StateLayout(state).bundles, 1, rng)
    # Beside the bundle: a file inside one that its manifest does not list makes it damaged.
    (StateLayout(state).bundles / "secret.txt").write_text("outside every bundle")
    statuses: dict[str, list[int]] = {}
    timings: dict[str, list[float | None]] = {}
    limit_s = 30.0
    try:
        with serving(state, server.url, tmp / "daemon-d.log") as (daemon, url):
            port = int(url.rsplit(":", 1)[1])
            for _ in range(rounds):
                for what, path in MALFORMED.items():
                    statuses.setdefault(what, []).append(http(url, path)[0])
            probes: dict[str, Callable[[], float | None]] = {
                "idle, sends nothing": lambda: closed_after(port, limit_s),
                "slow header, a line a second": lambda: closed_after(
                    port, limit_s, send=b"X-Slow: 1\r\n"
                ),
                "idle keep-alive after a response": lambda: idle_after_response(port, limit_s),
            }
            threads = []
            for what, probe in probes.items():
                timings[what] = []
                for _ in range(rounds):

                    def run(what: str = what, probe: Callable[[], float | None] = probe) -> None:
                        timings[what].append(probe())

                    threads.append(threading.Thread(target=run))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(limit_s + 10)
            alive = daemon.alive() and _status(url, "/healthz") == 200
    finally:
        server.stop()
    no_500 = all(s < 500 for found in statuses.values() for s in found)
    all_refused = all(s in (400, 404) for found in statuses.values() for s in found)
    closed = all(t is not None for found in timings.values() for t in found)
    held = no_500 and all_refused and closed and alive
    codes = ", ".join(
        f"{what}: {'/'.join(str(s) for s in sorted(set(found)))}"
        for what, found in statuses.items()
    )
    waits = ", ".join(
        f"{what}: closed after {max(t for t in found if t is not None):.1f} s"
        if all(t is not None for t in found)
        else f"{what}: still open after {limit_s:.0f} s"
        for what, found in timings.items()
    )
    figures = {"statuses": statuses, "closed_after_s": timings, "daemon_alive": alive}
    trials = sum(len(v) for v in statuses.values()) + sum(len(v) for v in timings.values())
    result = f"{codes}; {waits}; daemon alive: {alive}"
    return Case("(d) hostile HTTP", trials, result, held, figures)


# --- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--redis-restarts", type=int, default=5)
    parser.add_argument("--hostile-rounds", type=int, default=25)
    parser.add_argument("--corruptions", type=int, default=30)
    parser.add_argument("--manifest-flips", type=int, default=200)
    parser.add_argument("--http-rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default="abcd", help="cases to run, e.g. 'ab'")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    cases: list[Case] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aftertune-reliability-") as tmp_name:
        tmp = Path(tmp_name)
        runs: dict[str, Callable[[], list[Case]]] = {
            "a": lambda: [attack_ingest(args.records, args.kills, args.redis_restarts, rng, tmp)],
            "b": lambda: [attack_records(args.hostile_rounds, tmp)],
            "c": lambda: attack_bundles(args.corruptions, args.manifest_flips, rng, tmp),
            "d": lambda: [attack_http(args.http_rounds, rng, tmp)],
        }
        for key in args.only:
            t0 = time.monotonic()
            found = runs[key]()
            for case in found:
                case.figures["case_seconds"] = round(time.monotonic() - t0, 1)
                print(f"{case.name}: {'held' if case.held else 'FAILED'}", file=sys.stderr)
            cases += found
    total = time.monotonic() - started
    print(f"{'case':<48} {'trials':>6}  result")
    for case in cases:
        mark = "" if case.held else "FAILED: "
        print(f"{case.name:<48} {case.trials:>6}  {mark}{case.result}")
    print(f"({total:.0f} s, {os.cpu_count()} CPUs, seed {args.seed})")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "seconds": round(total, 1),
                    "args": vars(args) | {"json": str(args.json)},
                    "cases": [asdict(c) for c in cases],
                },
                indent=1,
            )
        )
    sys.exit(0 if all(c.held for c in cases) else 1)


if __name__ == "__main__":
    main()
