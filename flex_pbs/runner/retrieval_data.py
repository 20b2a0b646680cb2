"""RULER-style retrieval prompts (Hsieh et al. 2024, "RULER: What's the Real Context Size of
Your Long-Context Language Models?"): needle sentences hidden in a haystack of filler text, a
question at the end, and the exact text that answers it.

Every generator is a pure function of ``(tokenizer, length, rng, knobs..., style)`` returning
``(prompt, answer)``: ``answer`` is the exact continuation of ``prompt`` (it starts with a
space, e.g. ``" 4821397"``), and the prompt's tokens plus the answer's, each counted alone
without special tokens (:func:`count_tokens`), are at most ``length`` and at least ``length``
minus one haystack word's tokens. Needles go at random depths, each at the start of the haystack
sentence nearest its depth (the haystack is cut at a word to meet the length).

* :func:`multikey`: several keys with one number each; the question asks for one key's number,
  the other needles are distractors.
* :func:`multivalue`: one key with several numbers; the question asks for all of them, in the
  order they appear.
* :func:`variable_tracking`: chains of variable assignments; the question asks for every
  variable that holds one chain's value, in the order they are assigned.

The haystack (:data:`HAYSTACKS`) is ``repeat``, RULER's repeated noise sentences
(:data:`~flex_pbs.runner.data.FILLER`), or ``prose``, CPython's documentation with its
whitespace collapsed, from a random sentence on. :class:`PromptStyle` also picks whether the
question is put in the tokenizer's chat template (``chat``): the user turn holds the context
and question, and the assistant turn starts with the answer's lead-in.
"""

from __future__ import annotations

import itertools
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flex_pbs.runner.data import FILLER, load_text

HAYSTACKS = ("repeat", "prose")
# A random-offset window of the documentation prose: its ~465K characters leave room for
# offsets when a prompt needs at most PROSE_WINDOW characters of it.
PROSE_WINDOW = 100_000
# Characters of haystack per requested token: tokens span 1 (byte tokenizers) to ~5 (BPE on
# English) characters, so this many always holds more than ``length`` tokens.
CHARS_PER_TOKEN_BOUND = 10

# Needle keys are adjective-noun pairs, as RULER's (it draws them from the wonderwords lists).
ADJECTIVES = (
    "amber", "brave", "calm", "damp", "eager", "faint", "gentle", "hollow", "icy", "jolly",
    "keen", "lively", "mellow", "narrow", "odd", "proud", "quiet", "rapid", "silent", "tidy",
    "upbeat", "vivid", "wary", "young", "zesty", "bitter", "cheap", "dusty", "fancy", "grumpy",
    "humble", "itchy", "lazy", "messy", "noisy", "polite", "rusty", "shiny", "tender", "wild",
)
NOUNS = (
    "anchor", "basket", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "ladder", "meadow", "needle", "orchard", "pencil", "quarry", "river",
    "saddle", "tunnel", "umbrella", "valley", "wagon", "yacht", "zebra", "bridge", "castle",
    "desert", "feather", "glacier", "hammer", "lantern", "mirror", "pillow", "rocket", "spoon",
    "ticket", "violin", "window", "blanket",
)
MAX_KEYS = len(ADJECTIVES) * len(NOUNS)
VARIABLE_LETTERS = 5
MAX_DIGITS = 18  # magic numbers stay within 64-bit integers

NUMBERS_HEADER = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
VARIABLES_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text."


@dataclass(frozen=True)
class PromptStyle:
    """How a prompt is laid out: the haystack (one of :data:`HAYSTACKS`) and whether the
    question goes in the tokenizer's chat template."""

    haystack: str = "repeat"
    chat: bool = False

    def __post_init__(self) -> None:
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {self.haystack!r}")
        if not isinstance(self.chat, bool):
            raise TypeError(f"chat must be a bool, got {self.chat!r}")


@dataclass(frozen=True)
class Needle:
    """A sentence to hide at relative ``depth`` (0 = start of the haystack, 1 = end)."""

    sentence: str
    depth: float


