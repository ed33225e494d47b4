"""`aftertune pull` and `aftertune generate` through the real CLI, from a state directory and
over HTTP (a real uvicorn), with a real exported bundle of the embedded tiny base.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import prometheus_client
import pytest
from conftest import run_cli
from spec_fixtures import export_spec

from aftertune.daemon.server import HttpServer, build_app
from aftertune.learners.base_model import EMBEDDED_TINY, resolve_base
from aftertune.learners.curriculum import sample
from aftertune.learners.kinds.generative.export import export_bundle
from aftertune.store.bundles import install, new_staging_dir, set_latest
from aftertune.store.consumer import Bundle
from aftertune.store.consumer.format import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SCHEMA,
    read_manifest,
    seal,
    verify_bundle,
    write_manifest,
)
from aftertune.store.consumer.pull import HttpSource, pull
from aftertune.store.errors import BundleError
from aftertune.store.files import file_sha256

TOKEN = "s3cret"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def republish(bundles: Path, version: int) -> Path:
    """v1's files published again as ``version``: its own manifest, then made latest."""
    staging = new_staging_dir(bundles, version)
    for path in (bundles / "v1").iterdir():
        if path.name != MANIFEST:
            shutil.copy2(path, staging / path.name)
    fields = {
        k: v
        for k, v in read_manifest(bundles / "v1").items()
        if k not in ("schema", "created_at", "files")
    }
    write_manifest(staging, {**fields, "version": version})
    final = install(staging, bundles, version)
    set_latest(bundles, version)
    return final


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A daemon state dir with the tiny base exported (fp32, genai) and published as v1."""
    state = tmp_path_factory.mktemp("published") / "state"
    bundles = state / "bundles"
    staging = new_staging_dir(bundles, 1)
    rng = random.Random(11)
    prompts = [sample(rng).prompt for _ in range(4)]
    export_bundle(
        resolve_base(EMBEDDED_TINY),
        staging,
        export_spec(method="genai", parity_prompts=4),
        prompts,
        {"name": "aftertune", "version": 1},
    )
    install(staging, bundles, 1)
    set_latest(bundles, 1)
    return state


@pytest.fixture
def source(pristine: Path, tmp_path: Path) -> Path:
    """This test's own copy of the published state dir, free to tamper with."""
    return Path(shutil.copytree(pristine, tmp_path / "source", symlinks=True))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # An empty AFTERTUNE_TOKEN: no token unless a test passes --token.
    return {"AFTERTUNE_STATE_DIR": str(tmp_path / "consumer-state"), "AFTERTUNE_TOKEN": ""}


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.rglob("*")}


