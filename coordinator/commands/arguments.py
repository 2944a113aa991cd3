"""What every command's arguments share: a parser whose errors are one line and a hint
(exit 2, as every other bad input), and argument types that refuse what cannot be meant
(nan, inf, negative counts, seeds run.c cannot hold)."""

import argparse
import math
import sys
from typing import NoReturn

SEED_LIMIT = 2**64  # run.c's seed is an unsigned 64-bit integer


class Parser(argparse.ArgumentParser):
    """argparse prints its usage and exits 2 on a bad argument; this prints one line naming
    the argument and where to look, like every other llmtp error."""

    def error(self, message: str, help_prog: str | None = None) -> NoReturn:
        print(f"llmtp: error: {message} (see `{help_prog or self.prog} --help`)", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        """Arguments no command knows are found by the top parser: hint at the command's help."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = [getattr(parsed, name, None) for name in ("command", "cluster_command")]
            self.error(f"unrecognized arguments: {' '.join(extras)}",
                       " ".join([self.prog, *filter(None, command)]))
        return parsed


def _number(text: str, convert, what: str):
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def finite_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def seed(text: str) -> int:
    value = _number(text, int, "an integer")
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected 0 <= seed < 2**64 (run.c's seed is unsigned 64-bit), "
                                         f"got {text!r}")
    return value
