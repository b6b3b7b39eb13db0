# What the command-line programs (train.py, generate.py, lab.py) share: flags checked for their range as they are
# parsed (and made from a config dataclass's fields), a device checked before anything loads, and progress lines
# that a terminal shows cleanly.
import argparse
import math
import shutil
import sys
import time
from dataclasses import MISSING, dataclass, field, fields

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


def option(help, default=None, type=None, choices=None, group=None, required=False):
    """A field of a config dataclass that is also its command-line flag (add_options): --name-with-dashes, with this
    help, type (a Range checks the value) and choices; a field that defaults to False is a switch. group: the
    --help section that starts with this field."""
    meta = {"help": help, "type": type, "choices": choices, "group": group}
    return field(metadata=meta) if required else field(default=default, metadata=meta)


def add_options(parser, config, only_given=False):
    """A flag for every field of the dataclass `config` (see option). only_given: no defaults and nothing required,
    so that parse_args returns just the flags given, e.g. to override some fields of a config made elsewhere."""
    group = parser
    for f in fields(config):
        m = f.metadata
        if m["group"]:
            group = parser.add_argument_group(m["group"])
        kw = {"help": m["help"]}
        if f.default is False:
            kw["action"] = "store_true"
        else:
            kw.update({k: m[k] for k in ("type", "choices") if m[k] is not None})
        if only_given:
            kw["default"] = argparse.SUPPRESS
        elif f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def check_options(config):
    """The range checks of add_options' flags, for a config made in code: a value out of range is a ValueError that
    names the flag."""
    for f in fields(config):
        value, kind = getattr(config, f.name), f.metadata.get("type")
        if isinstance(kind, Range) and value is not None and kind.problem(value):
            raise ValueError(f"--{f.name.replace('_', '-')}: {kind.problem(value)}")


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


class Progress:
    """Counts with their elapsed time and ETA on a StatusLine: "<what> <done>/<total>  <detail>  elapsed  eta".
    Each `what` has its own clock, started by start() or by a count that starts over (a new evaluation). Off a
    terminal a line comes at most every log_seconds, unless it is kept (a training step, the last request), so that
    a log is neither flooded nor silent through a long evaluation."""
    LOG_SECONDS = 30

    def __init__(self, stream=None, log_seconds=None):
        self.status = StatusLine(stream)
        self.log_seconds = self.LOG_SECONDS if log_seconds is None else log_seconds
        self.clocks, self.logged = {}, time.time()  # what -> [start time, count at the start, last count]

    def start(self, what, done=0):
        self.logged = now = time.time()
        self.clocks[what] = [now - 1e-9, done, done]

    def count(self, what, done, total, detail="", keep=False):
        if what not in self.clocks or done <= self.clocks[what][2]:
            self.start(what)
        t0, done0, _ = self.clocks[what]
        self.clocks[what][2] = done
        now = time.time()
        if not (keep or self.status.tty or now - self.logged >= self.log_seconds):
            return
        self.logged, el = now, now - t0
        eta = el / max(1, done - done0) * (total - done)
        self.status.update(f"{what} {done}/{total}  " + (f"{detail}  " if detail else "")
                           + f"elapsed {el:,.0f}s  eta {eta:,.0f}s", keep=keep)

    def print(self, text):
        self.status.print(text)

    def end(self):
        self.status.end()
