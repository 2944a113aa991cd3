"""A varied, deterministic set of strings for tokenizer oracle tests."""

import random

HANDWRITTEN = [
    "", " ", "  ", "a", "Once upon a time", " leading space", "trailing space ", "two  spaces   three",
    "line one\nline two\n\nthree", "\ttab\tseparated", "CamelCase and snake_case_words", "don't we'll they're I'm",
    "numbers 1 12 123 1234 3.14159 -7 1e10", "2026-12-02 07:30:00", "price: $42.00 (approx.)", "a,b;c:d!e?f",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9", "e\u0301 combining", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u0645\u0631\u062d\u0628\u0627", "\U0001F600 emoji \U0001F680\U0001F468\u200d\U0001F469", "\u2581 literal lower one eighth",
    "\u00a0non-breaking", "mixed\r\nnewlines", "<html><body>tags</body></html>", "x" * 50, "ab" * 20,
    "Lily and Tom went to the park. They saw a big dog!", "   ", "\n", "end.\n",
]
POOL = list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789.,;:!?'\"-()[]{}\n\t  ") + [
    "\u00e9", "\u00fc", "\u00df", "\u4e2d", "\u6587", "\U0001F600", "\u2014", "\u00a0", "the ", "and ", "ing "]


def varied_strings(n_random: int = 300, seed: int = 2026) -> list[str]:
    rng = random.Random(seed)
    randoms = ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 40))) for _ in range(n_random)]
    return HANDWRITTEN + randoms
