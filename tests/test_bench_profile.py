# The profile that explains decode.py's goals (bench/profile_decode.py), run here on the tiny random model on
# a CPU, where a "kernel" is an operator that calls no other: its report has every case, positive times and counts,
# and the counts show what PARA adds (the vector generator at the prefill, one multiply per adjusted projection
# at each decoded token).
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the benchmark scripts, outside the package, as they import each other
import profile_decode as bench_profile  # noqa: E402
from decode import SHAPES  # noqa: E402
from profile_decode import main  # noqa: E402

CASES = ("prefill", "eager", "fast_graph", "fast_kernels")


def test_the_profile_reports_each_case_with_its_kernels_and_para_adds_only_its_own(tmp_path, capsys):
    report = main(["--shape", "tiny", "--device", "cpu", "--prompt-len", "40", "--rounds", "2", "--top", "5",
                   "--out", str(tmp_path / "profile.json")])
    assert report == json.loads((tmp_path / "profile.json").read_text()) == json.loads(capsys.readouterr().out)
    assert report["complete"] is True and {"torch", "cudnn"} <= set(report["versions"])
    assert set(report["cases"]) == {f"{case}_{method}" for case in CASES for method in ("base", "para")}
    for case in report["cases"].values():
        assert case["wall_ms"] > 0 and case["kernel_ms"] > 0 and case["kernels"] > 0
        assert case["cuda_graph"] is False  # a CPU replays no graph
        top = case["top"]
        assert 0 < len(top) <= 5 and all(k["count"] >= 1 and k["ms"] >= 0 for k in top)
        assert [k["ms"] for k in top] == sorted((k["ms"] for k in top), reverse=True)
        assert sum(k["count"] for k in top) <= case["kernels"] and sum(k["share"] for k in top) <= 1 + 1e-9
    c, layers = report["cases"], SHAPES["tiny"].n_layers
    # the prefill runs PARA's vector generator and pooler at every layer: many more operators
    assert c["prefill_para"]["kernels"] > c["prefill_base"]["kernels"] + 10 * layers
    for case in CASES[1:]:  # a decoding step: l_q * Q, l_v * V, l_u * U, one multiply each per layer, no VG again
        assert c[f"{case}_para"]["kernels"] - c[f"{case}_base"]["kernels"] == 3 * layers, case
        assert report["ratios"][case]["kernels"] == c[f"{case}_para"]["kernels"] / c[f"{case}_base"]["kernels"]


def test_a_profile_stopped_part_way_keeps_every_wall_time_and_the_profiles_done(tmp_path, monkeypatch):
    monkeypatch.delenv("TEARDOWN_CUPTI", raising=False)
    profiled, kernels = [], bench_profile.kernels

    def stopped_at_the_third(fn, device, top):
        if len(profiled) == 2:
            raise KeyboardInterrupt  # as a time limit, or a profiled case that never returns, would stop it
        profiled.append(fn)
        return kernels(fn, device, top)

    monkeypatch.setattr(bench_profile, "kernels", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        main(["--shape", "tiny", "--device", "cpu", "--prompt-len", "40", "--rounds", "1", "--top", "3",
              "--out", str(tmp_path / "profile.json")])
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["complete"] is False and len(report["cases"]) == 8
    assert all(case["wall_ms"] > 0 for case in report["cases"].values())
    assert [name for name, case in report["cases"].items() if case["kernels"]] == ["prefill_base", "eager_base"]
    assert os.environ["TEARDOWN_CUPTI"] == "0"  # CUPTI stays up from one profiled case to the next