def check_inputs(length: Any, rng: Any, **counts: Any) -> None:
    """Raise unless ``rng`` is a ``random.Random`` and ``length`` and each count a positive int."""
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    for name, value in {"length": length, **counts}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` without special tokens (ByT5's tokenizer would append ``</s>``)."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def haystack_text(kind: str, rng: random.Random, chars: int) -> str:
    """At least ``chars`` characters of filler: RULER's noise sentences repeated, or the
    documentation prose (whitespace collapsed) from a random sentence on."""
    if kind == "repeat":
        return FILLER * (chars // len(FILLER) + 1)
    if kind != "prose":
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {kind!r}")
    prose = " ".join(load_text("prose", chars + PROSE_WINDOW).split())
    if len(prose) < chars:
        raise ValueError(f"the prose haystack has {len(prose)} characters, fewer than the {chars} needed")
    start = rng.randrange(max(1, len(prose) - chars))
    sentence = re.compile(r"[.!?] ").search(prose, start)
    start = sentence.end() if sentence and len(prose) - sentence.end() >= chars else 0
    return prose[start:]


def sentence_starts(text: str) -> list[int]:
    """Character offsets where a sentence of ``text`` starts (0 first)."""
    return [0] + [m.end() for m in re.finditer(r"[.!?]\s+", text) if m.end() < len(text)]


def hide(haystack: str, needles: list[Needle]) -> str:
    """``haystack`` with each needle at the start of the sentence nearest its depth (needles
    that land on the same sentence keep their order in ``needles``)."""
    starts = sentence_starts(haystack)
    spots = [min(starts, key=lambda s: abs(s - needle.depth * len(haystack))) for needle in needles]
    pieces, done = [], 0
    for spot, needle in sorted(zip(spots, needles), key=lambda pair: pair[0]):
        pieces += [haystack[done:spot], needle.sentence, " "]
        done = spot
    pieces.append(haystack[done:])
    return "".join(pieces).strip()


def layout(tokenizer, context: str, header: str, question: str, lead_in: str, style: PromptStyle) -> str:
    """The prompt: header, context and question, then the answer's lead-in (``lead_in`` starts
    with a space); with ``style.chat`` the first three form the user turn of the chat template
    and the lead-in starts the assistant turn."""
    user = f"{header}\n{context}\n{question}"
    if not style.chat:
        return user + lead_in
    message = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True) + lead_in.lstrip()


def fitted_prompt(
    tokenizer, length: int, rng: random.Random, needles: list[Needle], header: str, question: str, lead_in: str,
    answer: str, style: PromptStyle,
) -> str:
    """The longest prompt, cutting the haystack at a word, whose tokens and the answer's are at
    most ``length`` (binary search over the haystack's characters)."""
    check_inputs(length, rng)
    if style.chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("style.chat needs a tokenizer with a chat template; this one has none")
    haystack = haystack_text(style.haystack, rng, CHARS_PER_TOKEN_BOUND * length)

    def render(chars: int) -> str:
        cut = haystack[:chars]
        if chars < len(haystack) and not haystack[chars].isspace():  # end at a whole word
            cut = cut[: len(cut) - len(cut.split(" ")[-1])]
        return layout(tokenizer, hide(cut, needles), header, question, lead_in, style)

    def fits(chars: int) -> bool:
        return count_tokens(tokenizer, render(chars)) + count_tokens(tokenizer, answer) <= length

    if not fits(0):
        need = count_tokens(tokenizer, render(0)) + count_tokens(tokenizer, answer)
        raise ValueError(f"length {length} cannot hold the question, needles and answer ({need} tokens)")
    low, high = 0, len(haystack)
    if fits(high):
        raise ValueError(f"the {style.haystack} haystack is too short for {length} tokens")
    while low < high - 1:  # fits(low) and not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return render(low)


def magic_numbers(rng: random.Random, count: int, digits: int) -> list[int]:
    """``count`` distinct random numbers of ``digits`` digits (no leading zero)."""
    if not isinstance(digits, int) or not 1 <= digits <= MAX_DIGITS:
        raise ValueError(f"digits must be an int in [1, {MAX_DIGITS}], got {digits!r}")
    first, end = 10 ** (digits - 1), 10**digits
    if not 1 <= count <= end - first:
        raise ValueError(f"cannot draw {count} distinct {digits}-digit numbers")
    return rng.sample(range(first, end), count)


def magic_keys(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct adjective-noun keys."""
    if not 1 <= count <= MAX_KEYS:
        raise ValueError(f"count must be in [1, {MAX_KEYS}], got {count!r}")
    pairs = rng.sample(range(MAX_KEYS), count)
    return [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs]


def variable_names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct names of five random capital letters."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=VARIABLE_LETTERS))
        if name not in names:
            names.append(name)
    return names


def number_sentence(key: str, number: int) -> str:
    return f"One of the special magic numbers for {key} is: {number}."


def multikey(
    tokenizer, length: int, rng: random.Random, needles: int = 4, digits: int = 7, style: PromptStyle = PromptStyle()
) -> tuple[str, str]:
    """``needles`` sentences "One of the special magic numbers for <key> is: <number>." with
    distinct adjective-noun keys (e.g. ``calm-river``) and distinct ``digits``-digit numbers,
    each at a random depth; the question asks for one key's number, the other ``needles - 1``
    are distractors. The prompt ends "What is the special magic number for <key> mentioned in
    the provided text? The special magic number for <key> is:" (RULER's question; the lead-in
    ends as the needle does before its number, which a small model needs to copy the right
    one); the answer is ``" <number>"``, the number of the one needle with that key."""
    check_inputs(length, rng, needles=needles)
    keys, numbers = magic_keys(rng, needles), magic_numbers(rng, needles, digits)
    hidden = [Needle(number_sentence(k, n), rng.random()) for k, n in zip(keys, numbers)]
    asked = rng.randrange(needles)
    key, answer = keys[asked], f" {numbers[asked]}"
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    lead_in = f" The special magic number for {key} is:"
    return fitted_prompt(tokenizer, length, rng, hidden, NUMBERS_HEADER, question, lead_in, answer, style), answer


def multivalue(
    tokenizer, length: int, rng: random.Random, needles: int = 4, digits: int = 7, style: PromptStyle = PromptStyle()
) -> tuple[str, str]:
    """``needles`` sentences "One of the special magic numbers for <key> is: <number>." with
    one adjective-noun key and distinct ``digits``-digit numbers, at random depths. The prompt
    ends "What are all the special magic numbers for <key> mentioned in the provided text? The
    special magic numbers for <key> mentioned in the provided text are:" (RULER's lead-in with
    the needles' colon, which small models copy); the answer is every number in the order the
    needles appear, ``" <n1>, <n2>, ..."``."""
    check_inputs(length, rng, needles=needles)
    (key,), numbers = magic_keys(rng, 1), magic_numbers(rng, needles, digits)
    depths = sorted(rng.random() for _ in numbers)  # the numbers appear in this order
    hidden = [Needle(number_sentence(key, n), d) for n, d in zip(numbers, depths)]
    answer = " " + ", ".join(str(n) for n in numbers)
    question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
    lead_in = f" The special magic numbers for {key} mentioned in the provided text are:"
    return fitted_prompt(tokenizer, length, rng, hidden, NUMBERS_HEADER, question, lead_in, answer, style), answer


def variable_tracking(
    tokenizer, length: int, rng: random.Random, chains: int = 1, hops: int = 4, digits: int = 5,
    style: PromptStyle = PromptStyle(),
) -> tuple[str, str]:
    """``chains`` chains of ``hops + 1`` sentences each, "VAR <A> = <number>." then "VAR <B> =
    VAR <A>.", "VAR <C> = VAR <B>.", ... (names: five capital letters, all distinct; numbers:
    distinct, ``digits`` digits), each chain in order at increasing random depths, the chains
    interleaved. The prompt ends "Question: Find all variables that are assigned the value
    <number> in the text above. Answer: According to the chain(s) of variables assignment in
    the text above, <hops + 1> variables are assigned the value <number>, they are:" for the
    first chain's number; the answer is that chain's names in assignment order,
    ``" <A>, <B>, <C>, ..."`` (RULER separates them by spaces; commas are what small models
    write between them)."""
    check_inputs(length, rng, chains=chains, hops=hops)
    names = variable_names(rng, chains * (hops + 1))
    numbers = magic_numbers(rng, chains, digits)
    hidden = []
    for chain, number in enumerate(numbers):
        chain_names = names[chain * (hops + 1) : (chain + 1) * (hops + 1)]
        sentences = [f"VAR {chain_names[0]} = {number}."]
        sentences += [f"VAR {name} = VAR {previous}." for previous, name in itertools.pairwise(chain_names)]
        depths = sorted(rng.random() for _ in sentences)
        hidden += [Needle(s, d) for s, d in zip(sentences, depths)]
    asked = numbers[0]
    answer = " " + ", ".join(names[: hops + 1])
    question = f"Question: Find all variables that are assigned the value {asked} in the text above."
    lead_in = (
        " Answer: According to the chain(s) of variables assignment in the text above, "
        f"{hops + 1} variables are assigned the value {asked}, they are:"
    )
    return fitted_prompt(tokenizer, length, rng, hidden, VARIABLES_HEADER, question, lead_in, answer, style), answer


GENERATORS: dict[str, Callable[..., tuple[str, str]]] = {
    "multikey": multikey,
    "multivalue": multivalue,
    "variable_tracking": variable_tracking,
}
SUBTASKS = tuple(GENERATORS)


def retrieval_prompt(subtask: str, tokenizer, length: int, rng: random.Random, **knobs: Any) -> tuple[str, str]:
    """``(prompt, answer)`` of the named generator (one of :data:`SUBTASKS`) with its knobs."""
    if subtask not in GENERATORS:
        raise ValueError(f"subtask must be one of {SUBTASKS}, got {subtask!r}")
    return GENERATORS[subtask](tokenizer, length, rng, **knobs)