def test_pull_installs_current_and_a_second_pull_downloads_nothing(
    source: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    to = tmp_path / "models"
    published = source / "bundles" / "v1"
    done = run_cli("pull", "--from", str(source), "--to", str(to), "--json", env=env)
    assert done.returncode == 0, done.stderr
    sizes = sum(e["bytes"] for e in read_manifest(published)["files"].values())
    answer = json.loads(done.stdout)
    assert answer.pop("seconds") >= 0
    assert answer == {
        "version": 1,
        "path": str(to / "v1"),
        "manifest_sha256": file_sha256(published / MANIFEST),
        "downloaded": True,
        "bytes": sizes,
    }
    assert sorted(os.listdir(to)) == ["current", "v1"]
    assert os.readlink(to / "current") == "v1"
    assert (to / "v1" / MANIFEST).read_bytes() == (published / MANIFEST).read_bytes()
    assert verify_bundle(to / "current")["version"] == 1

    before = _mtimes(to / "v1")
    again = run_cli("pull", "--from", str(source), "--to", str(to), env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("v1 is already current: "), again.stdout
    assert _mtimes(to / "v1") == before  # nothing was written again
    assert sorted(os.listdir(to)) == ["current", "v1"]


def test_a_damaged_local_copy_is_downloaded_again(
    source: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    to = tmp_path / "models"
    assert run_cli("pull", "--from", str(source), "--to", str(to), env=env).returncode == 0
    flip_byte(to / "v1" / "model.onnx.data")
    done = run_cli("pull", "--from", str(source), "--to", str(to), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("v1 verified ("), done.stdout
    verify_bundle(to / "current")


def test_generate_prints_what_the_bundle_answers(
    source: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    to = tmp_path / "models"
    assert run_cli("pull", "--from", str(source), "--to", str(to), env=env).returncode == 0
    bundle = Bundle.open(to / "current")
    ex = sample(random.Random(5), "copy")
    want = bundle.generate(ex.prompt)
    assert want  # an empty answer would make the comparison vacuous
    done = run_cli("generate", "--bundle", str(to / "current"), "--prompt", ex.prompt, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == want + "\n"
    by_instruction = run_cli(
        "generate", "--bundle", str(to / "current"),
        "--instruction", ex.instruction, "--input", ex.input, env=env,
    )  # fmt: skip
    assert by_instruction.stdout == want + "\n", by_instruction.stderr
    refused = run_cli("generate", "--bundle", str(to / "current"), env=env)
    assert refused.returncode == 1 and "--instruction (and --input) or --prompt" in refused.stderr


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _append(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\0")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (flip_byte, "model.onnx.data: sha256 does not match the manifest"),
        (_append, "model.onnx.data: more than the manifest's"),
        (_truncate, "model.onnx.data: {size} bytes arrived, the manifest says"),
    ],
)
def test_damaged_source_fails_a_fresh_pull_naming_the_file(
    source: Path,
    tmp_path: Path,
    env: dict[str, str],
    damage: Callable[[Path], None],
    message: str,
) -> None:
    target = source / "bundles" / "v1" / "model.onnx.data"
    size = target.stat().st_size - 1
    damage(target)
    to = tmp_path / "models"
    done = run_cli("pull", "--from", str(source), "--to", str(to), env=env)
    assert done.returncode == 1
    assert message.format(size=size) in done.stderr, done.stderr
    assert os.listdir(to) == []  # no current, no v1, no .pull-* left behind


def test_tampered_v2_leaves_current_on_v1(
    source: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    to = tmp_path / "models"
    assert run_cli("pull", "--from", str(source), "--to", str(to), env=env).returncode == 0
    republish(source / "bundles", 2)
    flip_byte(source / "bundles" / "v2" / "tokenizer.json")

    done = run_cli("pull", "--from", str(source), "--to", str(to), env=env)
    assert done.returncode == 1
    assert "tokenizer.json: sha256 does not match the manifest" in done.stderr, done.stderr
    assert sorted(os.listdir(to)) == ["current", "v1"]  # no v2, no .pull-v2-*
    assert os.readlink(to / "current") == "v1"
    assert verify_bundle(to / "current")["version"] == 1

    flip_byte(source / "bundles" / "v2" / "tokenizer.json")  # the same byte back
    done = run_cli("pull", "--from", str(source), "--to", str(to), env=env)
    assert done.returncode == 0, done.stderr
    assert os.readlink(to / "current") == "v2"
    assert verify_bundle(to / "current")["version"] == 2
    assert sorted(os.listdir(to)) == ["current", "v1", "v2"]


@pytest.fixture
def server(source: Path) -> Iterator[str]:
    app = build_app(
        source / "bundles",
        token=TOKEN,
        ready=lambda: True,
        metrics=prometheus_client.CollectorRegistry(),
    )
    http = HttpServer(app, "127.0.0.1", 0)
    http.start()
    try:
        yield f"http://127.0.0.1:{http.port}"
    finally:
        http.stop(timeout=5)


def test_pull_over_http_needs_the_token_and_checks_every_byte(
    server: str, source: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    def pull(to: Path, *token: str) -> tuple[int, str, str]:
        done = run_cli("pull", "--server", server, "--to", str(to), *token, env=env)
        return done.returncode, done.stdout, done.stderr

    rc, _, err = pull(tmp_path / "anonymous")
    assert rc == 1 and "HTTP 401" in err and "--token" in err, err
    rc, _, err = pull(tmp_path / "wrong", "--token", "guess")
    assert rc == 1 and "HTTP 401" in err, err
    assert not (tmp_path / "anonymous" / "current").exists()

    to = tmp_path / "models"
    rc, out, err = pull(to, "--token", TOKEN)
    assert rc == 0 and out.startswith("v1 verified ("), err
    assert os.readlink(to / "current") == "v1"
    assert verify_bundle(to / "current") == read_manifest(source / "bundles" / "v1")

    # The server hashes a changed file before serving it again, and takes v1 out of service.
    flip_byte(source / "bundles" / "v1" / "model.onnx.data")
    fresh = tmp_path / "fresh"
    rc, _, err = pull(fresh, "--token", TOKEN)
    assert rc == 1 and "HTTP 404" in err and "out of service" in err, err
    assert "model.onnx.data: sha256" in err, err
    assert os.listdir(fresh) == []


def test_pull_and_generate_never_import_torch(
    source: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    # A consumer machine needs ONNX Runtime and this package, not torch (style rule 10).
    to = tmp_path / "models"
    code = (
        "import sys\n"
        "from aftertune.daemon.cli import main\n"
        f"assert main(['pull', '--from', {str(source)!r}, '--to', {str(to)!r}]) == 0\n"
        f"assert main(['generate', '--bundle', {str(to / 'current')!r}, '--prompt', 'x']) == 0\n"
        "print('heavy:', sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("heavy: []"), done.stdout


def test_pull_into_a_file_is_refused_with_a_message(
    source: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    done = run_cli("pull", "--from", str(source), "--to", str(target), env=env)
    assert done.returncode == 1
    assert done.stderr.strip() == f"aftertune: File exists: {target}", done.stderr
    assert target.read_text() == "not a directory"


def _rewrite_manifest(bundle: Path, **changes: object) -> None:
    """The bundle's manifest with ``changes`` applied, written as its publisher would."""
    manifest = read_manifest(bundle)
    (bundle / MANIFEST).write_text(json.dumps(seal({**manifest, **changes})))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": True}, "'version' must be an integer"),
        ({"version": -5}, "out of range"),
        ({"files": {}}, "needs genai_config.json"),
    ],
)
def test_a_malformed_source_manifest_installs_nothing(
    source: Path, tmp_path: Path, env: dict[str, str], changes: dict[str, object], message: str
) -> None:
    # Before: "version": true installed DIR/vTrue, -5 DIR/v-5, "files": {} an empty current.
    _rewrite_manifest(source / "bundles" / "v1", **changes)
    to = tmp_path / "models"
    done = run_cli("pull", "--from", str(source), "--to", str(to), "--version", "1", env=env)
    assert done.returncode == 1
    assert message in done.stderr, done.stderr
    assert not to.exists() or os.listdir(to) == []


def test_pull_from_refuses_a_file_linking_out_of_the_bundle(
    source: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    # The manifest lists the link with its target's sha256: only the path can give it away.
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    bundle = source / "bundles" / "v1"
    (bundle / "tokenizer.json").unlink()
    (bundle / "tokenizer.json").symlink_to(secret)
    manifest = read_manifest(bundle)
    manifest["files"]["tokenizer.json"] = {"sha256": file_sha256(secret), "bytes": 32}
    (bundle / MANIFEST).write_text(json.dumps(seal(manifest)))

    to = tmp_path / "models"
    done = run_cli("pull", "--from", str(source), "--to", str(to), env=env)
    assert done.returncode == 1
    assert "'tokenizer.json': it resolves outside the bundle" in done.stderr, done.stderr
    assert os.listdir(to) == []


def test_a_huge_source_manifest_is_refused_unread(
    source: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    # 300 MB, sparse: reading it whole took 968 MB of RSS. Measured in the pulling process.
    with open(source / "bundles" / "v1" / MANIFEST, "r+b") as fh:
        fh.truncate(300 << 20)
    code = (
        "from aftertune.daemon.cli import main\n"
        f"rc = main(['pull', '--from', {str(source)!r}, '--to', {str(tmp_path / 'm')!r}])\n"
        # VmHWM, not ru_maxrss: the latter keeps the forking pytest's peak across exec.
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print('rc', rc, 'rss_mb', int(hwm) // 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert "-byte limit" in done.stderr, done.stderr
    _, rc, _, rss_mb = done.stdout.split()
    assert rc == "1" and int(rss_mb) < 250, (done.stdout, done.stderr)


def _republish_in_place(bundle: Path) -> None:
    """The same version exported again: the same files under a manifest of other bytes."""
    fields = {
        k: v for k, v in read_manifest(bundle).items() if k not in ("schema", "created_at", "files")
    }
    write_manifest(bundle, {**fields, "note": "exported again"})


@pytest.mark.parametrize("point", ["pull.verified", "pull.standin", "replace_dir.swapped_out"])
def test_a_pull_killed_while_replacing_current_leaves_current_whole(
    source: Path, tmp_path: Path, env: dict[str, str], point: str
) -> None:
    to = tmp_path / "models"
    assert run_cli("pull", "--from", str(source), "--to", str(to), env=env).returncode == 0
    _republish_in_place(source / "bundles" / "v1")  # so pulling v1 again replaces DIR/v1

    killed = run_cli(
        "pull", "--from", str(source), "--to", str(to), env={**env, "AFTERTUNE_FAILPOINT": point}
    )
    assert killed.returncode == -signal.SIGKILL, (killed.stdout, killed.stderr)
    assert verify_bundle(to / "current")["version"] == 1  # before: current dangled

    done = run_cli("pull", "--from", str(source), "--to", str(to), "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["manifest_sha256"] == file_sha256(
        source / "bundles" / "v1" / MANIFEST
    )
    assert os.readlink(to / "current") == "v1"
    assert verify_bundle(to / "current")["note"] == "exported again"
    assert sorted(os.listdir(to)) == ["current", "v1"]  # what the kill left is gone


def test_pull_refuses_a_source_that_sends_another_version(
    source: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    shutil.copytree(source / "bundles" / "v1", source / "bundles" / "v2", symlinks=True)
    to = tmp_path / "models"
    done = run_cli("pull", "--from", str(source), "--to", str(to), "--version", "2", env=env)
    assert done.returncode == 1
    assert "asked for v2, the source sent v1" in done.stderr, done.stderr


class _Hostile(http.server.BaseHTTPRequestHandler):
    """A server that never stops sending: a manifest or a file without end."""

    manifest = b""

    def do_GET(self) -> None:
        self.send_response(200)
        if self.path.endswith("/manifest") and self.manifest:
            self.send_header("Content-Length", str(len(self.manifest)))
            self.end_headers()
            self.wfile.write(self.manifest)
            return
        if "announce" in self.path:
            self.send_header("Content-Length", str(300 << 20))
        self.end_headers()
        sent = 0
        with contextlib.suppress(OSError):
            while sent < 300 << 20:
                self.wfile.write(b"\0" * 65536)
                sent += 65536

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Hostile.manifest = b""
        server.shutdown()
        server.server_close()


def test_an_endless_manifest_over_http_is_cut_off_at_the_limit(hostile: str) -> None:
    with pytest.raises(BundleError, match=f"{MAX_MANIFEST_BYTES}-byte limit"):
        HttpSource(hostile).manifest("latest")


def test_an_endless_file_over_http_is_cut_off_past_its_declared_size(
    hostile: str, tmp_path: Path
) -> None:
    tokenizer = b'{"model": {}}'
    files = {
        "model.onnx": {"sha256": hashlib.sha256(b"0123456789").hexdigest(), "bytes": 10},
        "tokenizer.json": {"sha256": hashlib.sha256(tokenizer).hexdigest(), "bytes": 13},
    }
    _Hostile.manifest = json.dumps(
        seal({"schema": SCHEMA, "version": 1, "format": "onnx-logits", "files": files})
    ).encode()
    received: list[int] = []
    source = HttpSource(hostile)
    real_open = source.open

    def counting(version: int, path: str, size: int) -> Iterator[bytes]:
        for chunk in real_open(version, path, size):
            received.append(len(chunk))
            yield chunk

    source.open = counting
    with pytest.raises(BundleError, match=r"model\.onnx: more than the manifest's 10 bytes"):
        pull(source, tmp_path / "models")
    assert sum(received) == 11  # the first byte too many, not a chunk more
    assert os.listdir(tmp_path / "models") == []

    files["model.onnx"]["bytes"] = 1 << 20  # the server announces 300 MB: refused unread
    _Hostile.manifest = json.dumps(
        seal({"schema": SCHEMA, "version": 1, "format": "onnx-logits", "files": files})
    ).encode()
    with pytest.raises(BundleError, match="more than the 1048576 expected"):
        list(HttpSource(hostile).open(1, "announce", 1 << 20))


def test_pull_says_why_a_version_has_no_bundle_and_what_to_do_without_a_server(
    tmp_path: Path, env: dict[str, str]
) -> None:
    from aftertune.store.registry import Registry, VersionState

    state = tmp_path / "state"
    (state / "bundles").mkdir(parents=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    with Registry(state) as registry:
        registry.register_candidate(adapter, parent=None, data_seq=1, training={}, lineage={})
        registry.transition(1, VersionState.EVALUATING, actor="t", reason="gate evaluation")
        gate = {"decision": "rejected", "reasons": ["t: accuracy 53.0% ... at chance level"]}
        registry.transition(1, VersionState.REJECTED, actor="t", reason="chance", gate=gate)
    to = str(tmp_path / "to")
    done = run_cli("pull", "--from", str(state), "--version", "v1", "--to", to, env=env)
    assert done.returncode == 1
    assert "v1 was rejected, so it was never published: t: accuracy 53.0%" in done.stderr
    refused = run_cli("pull", "--server", "http://127.0.0.1:1", "--to", to, env=env)
    assert refused.returncode == 1
    assert "is the daemon running" in refused.stderr and "--from STATE_DIR" in refused.stderr
