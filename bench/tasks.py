"""The learnable suite: deterministic synthetic instruction tasks for continual-learning runs.

Each answer depends on a few characters of the input, which a ~1M-parameter byte-level
model can learn with a LoRA adapter in a few hundred steps. The embedded base model's
pretraining curriculum (learners/curriculum.py) deliberately leaves the "core" features out
(parity, last digit, ends-with-a-vowel, last letter), so the suite starts from what the
base does not know. "alt" is a second family of the same kind (a character feature mapped
to a short answer) with different features, instructions and label words, none of them in
the curriculum either, for checks on tasks a run has never seen.

Train and test inputs are disjoint; label tasks are exactly balanced per split. Files use
the shared datasets' line format ``{"task", "instruction", "input", "output"}``.

    python bench/tasks.py --out /tmp/learnable [--family core] [--seed 0] [--train 1000] [--test 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

VOWELS = "aeiou"
CONSONANTS = "".join(c for c in string.ascii_lowercase if c not in VOWELS)


@dataclass(frozen=True)
class SyntheticTask:
    """A task = an instruction + a way to draw an input whose answer is a given label.

    ``labels`` lists the answers of a label task (drawn round-robin, so splits are exactly
    balanced); None marks a free-text task whose answers come from ``make(rng, None)``.
    """

    name: str
    instruction: str
    labels: tuple[str, ...] | None
    make: Callable[[random.Random, str | None], tuple[str, str]]  # (rng, label) -> (input, output)


def _word(rng: random.Random, lo: int = 3, hi: int = 9, last: str | None = None) -> str:
    """Random lower-case letters; ``last`` fixes the final one (to hit a label exactly)."""
    n = rng.randint(lo, hi)
    letters = [rng.choice(string.ascii_lowercase) for _ in range(n)]
    if last is not None:
        letters[-1] = last
    return "".join(letters)


def _number(rng: random.Random, last_digit: str | None = None) -> str:
    digits = rng.randint(1, 6)
    text = str(rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1))
    if last_digit is not None:
        text = text[:-1] + last_digit
    return text


# --- core family: the default suite --------------------------------------------------------


def _parity(rng: random.Random, label: str | None) -> tuple[str, str]:
    digit = rng.choice("02468" if label == "even" else "13579")
    return _number(rng, digit), str(label)


def _vowel_end(rng: random.Random, label: str | None) -> tuple[str, str]:
    last = rng.choice(VOWELS if label == "yes" else CONSONANTS)
    return _word(rng, last=last), str(label)


def _last_digit(rng: random.Random, label: str | None) -> tuple[str, str]:
    return _number(rng, label), str(label)


def _last_letter(rng: random.Random, label: str | None) -> tuple[str, str]:
    word = _word(rng)
    return word, word[-1]


# --- alt family: same kind, unseen features -------------------------------------------------


def _high_low(rng: random.Random, label: str | None) -> tuple[str, str]:
    digit = rng.choice("56789" if label == "high" else "01234")
    return _number(rng, digit), str(label)


def _double_end(rng: random.Random, label: str | None) -> tuple[str, str]:
    word = _word(rng, 3, 8)
    if label == "same":
        word = word[:-1] + word[-2]
    elif word[-1] == word[-2]:
        word = word[:-1] + rng.choice([c for c in string.ascii_lowercase if c != word[-2]])
    return word, str(label)


def _last_two(rng: random.Random, label: str | None) -> tuple[str, str]:
    word = _word(rng)
    return word, word[-2:]


def _ends_consonant(rng: random.Random, label: str | None) -> tuple[str, str]:
    last = rng.choice(CONSONANTS if label == "consonant" else VOWELS)
    return _word(rng, last=last), str(label)


FAMILIES: dict[str, tuple[SyntheticTask, ...]] = {
    "core": (
        SyntheticTask("parity", "Is the number even or odd?", ("even", "odd"), _parity),
        SyntheticTask(
            "vowel_end",
            "Does the word end with a vowel? Answer yes or no.",
            ("yes", "no"),
            _vowel_end,
        ),
        SyntheticTask(
            "last_digit", "What is the last digit of the number?", tuple(string.digits), _last_digit
        ),
        SyntheticTask("last_letter", "Write the last letter of the word.", None, _last_letter),
    ),
    "alt": (
        SyntheticTask(
            "high_low", "Is the final digit high (5-9) or low (0-4)?", ("high", "low"), _high_low
        ),
        SyntheticTask(
            "double_end",
            "Are the last two letters the same or different?",
            ("same", "different"),
            _double_end,
        ),
        SyntheticTask("last_two", "Write the last two letters of the word.", None, _last_two),
        SyntheticTask(
            "end_kind",
            "Does the word end in a vowel or a consonant?",
            ("vowel", "consonant"),
            _ends_consonant,
        ),
    ),
}


def generate(
    task: SyntheticTask, *, seed: int, n_train: int, n_test: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and test rows of one task: deterministic in (task, seed), disjoint inputs."""
    rng = random.Random(f"aftertune-bench:{task.name}:{seed}")
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    total = n_train + n_test
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > 50 * total + 1000:
            raise ValueError(
                f"task {task.name!r}: could not draw {total} distinct inputs; ask for fewer"
            )
        label = task.labels[len(rows) % len(task.labels)] if task.labels else None
        text, output = task.make(rng, label)
        if text in seen:  # disjointness: an input lives in exactly one split
            continue
        seen.add(text)
        rows.append(
            {"task": task.name, "instruction": task.instruction, "input": text, "output": output}
        )
    # Test first, so the held-out set of a given seed does not depend on n_train. Each
    # split is shuffled so labels are not in round-robin order.
    test, train = rows[:n_test], rows[n_test:]
    rng.shuffle(test)
    rng.shuffle(train)
    return train, test


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_family(
    out: Path, family: str = "core", *, seed: int = 0, n_train: int = 1000, n_test: int = 200
) -> list[str]:
    """Write ``<task>.train.jsonl`` / ``<task>.test.jsonl`` for every task of a family."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if n_train < 1 or n_test < 1:
        raise ValueError("--train and --test must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for task in FAMILIES[family]:
        train, test = generate(task, seed=seed, n_train=n_train, n_test=n_test)
        _write_jsonl(out / f"{task.name}.train.jsonl", train)
        _write_jsonl(out / f"{task.name}.test.jsonl", test)
        names.append(task.name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--family", default="core", choices=sorted(FAMILIES))
    parser.add_argument("--seed", type=int, default=0, help="changes every input, not the tasks")
    parser.add_argument("--train", type=int, default=1000, help="train examples per task")
    parser.add_argument("--test", type=int, default=200, help="test examples per task")
    args = parser.parse_args(argv)
    try:
        names = write_family(
            args.out, args.family, seed=args.seed, n_train=args.train, n_test=args.test
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(names)} tasks to {args.out}: {','.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
