"""argparse types shared by the kernel benchmarks: comma-separated lists, checked while the arguments are parsed, so
that a bad value stops a script before any work with the option's name and what it takes."""

import argparse


def items(text):
    """The non-empty comma-separated items of text, stripped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _refuse(what, text):
    return argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")


def numbers(what, least, below=None, kind=int):
    """At least one number of `kind` in [least, below); `what` names them in the error."""

    def parse(text):
        try:
            values = [kind(item) for item in items(text)]
        except ValueError:
            values = []
        if not values or not all(least <= v and (below is None or v < below) for v in values):
            raise _refuse(what, text)
        return values

    return parse


def settings(what, size, sep, least=1):
    """At least one setting of `size` whole numbers ≥ least joined by `sep` (e.g. "BV:warps:stages"), as tuples."""

    def parse(text):
        try:
            values = [tuple(int(v) for v in item.split(sep)) for item in items(text)]
        except ValueError:
            values = []
        if not values or any(len(v) != size or min(v) < least for v in values):
            raise _refuse(what, text)
        return values

    return parse


def names(what, allowed):
    """At least one of `allowed`, in the order given."""

    def parse(text):
        values = items(text)
        if not values or any(v not in allowed for v in values):
            raise _refuse(f"{what} of {', '.join(allowed)}", text)
        return values

    return parse
