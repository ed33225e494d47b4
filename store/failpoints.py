"""Named crash points for crash-safety tests, in the spirit of etcd's gofail.

``AFTERTUNE_FAILPOINT=<name>`` makes the process SIGKILL itself when it reaches ``<name>``:
no cleanup, no flush, exactly what a power cut or an OOM kill does. Unset (always, in
production) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "AFTERTUNE_FAILPOINT"


def failpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
