"""The challenger an answer server shadows: the bundle the daemon announces as in shadow
evaluation (``GET /v1/models/candidate``), pulled with the verified pull and opened.

The daemon's HTTP server is the one source, as for ``pull --follow``: what it announces is
pulled from it, every file checked against the manifest, and the manifest's sha256 must be
the one announced. Nothing read from Redis chooses what is pulled. The candidate lives in a
directory of its own (``--shadow-dir``, by default ``shadow`` beside the bundle link), never
the champion's.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from aftertune.store.consumer import Bundle
from aftertune.store.consumer.deadline import HttpStatus, fetch
from aftertune.store.consumer.format import read_bounded
from aftertune.store.consumer.pull import HttpSource, pull
from aftertune.store.errors import BundleError

log = logging.getLogger(__name__)

CANDIDATE_PATH = "/v1/models/candidate"
MAX_ANSWER_BYTES = 64 * 1024  # the announcement is a few dozen bytes
TIMEOUT_S = 30.0  # total deadline of one announcement request
_VERSION_DIR = re.compile(r"^v\d+$")


@dataclass(frozen=True)
class Announced:
    """The version the daemon is judging on live traffic, and its bundle's manifest sha256."""

    version: int
    manifest_sha256: str


def fetch_candidate(server: str, token: str | None, timeout: float = TIMEOUT_S) -> Announced | None:
    """What ``server`` announces as in shadow evaluation; None when nothing is (404).
    BundleError when the server cannot be asked or answers something else."""
    request = urllib.request.Request(server.rstrip("/") + CANDIDATE_PATH)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with fetch(request, timeout) as body:
            raw = read_bounded(body, MAX_ANSWER_BYTES, request.full_url)
    except HttpStatus as exc:
        if exc.code == 404:
            return None
        raise BundleError(f"GET {request.full_url}: HTTP {exc.code}") from None
    except OSError as exc:
        raise BundleError(f"cannot reach {server} ({exc})") from None
    try:
        found = json.loads(raw)
        version, sha = found["version"], found["manifest_sha256"]
    except (ValueError, TypeError, KeyError):
        raise BundleError(f"GET {request.full_url}: not an announcement: {raw[:200]!r}") from None
    if not isinstance(version, int) or version < 1 or not isinstance(sha, str):
        raise BundleError(f"GET {request.full_url}: not an announcement: {raw[:200]!r}")
    return Announced(version, sha)


class CandidateFollower:
    """Keeps ``bundle`` at the candidate ``server`` announces (None while it announces none)."""

    def __init__(self, server: str, token: str | None, to_dir: Path) -> None:
        self.source = HttpSource(server, token)  # BundleError: not an http(s) URL
        self.server, self.token, self.to_dir = server, token, Path(to_dir)
        self.bundle: Bundle | None = None
        self.announced: Announced | None = None
        self._unreachable = False  # one log line per outage

    def check(self) -> bool:
        """Ask the daemon once; pull and open a newly announced candidate. True when
        ``bundle`` changed (to a new candidate, or to None)."""
        try:
            announced = fetch_candidate(self.server, self.token)
        except BundleError as exc:
            if not self._unreachable:
                log.warning("shadow: cannot ask for the candidate (%s); asking again", exc)
                self._unreachable = True
            return False
        if self._unreachable:
            log.info("shadow: %s answers again", self.server)
            self._unreachable = False
        if announced == self.announced:
            return False
        if announced is None:
            log.info("shadow: v%d is no longer in shadow evaluation", self.bundle_version)
            self.bundle, self.announced = None, None
            return True
        return self._switch(announced)

    @property
    def bundle_version(self) -> int:
        return self.bundle.version if self.bundle is not None else 0

    def _switch(self, announced: Announced) -> bool:
        try:
            result = pull(self.source, self.to_dir, str(announced.version))
            if result.manifest_sha256 != announced.manifest_sha256:
                raise BundleError(
                    f"its manifest has sha256 {result.manifest_sha256}, the daemon announced "
                    f"{announced.manifest_sha256}"
                )
            bundle = Bundle.open(result.path)
        except (BundleError, OSError, ValueError) as exc:
            log.error("shadow: refused candidate v%d (%s)", announced.version, exc)
            return False
        self.bundle, self.announced = bundle, announced
        self._remove_others(result.path)
        log.info("shadow: running v%d beside the champion (%s)", bundle.version, result.path)
        return True

    def _remove_others(self, keep: Path) -> None:
        """Earlier candidates' directories: nothing answers with them any more."""
        for entry in self.to_dir.iterdir():
            if _VERSION_DIR.match(entry.name) and entry != keep and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
