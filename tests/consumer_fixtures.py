"""A daemon's published bundles for the consumer-host tests (follow, answer server): the
tiny base exported for real (genai, fp32) once per module, served by the real HTTP server."""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import prometheus_client
from spec_fixtures import export_spec

from aftertune.daemon.server import HttpServer, build_app
from aftertune.learners.base_model import EMBEDDED_TINY, resolve_base
from aftertune.learners.curriculum import sample
from aftertune.learners.kinds.generative.export import export_bundle
from aftertune.store.bundles import install, new_staging_dir, set_latest
from aftertune.store.consumer.format import MANIFEST, read_manifest, write_manifest


def export_published_state(state: Path) -> Path:
    """``state/bundles/v1``: the tiny base exported and published as latest."""
    bundles = state / "bundles"
    staging = new_staging_dir(bundles, 1)
    rng = random.Random(11)
    export_bundle(
        resolve_base(EMBEDDED_TINY),
        staging,
        export_spec(method="genai", parity_prompts=4),
        [sample(rng).prompt for _ in range(4)],
        {"name": "aftertune", "version": 1},
    )
    install(staging, bundles, 1)
    set_latest(bundles, 1)
    return state


def install_copy_of_v1(bundles: Path, version: int, **manifest: object) -> Path:
    """v1's files installed as ``version`` with their own manifest (``manifest`` overrides
    fields, e.g. ``prompt``); ``latest`` is not moved."""
    staging = new_staging_dir(bundles, version)
    for path in (bundles / "v1").iterdir():
        if path.name != MANIFEST:
            shutil.copy2(path, staging / path.name)
    fields = {
        k: v
        for k, v in read_manifest(bundles / "v1").items()
        if k not in ("schema", "created_at", "files")
    }
    write_manifest(staging, {**fields, "version": version, **manifest})
    return install(staging, bundles, version)


def republish(bundles: Path, version: int) -> Path:
    """v1's files published again as ``version`` (its own manifest), made latest: a promotion."""
    final = install_copy_of_v1(bundles, version)
    set_latest(bundles, version)
    return final


@contextmanager
def daemon_server(state: Path, port: int = 0, token: str | None = None) -> Iterator[str]:
    """The daemon's real HTTP server over ``state/bundles``; yields its URL."""
    app = build_app(
        state / "bundles",
        token=token,
        ready=lambda: True,
        metrics=prometheus_client.CollectorRegistry(),
    )
    http = HttpServer(app, "127.0.0.1", port)
    http.start()
    try:
        yield f"http://127.0.0.1:{http.port}"
    finally:
        http.stop(timeout=5)


def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Wait until ``check()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)
