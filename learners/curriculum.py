"""The deterministic synthetic instruction curriculum the embedded base model is pretrained on.

Every example is generated from a seeded `random.Random`, so no data ships with the package
and `aftertune base build` reproduces the same stream. The tasks teach the prompt layout, a
short answer followed by EOS, and character-level skills (copy, look at the first / n-th /
final characters, count, membership, compare, classify by a simple feature, map a feature
to label words, yes/no) under many instructions and label vocabularies, so that a LoRA
adapter can later pick up a *new* task of that kind in a few hundred steps.

Deliberately absent, because the continual-learning benchmark uses them as unseen tasks:
parity of a number, last digit, "ends with a vowel" and "last letter".

Changing any generator changes the stream, and with it the shipped weights: rebuild them.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aftertune.store.prompt import render_prompt

VOWELS = "aeiou"
_CONSONANTS = "bcdfghjklmnpqrstvwxyz"
# A few real words mixed with generated ones, so the model also sees familiar shapes.
_COMMON_WORDS = (  # noqa: SIM905 (a literal list, one word a line, would bury the code)
    "apple river stone light green house music table paper water tiger cloud smile "
    "bread chair dream plant ocean train queen sugar money world night earth fruit "
    "horse lemon glass storm cat dog sun map box cup pen red sky key egg owl ice "
    "umbrella orange island elephant autumn winter summer garden window yellow planet"
).split()
_CJK_WORDS = ("你好", "世界", "学习", "模型", "数据", "中文", "老师", "朋友", "天气", "苹果")
# Label words for tasks whose answer vocabulary is part of the instruction.
_YES_NO = (("yes", "no"), ("Yes", "No"), ("true", "false"), ("Y", "N"), ("1", "0"))
_LABEL_POOL = (  # noqa: SIM905
    "red blue cat dog hot cold up down left right alpha beta on off good bad "
    "big small sun moon A B X Z pass fail high low"
).split()

Task = Callable[[random.Random], tuple[str, str, str]]
Question = Callable[[random.Random], tuple[str, str, bool]]


@dataclass(frozen=True)
class Example:
    """One curriculum example; `prompt` is what the model sees, `output` what it must answer."""

    task: str
    instruction: str
    input: str
    output: str

    @property
    def prompt(self) -> str:
        return render_prompt(self.instruction, self.input)


def _one(rng: random.Random, options: str) -> str:
    """One of the '|'-separated paraphrases (the same draw as rng.choice on a tuple)."""
    return rng.choice(options.split("|"))


def _word(rng: random.Random, lo: int = 2, hi: int = 8) -> str:
    """A real or pronounceable made-up lower-case word of lo..hi letters."""
    if rng.random() < 0.35:
        return rng.choice([w for w in _COMMON_WORDS if lo <= len(w) <= hi] or _COMMON_WORDS)
    n = rng.randint(lo, hi)
    # Alternate consonants and vowels from a random start so vowel/consonant starts balance.
    start = rng.random() < 0.5
    return "".join(rng.choice(VOWELS if (i % 2 == 0) == start else _CONSONANTS) for i in range(n))


def _phrase(rng: random.Random, lo: int = 2, hi: int = 4) -> str:
    return " ".join(_word(rng, 2, 6) for _ in range(rng.randint(lo, hi)))


def _yes_no(rng: random.Random, question: str, answer: bool) -> tuple[str, str]:
    """A yes/no instruction; the label words are sometimes named in it, sometimes implied."""
    pos, neg = rng.choice(_YES_NO) if rng.random() < 0.5 else ("yes", "no")
    tail = f" Answer {pos} or {neg}." if (pos, neg) != ("yes", "no") or rng.random() < 0.5 else ""
    return question + tail, pos if answer else neg


def _binary(question: Question) -> Task:
    """Turn (question, input, truth) into a yes/no task with a sampled label vocabulary."""

    def make(rng: random.Random) -> tuple[str, str, str]:
        q, text, truth = question(rng)
        ins, out = _yes_no(rng, q, truth)
        return ins, text, out

    return make


# --- open-answer tasks: rng -> (instruction, input, output) -------------------------------


def _copy(rng: random.Random) -> tuple[str, str, str]:
    text = rng.choice(_CJK_WORDS) if rng.random() < 0.15 else _phrase(rng, 1, 3)
    return (
        _one(rng, "Repeat the input exactly.|Copy the text.|Echo the input.|Say it back."),
        text,
        text,
    )


def _upper(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng, 2, 7)
    ins = _one(
        rng, "Write the word in capital letters.|Uppercase the input.|Convert to upper case."
    )
    return ins, w, w.upper()


def _first_char(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng)
    ins = _one(
        rng,
        "What is the first letter?|Give the first character.|First letter of the word?"
        "|Which letter does the word start with?",
    )
    return ins, w, w[0]


def _nth_char(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(2, 4)
    w = _word(rng, n, 8)
    ordinal = {2: "second", 3: "third", 4: "fourth"}[n]
    ins = _one(
        rng,
        f"What is the {ordinal} letter?|Give character number {n}.|Which letter is at position {n}?",
    )
    return ins, w, w[n - 1]


def _penultimate_char(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng, 2, 8)
    ins = _one(rng, "What is the second to last letter?|Give the letter before the final one.")
    return ins, w, w[-2]


def _vowel_count(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng, 1, 9)
    ins = _one(rng, "How many vowels are in the word?|Count the vowels.")
    return ins, w, str(sum(ch in VOWELS for ch in w))


def _first_word(rng: random.Random) -> tuple[str, str, str]:
    p = _phrase(rng)
    ins = _one(rng, "What is the first word?|Give the first word.|Return only the first word.")
    return ins, p, p.split()[0]


def _last_word(rng: random.Random) -> tuple[str, str, str]:
    p = _phrase(rng)
    ins = _one(rng, "What is the last word?|Give the final word.|Return only the last word.")
    return ins, p, p.split()[-1]


def _length(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng, 1, 9)
    ins = _one(
        rng,
        "How many letters are in the word?|Count the characters.|What is the length of the word?",
    )
    return ins, w, str(len(w))


def _word_count(rng: random.Random) -> tuple[str, str, str]:
    p = _phrase(rng, 1, 6)
    ins = _one(rng, "How many words are there?|Count the words.|Number of words?")
    return ins, p, str(len(p.split()))


def _count_char(rng: random.Random) -> tuple[str, str, str]:
    c = rng.choice("aeio")
    w = _word(rng, 3, 9)
    ins = _one(
        rng,
        f"How many times does '{c}' appear?|Count the letter {c}.|How many {c}'s are in the word?",
    )
    return ins, w, str(w.count(c))


def _first_digit(rng: random.Random) -> tuple[str, str, str]:
    n = str(rng.randint(1, 99999))
    return _one(rng, "What is the first digit?|Give the leading digit."), n, n[0]


def _digit_count(rng: random.Random) -> tuple[str, str, str]:
    n = str(rng.randint(1, 9_999_999))
    return _one(rng, "How many digits does the number have?|Count the digits."), n, str(len(n))


def _larger(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(100), 2)
    return _one(rng, "Which number is larger?|Give the bigger number."), f"{a} {b}", str(max(a, b))


def _longer_word(rng: random.Random) -> tuple[str, str, str]:
    a, b = _word(rng, 2, 5), _word(rng, 6, 9)
    if rng.random() < 0.5:
        a, b = b, a
    ins = _one(rng, "Which word is longer?|Return the longer word.")
    return ins, f"{a} {b}", max(a, b, key=len)


def _add(rng: random.Random) -> tuple[str, str, str]:
    a = rng.randint(0, 9)
    b = rng.randint(0, 9 - a)
    return _one(rng, "Add the two numbers.|What is the sum?"), f"{a} {b}", str(a + b)


# --- classification with label words named by the instruction ----------------------------


def _kind(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.choice(("word", "number", "symbol"))
    # All three candidates are drawn (and two discarded) to keep the stream as built.
    text = {
        "word": _word(rng),
        "number": str(rng.randint(0, 9999)),
        "symbol": "".join(rng.choices("!@#$%&*+-=?", k=rng.randint(1, 4))),
    }[kind]
    ins = _one(
        rng, "Is this a word, a number or a symbol?|Classify the input: word, number or symbol."
    )
    return ins, text, kind


def _vowel_or_consonant(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng)
    label = "vowel" if w[0] in VOWELS else "consonant"
    ins = _one(rng, "Does it start with a vowel or a consonant?|First letter: vowel or consonant?")
    return ins, w, label


def _short_long(rng: random.Random) -> tuple[str, str, str]:
    w = _word(rng, 1, 10)
    ins = _one(rng, "Is the word short or long?|Label the word short or long.")
    return ins, w, "short" if len(w) <= 4 else "long"


def _alphabet_half(rng: random.Random) -> tuple[str, str, str]:
    """Feature-to-label mapping with arbitrary label words stated in the instruction."""
    a, b = rng.sample(_LABEL_POOL, 2)
    w = _word(rng)
    ins = f"Answer {a} if the word starts with a letter from a to m, otherwise {b}."
    return ins, w, a if w[0] <= "m" else b


# --- yes/no questions: rng -> (question, input, truth) ------------------------------------


def _q_contains(rng: random.Random) -> tuple[str, str, bool]:
    w = _word(rng)
    # Half the time ask about a letter that is in the word, so yes and no balance.
    c = rng.choice(w) if rng.random() < 0.5 else rng.choice(string.ascii_lowercase)
    return (
        _one(rng, f"Does the word contain the letter '{c}'?|Is there a {c} in the text?"),
        w,
        c in w,
    )


def _q_starts_with(rng: random.Random) -> tuple[str, str, bool]:
    w = _word(rng)
    c = w[0] if rng.random() < 0.5 else rng.choice(string.ascii_lowercase)
    return _one(rng, f"Does the word start with '{c}'?|Does it begin with {c}?"), w, w.startswith(c)


def _q_ends_with(rng: random.Random) -> tuple[str, str, bool]:
    # Names the character in the instruction, unlike the benchmark's implicit end-feature tasks.
    w = _word(rng) if rng.random() < 0.7 else str(rng.randint(0, 9999))
    pool = _CONSONANTS if w[0].isalpha() else string.digits
    c = w[-1] if rng.random() < 0.5 else rng.choice(pool)
    return _one(rng, f"Does it end with '{c}'?|Is '{c}' the final character?"), w, w.endswith(c)


def _q_starts_vowel(rng: random.Random) -> tuple[str, str, bool]:
    w = _word(rng)
    return (
        _one(rng, "Does the word begin with a vowel?|Is the first letter a vowel?"),
        w,
        w[0] in VOWELS,
    )


def _q_has_digit(rng: random.Random) -> tuple[str, str, bool]:
    w = _word(rng, 3, 7)
    if rng.random() < 0.5:
        i = rng.randrange(len(w) + 1)
        w = w[:i] + rng.choice(string.digits) + w[i:]
    q = _one(rng, "Does the text contain a digit?|Is there a number in it?")
    return q, w, any(ch.isdigit() for ch in w)


def _q_is_upper(rng: random.Random) -> tuple[str, str, bool]:
    w = _word(rng, 2, 7)
    upper = rng.random() < 0.5
    q = _one(rng, "Is the word in capital letters?|Is it all upper case?")
    return q, w.upper() if upper else w, upper


def _q_greater(rng: random.Random) -> tuple[str, str, bool]:
    k = rng.choice((10, 50, 100, 500))
    n = rng.randint(0, 2 * k)
    return _one(rng, f"Is the number greater than {k}?|Is it more than {k}?"), str(n), n > k


def _q_long(rng: random.Random) -> tuple[str, str, bool]:
    w = _word(rng, 1, 10)
    q = _one(rng, "Is the word longer than five letters?|Does it have more than 5 characters?")
    return q, w, len(w) > 5


def _q_same_first(rng: random.Random) -> tuple[str, str, bool]:
    a, b = _word(rng, 2, 6), _word(rng, 2, 6)
    if rng.random() < 0.5:
        b = a[0] + b[1:]
    q = _one(rng, "Do both words start with the same letter?|Same first letter?")
    return q, f"{a} {b}", a[0] == b[0]


def _mapped_feature(rng: random.Random) -> tuple[str, str, str]:
    """A binary feature mapped to sampled label words, so labels are not tied to yes/no."""
    a, b = rng.sample(_LABEL_POOL, 2)
    feature = rng.choice((_q_contains, _q_has_digit, _q_long, _q_greater, _q_starts_vowel))
    q, text, truth = feature(rng)
    return f"{q} Say {a} if so, {b} if not.", text, a if truth else b


TASKS: dict[str, Task] = {
    "copy": _copy,
    "uppercase": _upper,
    "first_char": _first_char,
    "nth_char": _nth_char,
    "penultimate_char": _penultimate_char,
    "first_word": _first_word,
    "last_word": _last_word,
    "length": _length,
    "word_count": _word_count,
    "count_char": _count_char,
    "vowel_count": _vowel_count,
    "contains_char": _binary(_q_contains),
    "starts_with": _binary(_q_starts_with),
    "ends_with_given": _binary(_q_ends_with),
    "starts_vowel": _binary(_q_starts_vowel),
    "has_digit": _binary(_q_has_digit),
    "is_upper": _binary(_q_is_upper),
    "greater_than": _binary(_q_greater),
    "longer_than_five": _binary(_q_long),
    "same_first": _binary(_q_same_first),
    "first_digit": _first_digit,
    "digit_count": _digit_count,
    "larger_number": _larger,
    "longer_word": _longer_word,
    "add": _add,
    "input_kind": _kind,
    "vowel_or_consonant": _vowel_or_consonant,
    "short_or_long": _short_long,
    "alphabet_half": _alphabet_half,
    "mapped_feature": _mapped_feature,
}


def sample(rng: random.Random, task: str | None = None) -> Example:
    """One example of `task`, or of a uniformly chosen task when None."""
    if task is None:
        task = rng.choice(sorted(TASKS))
    elif task not in TASKS:
        raise ValueError(f"unknown curriculum task {task!r}; known: {', '.join(sorted(TASKS))}")
    instruction, text, output = TASKS[task](rng)
    return Example(task=task, instruction=instruction, input=text, output=output)


def stream(seed: int) -> Iterator[Example]:
    """An endless deterministic stream of examples over all tasks."""
    rng = random.Random(seed)
    while True:
        yield sample(rng)


def held_out(seed: int, per_task: int) -> list[Example]:
    """`per_task` examples of every task, from a generator separate from the training stream."""
    rng = random.Random(f"held-out:{seed}")
    return [sample(rng, task) for task in sorted(TASKS) for _ in range(per_task)]
