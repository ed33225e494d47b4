"""Task names that look like another task's: 'ѕрес' in Cyrillic letters beside Latin 'spec'.

Two names look alike when their skeletons are equal, in the spirit of Unicode TR39: the
compatibility decomposition (NFKD: fullwidth 'ｐ' and mathematical '𝐩' become 'p'), then each
Cyrillic or Greek letter replaced by the Latin letter it imitates. Latin is left as written:
a name in Latin letters is its own skeleton, and 'Il' and 'll' stay two names.

A name that mixes scripts is refused on its own (``records.py``); this catches a name written
wholly in look-alikes, which only the names already known can tell apart from a real one.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

# Each Latin letter, and the Cyrillic (first) and Greek letters that imitate it: TR39's
# confusables.txt (Unicode 14), its rows from a Cyrillic or Greek letter to one Latin letter;
# capitals that look like 'I' map to 'I' (TR39's prototype is 'l', as it folds Latin 'I' too).
# A table of three scripts rather than a dependency: PyICU's SpoofChecker needs ICU built
# from source, and the pure-Python packages are unmaintained or give no skeleton.
IMITATORS = {
    "a": "аα",  # U+0430, U+03B1
    "b": "Ь",  # U+042C
    "c": "с",  # U+0441
    "d": "ԁ",  # U+0501
    "e": "еҽ",  # U+0435, U+04BD
    "h": "һ",  # U+04BB
    "i": "іꙇι",  # U+0456, U+A647, U+03B9
    "j": "јϳ",  # U+0458, U+03F3
    "l": "ӏ",  # U+04CF
    "o": "оοσ",  # U+043E, U+03BF, U+03C3
    "p": "рρ",  # U+0440, U+03C1
    "q": "ԛ",  # U+051B
    "r": "гᴦ",  # U+0433, U+1D26
    "s": "ѕ",  # U+0455
    "u": "υ",  # U+03C5
    "v": "ѵν",  # U+0475, U+03BD
    "w": "ѡԝ",  # U+0461, U+051D
    "x": "х",  # U+0445
    "y": "уүγ",  # U+0443, U+04AF, U+03B3
    "A": "АΑ",  # U+0410, U+0391
    "B": "ВΒ",  # U+0412, U+0392
    "C": "С",  # U+0421
    "E": "ЕΕ",  # U+0415, U+0395
    "F": "Ϝ",  # U+03DC
    "G": "Ԍ",  # U+050C
    "H": "НΗ",  # U+041D, U+0397
    "I": "ІӀΙ",  # U+0406, U+04C0, U+0399
    "J": "ЈͿ",  # U+0408, U+037F
    "K": "КΚ",  # U+041A, U+039A
    "M": "МΜϺ",  # U+041C, U+039C, U+03FA
    "N": "Ν",  # U+039D
    "O": "ОΟ",  # U+041E, U+039F
    "P": "РΡ",  # U+0420, U+03A1
    "S": "Ѕ",  # U+0405
    "T": "ТΤ",  # U+0422, U+03A4
    "V": "Ѵ",  # U+0474
    "W": "Ԝ",  # U+051C
    "X": "ХΧ",  # U+0425, U+03A7
    "Y": "УҮΥ",  # U+0423, U+04AE, U+03A5
    "Z": "Ζ",  # U+0396
}
_TABLE = str.maketrans({fake: latin for latin, fakes in IMITATORS.items() for fake in fakes})


def skeleton(name: str) -> str:
    """What ``name`` looks like, written in Latin where it imitates Latin."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFKD", name).translate(_TABLE))


def lookalike_letters(name: str, limit: int = 4) -> str:
    """The letters of ``name`` that imitate others, named: "Cyrillic 'р' U+0440, ..."."""
    found: list[str] = []
    for ch in dict.fromkeys(name):
        if skeleton(ch) != ch and len(found) < limit:
            script = unicodedata.name(ch, "").split(" ", 1)[0].title()
            found.append(f"{script} {ch!r} U+{ord(ch):04X}")
    return ", ".join(found)


def imitation_reason(name: str, imitated: str) -> str:
    """Why a record of the new task ``name`` was refused: the task it looks like, and how."""
    return (
        f"field 'task' {name!r} looks like the existing task {imitated!r} but is another name "
        f"({lookalike_letters(name)}); send {imitated!r} to add to that task, or choose a name "
        "that does not imitate an existing one"
    )


class TaskNames:
    """Known task names, by skeleton: which new name imitates one of them."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._names: set[str] = set()
        self._by_skeleton: dict[str, str] = {}
        self.add(names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def add(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self._names:
                continue
            self._names.add(name)
            key = skeleton(name)
            # Who is imitated: the name written as it looks, whoever came first.
            if key not in self._by_skeleton or name == key:
                self._by_skeleton[key] = name

    def imitated(self, name: str) -> str | None:
        """The known task a new ``name`` looks like but is not; None when it looks like none,
        or is written as it looks (a Latin name is never the imitation)."""
        key = skeleton(name)
        if name in self._names or name == key:
            return None
        return self._by_skeleton.get(key)


def lookalike_groups(names: Iterable[str]) -> list[list[str]]:
    """Names that look alike, in groups of two or more (each sorted, the look-alike first
    written as it looks): what ``aftertune status`` flags."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(skeleton(name), []).append(name)
    return [
        sorted(group, key=lambda n: (n != key, n))
        for key, group in sorted(groups.items())
        if len(group) > 1
    ]
