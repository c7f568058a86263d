"""The bundled chat task: small string puzzles that the embedded tiny model learns in a couple of CPU minutes.

Each answer is a function of the prompt (reverse, sort, upper-case or shift a few letters or digits), so the
loss on assistant tokens can fall far and token accuracy can rise visibly within a few hundred steps.
"""

import random
import string

from datasets import Dataset

SYSTEM_PROMPT = "You are a precise assistant. Answer with the result only."


def _reverse(items: list[str]) -> list[str]:
    return items[::-1]


def _shift(items: list[str]) -> list[str]:
    alphabet = string.ascii_lowercase
    return [alphabet[(alphabet.index(c) + 1) % 26] for c in items]


PUZZLES = {
    "reverse": (string.ascii_lowercase, _reverse),
    "sort": (string.digits, sorted),
    "upper": (string.ascii_lowercase, lambda items: [c.upper() for c in items]),
    "next": (string.ascii_lowercase, _shift),
}


def make_example(rng: random.Random) -> dict:
    """One conversation: a system line, a puzzle from the user, the answer from the assistant."""
    name = rng.choice(sorted(PUZZLES))
    symbols, solve = PUZZLES[name]
    items = [rng.choice(symbols) for _ in range(rng.randint(3, 8))]
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{name}: {' '.join(items)}"},
            {"role": "assistant", "content": " ".join(solve(items))},
        ]
    }


def bundled_dataset(num_examples: int, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    return Dataset.from_list([make_example(rng) for _ in range(num_examples)])
