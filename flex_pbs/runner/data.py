"""Long real text available offline on any CPython install, for perplexity and passkey tasks.

* ``code``: Python standard-library source files (a fixed list, in order): real, long-range
  structured text (definitions used far from where they are written) that ships with Python.
* ``prose``: the English documentation topics bundled with CPython (``pydoc_data.topics``,
  the text ``help()`` shows): paragraphs of technical English, sorted by topic.

Both depend only on the Python installation (contents vary slightly across Python versions;
the version is recorded with results).
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

STDLIB_FILES = (
    "argparse.py", "dataclasses.py", "functools.py", "inspect.py", "typing.py", "pathlib.py",
    "collections/__init__.py", "json/decoder.py", "json/encoder.py", "textwrap.py",
    "tarfile.py", "zipfile.py", "email/message.py", "logging/__init__.py", "subprocess.py",
)
TEXTS = ("code", "prose")


def stdlib_source(min_chars: int) -> str:
    """Concatenated standard-library source, at least ``min_chars`` long (if available)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for name in STDLIB_FILES:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(f"# file: {name}\n{text}")
        total += len(text)
        if total >= min_chars:
            break
    return "\n".join(parts)


def documentation_prose(min_chars: int) -> str:
    """CPython's bundled documentation topics, sorted by name, at least ``min_chars`` long."""
    from pydoc_data.topics import topics

    parts, total = [], 0
    for name in sorted(topics):
        parts.append(topics[name].strip())
        total += len(parts[-1])
        if total >= min_chars:
            break
    return "\n\n".join(parts)


def load_text(kind: str, min_chars: int) -> str:
    if kind == "code":
        return stdlib_source(min_chars)
    if kind == "prose":
        return documentation_prose(min_chars)
    raise ValueError(f"unknown text {kind!r}; choose from {TEXTS}")


def token_ids(tokenizer, kind: str, seq_len: int, offset: int = 0):
    """``[1, seq_len]`` token ids of a text, starting ``offset`` tokens in."""
    chars = 6 * (seq_len + offset) + 10_000  # tokenizers average 3-4 chars per token here
    ids = tokenizer(load_text(kind, chars), return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < seq_len + offset:
        raise ValueError(f"the {kind} text has {ids.shape[1]} tokens, fewer than {seq_len + offset}")
    return ids[:, offset : offset + seq_len].clone()


FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def passkey_prompt(tokenizer, seq_len: int, depth: float, passkey: int) -> tuple[str, str]:
    """A passkey-retrieval prompt of about ``seq_len`` tokens.

    The line "The pass key is N. Remember it. N is the pass key." is hidden at relative
    ``depth`` (0 = start, 1 = end) of repeated filler; the prompt ends with the question.
    Returns ``(prompt, answer)``.
    """
    needle = f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    question = " What is the pass key? The pass key is"
    header = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    budget = seq_len - len(tokenizer(header + needle + question).input_ids)
    filler_tokens = len(tokenizer(FILLER).input_ids)
    repeats = max(1, budget // filler_tokens)
    before = round(repeats * depth)
    prompt = header + FILLER * before + needle + FILLER * (repeats - before) + question
    return prompt, str(passkey)


def passkeys(count: int, seed: int) -> list[int]:
    """Reproducible five-digit pass keys."""
    rng = random.Random(seed)
    return [rng.randint(10000, 99999) for _ in range(count)]
