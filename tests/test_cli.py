# What the command-line programs share (para_mini/cli.py): progress lines that a terminal shows cleanly, flags
# checked for their range as they are parsed, a device checked before anything loads.
import argparse
import io
import re

import pytest
import torch

from para_mini.cli import Parser, Range, StatusLine, above, at_least, between, usable_device


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def render(text, columns=80, lines=40):
    """What a terminal shows after receiving `text` (pyte, a VT100 emulator; a tty turns "\\n" into CR LF)."""
    pyte = pytest.importorskip("pyte")
    screen = pyte.Screen(columns, lines)
    screen.set_mode(pyte.modes.LNM)
    pyte.Stream(screen).feed(text)
    return [line.rstrip() for line in screen.display if line.strip()]


def test_every_progress_update_clears_its_line_and_every_result_starts_on_a_fresh_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = FakeTerminal()
    status = StatusLine(out)
    status.update("step 10/100  loss 2.0000  8,835 tok/s  elapsed 8s  eta 33s", keep=True)
    status.update("dev loss: 16/200  elapsed 1s  eta 9s")  # an evaluation starts: the step line stays
    status.update("dev loss: 200/200  elapsed 3s  eta 0s")
    status.print("step 10: dev loss 2.0561  (best: adapter saved)")
    status.update("step 20/100  loss 1.5000  9,000 tok/s  elapsed 16s  eta 60s", keep=True)
    status.update("step 30/100  loss 1.2500  9,100 tok/s  elapsed 24s  eta 56s", keep=True)
    status.update("dev predictions: 200/200  elapsed 9s  eta 0s")
    status.print("dev acc: 38.50 (200 examples)")
    status.end()
    raw = out.getvalue()
    # after every "\r": an update's text and "erase to the end of the line", or the erasure alone
    assert all(re.match(r"(\x1b\[K|[^\n\x1b]*\x1b\[K)", part) for part in raw.split("\r")[1:])
    assert "\n\rdev loss: 16/200" in raw  # the step line ended where it stood
    assert "\r\x1b[Kstep 10: dev loss" in raw and "\r\x1b[Kdev acc" in raw  # the evaluation's line erased first
    assert render(raw) == ["step 10/100  loss 2.0000  8,835 tok/s  elapsed 8s  eta 33s",
                           "step 10: dev loss 2.0561  (best: adapter saved)",
                           "step 30/100  loss 1.2500  9,100 tok/s  elapsed 24s  eta 56s",
                           "dev acc: 38.50 (200 examples)"]


def test_a_progress_line_longer_than_the_terminal_is_cut_to_its_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "30")
    out = FakeTerminal()
    status = StatusLine(out)
    status.update("requests 1/9  0 failed  123 new tok/s  elapsed 1s  eta 8s")
    status.update("requests 2/9  0 failed  130 new tok/s  elapsed 2s  eta 7s")
    status.print("error: requests.jsonl:3: empty prompt")
    status.update("requests 9/9  1 failed  140 new tok/s  elapsed 9s  eta 0s", keep=True)
    status.end()
    assert render(out.getvalue(), columns=30) == ["error: requests.jsonl:3: empty", " prompt",
                                                  "requests 9/9  1 failed  140 n"]


def test_off_a_terminal_every_update_is_a_plain_line():
    out = io.StringIO()
    status = StatusLine(out)
    status.update("step 1/2", keep=True)
    status.update("dev loss: 1/1")
    status.print("dev acc: 50.00")
    status.end()
    assert out.getvalue() == "step 1/2\ndev loss: 1/1\ndev acc: 50.00\n"


def test_a_range_names_what_is_wrong_in_one_line():
    assert at_least(1)("3") == 3 and above(0.0)("1e-4") == 1e-4 and between(0.0, 1.0)("1") == 1.0
    for kind, text, message in [(at_least(1), "0", "must be at least 1, got 0"),
                                (above(0.0), "0", "must be above 0.0, got 0.0"),
                                (above(0.0), "nan", "must be a finite number, got nan"),
                                (between(0.0, 1.0), "1.5", "must be between 0.0 and 1.0, got 1.5"),
                                (Range(float, 0.0, 1.0, low_open=True), "0", "must be above 0.0 and at most 1.0"),
                                (at_least(1), "two", "expected an integer, got 'two'")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            kind(text)
    assert at_least(0).problem(5) is None and at_least(1).problem(0) == "must be at least 1, got 0"


def test_a_bad_flag_is_one_line_and_exit_status_2(capsys):
    p = Parser(prog="prog.py")
    p.add_argument("--batch-size", type=at_least(1))
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--batch-size", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: argument --batch-size: must be at least 1, got 0 (see prog.py --help)\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_refused_before_anything_loads():
    assert usable_device("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="cuda: (this torch .* is built without CUDA|no CUDA GPU)"):
        usable_device("cuda")
    with pytest.raises(argparse.ArgumentTypeError, match="'gpu' is not a device"):
        usable_device("gpu")
