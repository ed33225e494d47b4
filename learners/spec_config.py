"""How a learner spec is declared: a frozen pydantic dataclass that validates what it is given.

Each spec class is also the daemon's settings section of the same name (``LoraSpec`` is
``[lora]``), so a knob's default, bounds and meaning are written once, in its field.
Every spec refuses a name it does not know (a typo is an error, never a default silently
kept), and inf or nan in any float: they pass ``gt=0`` and then crash at run time.
"""

from __future__ import annotations

from pydantic import ConfigDict

SPEC_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
