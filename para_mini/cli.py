# What the command-line programs (train.py, generate.py, lab.py) share: flags checked for their range as they are
# parsed, a device checked before anything loads, and progress lines that a terminal shows cleanly.
import argparse
import math
import shutil
import sys
from dataclasses import dataclass

import torch


class Parser(argparse.ArgumentParser):
    """argparse, where a bad flag costs one line (exit status 2), not the whole usage."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Range:
    """An argparse type for a number in [low, high] (low excluded with low_open): a bad value stops the program as
    it parses its flags, with one line naming the flag, never deep in a run with a traceback."""
    kind: type  # int or float
    low: float = None
    high: float = None
    low_open: bool = False

    def __call__(self, text):
        try:
            x = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if self.kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        why = self.problem(x)
        if why:
            raise argparse.ArgumentTypeError(why)
        return x

    def problem(self, x):
        """Why x is out of range, or None (also for the same settings given in a file, e.g. a request line)."""
        if not math.isfinite(x):
            return f"must be a finite number, got {x}"
        below = self.low is not None and (x <= self.low if self.low_open else x < self.low)
        if below or (self.high is not None and x > self.high):
            low = f"{'above' if self.low_open else 'at least'} {self.low}" if self.low is not None else None
            if self.high is None:
                return f"must be {low}, got {x}"
            if low is None:
                return f"must be at most {self.high}, got {x}"
            between = f"between {self.low} and {self.high}" if not self.low_open else f"{low} and at most {self.high}"
            return f"must be {between}, got {x}"
        return None


def at_least(low):
    return Range(type(low), low)


def above(low):
    return Range(type(low), low, low_open=True)


def between(low, high):
    return Range(type(low), low, high)


SEED = between(0, 2 ** 32 - 1)


def usable_device(name: str) -> str:
    """An argparse type: a device this torch and this machine can use, so that --device cuda on a CPU-only torch
    stops at once with one line instead of an AssertionError from inside the first tensor moved there."""
    try:
        d = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if d.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise argparse.ArgumentTypeError(f"{name}: this torch ({torch.__version__}) is built without CUDA; "
                                             "use --device cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{name}: no CUDA GPU is visible; use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{name}: there are {torch.cuda.device_count()} GPUs (cuda:0 .. "
                                             f"cuda:{torch.cuda.device_count() - 1})")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{name}: MPS is not available on this machine; use --device cpu")
    return name


class StatusLine:
    """Progress on a terminal: one line rewritten in place, each time cleared to its end and cut to the terminal's
    width (a shorter update never leaves the tail of a longer one, a long one never wraps where "\\r" cannot reach).
    A line updated with keep=True (a training step) stays on screen when something else follows; any other update
    (an evaluation's progress) is erased. print() writes a result on a line of its own. Off a terminal (a log file),
    every update is a plain line."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.live = None  # None, or whether the line on screen (without its newline yet) is to be kept

    def update(self, text, keep=False):
        if not self.tty:
            print(text, file=self.stream, flush=True)
            return
        if self.live and not keep:
            self.stream.write("\n")  # a kept line ends where it stands; the new one starts below it
        width = shutil.get_terminal_size().columns - 1
        self.live = keep
        self.stream.write("\r" + text[:width] + "\x1b[K")
        self.stream.flush()

    def end(self):
        """Leave the screen with nothing half-written: a kept line ends with its newline, any other is erased."""
        if self.live is not None:
            self.stream.write("\n" if self.live else "\r\x1b[K")
            self.live = None

    def print(self, text):
        self.end()
        print(text, file=self.stream, flush=True)
