"""argparse `type=` validators: every bad value is refused while the command line is parsed, before a
model loads or a sweep starts, as one `error: argument --flag: ...` line and exit 2 (the CLI contract).

Checks that need the model (a block index past the last block, a GPU that is not there) run right after
loading, still before any long work.
"""

from __future__ import annotations

import argparse
import re
import sys

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda|cuda:(0|[1-9]\d*))$")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one `error: ...` line on stderr and exit 2 (no usage dump)."""

    def error(self, message: str):
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f" (see `workbench {sub} --help`)" if sub else " (see `workbench --help`)"
        print(f"error: {message}{hint}", file=sys.stderr)
        sys.exit(2)


def device(value: str) -> str:
    v = value.strip().lower()
    if not _DEVICE.match(v):
        raise argparse.ArgumentTypeError(
            f"unknown device {value!r}: use auto, cpu, cuda or cuda:N with N = 0, 1, ... (mps on a Mac)")
    return v


def model(value: str) -> str:
    v = value.strip()
    if not v:
        raise argparse.ArgumentTypeError("the model is empty: name a local folder, a .gguf file, a hub id or default")
    return v


def _whole_number(value: str, low: int, says: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be {says}, got {v}")
    return v


def positive_int(value: str) -> int:
    return _whole_number(value, 1, "at least 1")


def non_negative_int(value: str) -> int:
    return _whole_number(value, 0, "0 or more")


def port(value: str) -> int:
    v = positive_int(value)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {v}")
    return v


def _number(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    return v


def fraction(value: str) -> float:
    """A number in [0, 1] (a sparsity, a damping factor)."""
    v = _number(value)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, got {v:g}")
    return v


def positive_float(value: str) -> float:
    v = _number(value)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {v:g}")
    return v


def non_negative_float(value: str) -> float:
    v = _number(value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v:g}")
    return v


def duration(value: str) -> float | None:
    """'2h' / '90m' / '45s' / '1.5h' / a number of seconds -> seconds; 'off' (or 0) -> None: never."""
    v = value.strip().lower()
    if v in ("off", "never", "none", "0"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?", v)
    if not m or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration (e.g. 2h, 90m, 600s, or off)")
    return float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2] or "s"]


def size(value: str) -> int | None:
    """'2G' / '512M' / bytes -> bytes; 'off' -> None: no budget."""
    from workbench.budget import parse_bytes

    if value.strip().lower() in ("off", "none"):
        return None
    try:
        n = parse_bytes(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {value!r}")
    return n


def block_list(value: str) -> tuple[int, ...]:
    """'3,5,9' -> (3, 5, 9): original 0-based block indices (checked against the model once loaded)."""
    out = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        if not re.fullmatch(r"\d+", part):
            raise argparse.ArgumentTypeError(f"{part!r} is not a block index (0-based whole numbers, e.g. 3,5,9)")
        out.append(int(part))
    return tuple(out)


def choices_csv(known) -> callable:
    """'a,b' -> ('a', 'b'), each one of `known`."""
    known = tuple(known)

    def parse(value: str) -> tuple[str, ...]:
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        if not items:
            raise argparse.ArgumentTypeError(f"name at least one of {', '.join(known)}")
        bad = [v for v in items if v not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r} (known: {', '.join(known)})")
        return items

    return parse
