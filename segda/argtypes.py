"""Argument types of the `segda` command line: a bad value is refused by argparse, naming the flag, before
anything runs."""

from __future__ import annotations

import argparse

from segda.log import SegdaError


def size(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT (or N for NxN) -> (width, height): the one size form of configs and flags alike, at most the
    pixels segda decodes in one image."""
    from segda.config import parse_size
    from segda.data.transforms import MAX_IMAGE_PIXELS

    try:
        width, height = parse_size(text, "size").wh
    except SegdaError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write WIDTHxHEIGHT, e.g. 1280x720 (or N for "
                                         "NxN)") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise argparse.ArgumentTypeError(f"{text}: more than the {MAX_IMAGE_PIXELS >> 20} megapixels segda handles in "
                                         "one image")
    return width, height


def seconds(text: str) -> float:
    """A positive, finite number of seconds (at most an hour)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value <= 3600):  # nan and inf fail here too
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0, at most 3600")
    return value


def int_in(low: int, high: int | None = None):
    """An argparse type for a whole number in [low, high]: a bad value is refused before anything runs."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is not allowed: give a whole number {allowed}")
        return value
    return parse
