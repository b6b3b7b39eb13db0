# The decoding benchmark (bench/decode.py) and its environment step (bench/env.py) on the CPU: every row starts
# with what earlier rows left freed, the ratios say what they compare, the roofline and the GPU table do their
# arithmetic, the compile check names what is missing, the attention probe sees every shape of both sides, and the
# command runs the methods and settings asked for and prints JSON with the documented keys.
import gc
import json
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

from para_mini.generation import Request, generate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the benchmark scripts, outside the package, as they import each other
import decode as bench  # noqa: E402
from decode import (SHAPES, bench_ours, compile_missing, gpu_specs, random_model, ratios, roofline,  # noqa: E402
                    targets)

CPU = torch.device("cpu")


@pytest.fixture
def no_automatic_gc():
    """Only reference counting frees objects, as between two collections: a cycle stays until gc.collect()."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_every_row_starts_with_the_decoding_state_of_earlier_rows_freed(monkeypatch, no_automatic_gc):
    model = random_model(SHAPES["tiny"], torch.float32, CPU)
    s = {"prompt_len": 12, "new_tokens": 3, "beams": [1], "mixed": [2], "warmup": 1, "repeats": 1,
         "max_timed_s": None, "compile": False, "methods": ["base"]}
    left, rows, measure = [], [], bench.measure

    def checked(run, *args):
        # the fast decoder of an earlier row (its static KV cache, its CUDA graph on a GPU) would count in this
        # row's peak memory
        assert all(ref() is None for ref in left), f"row {len(rows)} starts with an earlier row's decoder alive"
        out = measure(run, *args)
        if getattr(model, "decode_step", None) is not None:
            left.append(weakref.ref(model.decode_step))
        return out

    monkeypatch.setattr(bench, "measure", checked)
    bench_ours(model, s, CPU, rows.append)
    assert [(r["path"], r["batch"]) for r in rows] == [("eager", 1), ("fast", 1), ("eager", 2), ("fast", 2)]
    assert len(left) == 2 and all(ref() is None for ref in left)  # and none is left for Hugging Face's rows


def test_the_fast_decoding_state_is_freed_as_soon_as_the_model_lets_go_of_it(no_automatic_gc):
    model = random_model(SHAPES["tiny"], torch.float32, CPU)
    generate(model, [Request(list(range(3, 15)), None, 4)], fast=True)
    state = weakref.ref(model.decode_step)
    model.decode_step = None
    assert state() is None


def test_the_fast_steps_attention_reads_a_key_length_that_is_a_multiple_of_16():
    # kernels want aligned key lengths: an additive mask of 306 columns is padded (copied) at every layer's call
    from env import SDPAChoices
    model = random_model(SHAPES["tiny"], torch.float32, CPU)
    choices = SDPAChoices()
    choices.case = ("para-mini", "fast")
    with choices:
        generate(model, [Request(list(range(3, 277)), None, 32)], fast=True)
    [decode] = [e for e in choices.table() if e["phase"] == "decode"]
    low, high = decode["kv_len"]
    assert low == high and high % 16 == 0 and high >= 306


def test_gpu_specs_reads_the_datasheet_figures_by_the_device_name():
    assert gpu_specs("NVIDIA H100 80GB HBM3") == {"name": "NVIDIA H100 80GB HBM3", "peak_bf16_flops": 989e12,
                                                  "hbm_bytes_per_s": 3.35e12}
    assert gpu_specs("NVIDIA H100 PCIe")["hbm_bytes_per_s"] == 2.0e12  # not the SXM card's
    assert gpu_specs("NVIDIA H200")["hbm_bytes_per_s"] == 4.8e12
    assert gpu_specs("cpu") == {"name": "cpu", "peak_bf16_flops": None, "hbm_bytes_per_s": None}


def test_the_roofline_is_the_bandwidth_over_the_bytes_of_weights_one_token_reads():
    model = random_model(SHAPES["tiny"], torch.bfloat16, CPU)
    # bf16, 2 bytes a weight; 2 layers of wq, wo 128 x 128, wk, wv 128 x 64, w1, w2, w3 128 x 344; the head 128 x 1024
    weight_bytes = 2 * (2 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 344) + 128 * 1024)
    fast = {"impl": "para-mini", "path": "fast", "method": "base", "batch": 1, "beam": 1, "decode_tokens_per_s": 5e6}
    r = roofline(model, gpu_specs("NVIDIA H200"), [fast], floor=4e6)
    assert r["weight_bytes"] == weight_bytes == 987_136
    assert r["hbm_roofline_tokens_per_s"] == 4.8e12 / weight_bytes
    assert r["floor_over_roofline"] == 4e6 / r["hbm_roofline_tokens_per_s"]
    assert r["fast_base_over_roofline"] == 5e6 / r["hbm_roofline_tokens_per_s"]
    assert roofline(model, gpu_specs("cpu"), [fast], None)["hbm_roofline_tokens_per_s"] is None


def test_ratios_say_which_paths_they_compare_and_use_pefts_default_adapters():
    def row(impl, path, method, tps, dtype=None):
        return {"impl": impl, "path": path, "method": method, "batch": 1, "beam": 1, "tokens_per_s": tps,
                "decode_tokens_per_s": tps, "ttft_s": 0.1, "adapter_compute_dtype": dtype}

    rows = [row("para-mini", "eager", "lora", 30, "bfloat16"), row("para-mini", "fast", "lora", 60, "bfloat16"),
            row("hf", "eager", "lora", 10, "float32"), row("hf", "eager", "lora", 15, "bfloat16")]
    eager, fast = ratios(rows)
    assert eager["over_hf_lora"] == 3 and eager["over_hf_lora_bf16_adapters"] == 2
    assert fast["over_hf_lora"] == 6 and "CUDA graph" in fast["compares"] and "eager" in fast["compares"]
    assert eager["compares"] == "para-mini eager over Hugging Face eager (dynamic cache)"
    rows += [row("para-mini", "eager", "base", 30), row("hf", "eager", "base", 20)]
    [goal1] = [t for t in targets(rows, None, None) if t["target"] == 1]
    assert goal1["ratio"] == 1.5 and goal1["met"] is True


def test_compile_missing_names_what_torch_compile_lacks(monkeypatch, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    monkeypatch.setattr(bench.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    missing = compile_missing(CPU)
    assert "C++ compiler" in missing and f"Python.h (not in {tmp_path}" in missing
    (tmp_path / "Python.h").write_text("")
    monkeypatch.setenv("CXX", "c++")
    assert compile_missing(CPU) is None


def test_the_environment_step_lists_the_attention_backend_of_each_shape_of_both_sides(tmp_path, capsys):
    from env import main
    report = main(["--shape", "tiny", "--device", "cpu", "--prompt-len", "20", "--new-tokens", "4",
                   "--train-len", "32", "--out", str(tmp_path / "env.json")])
    assert report == json.loads((tmp_path / "env.json").read_text()) and report["complete"] is True
    assert {"python", "torch", "cuda", "cudnn"} <= set(report["versions"])
    assert report["compile"]["ready"] == (report["compile"]["missing"] is None)
    assert report["sdp_enabled"]["cudnn"] is False  # the benchmarks' setting, for both sides
    sides = {"para-mini", "hf"} if "transformers" in report["versions"] else {"para-mini"}
    seen = {(e["impl"], e["path"], e["phase"], e["batch"]) for e in report["attention"]}
    for batch in (1, 2):
        assert {("para-mini", "eager", phase, batch) for phase in ("prefill", "decode")} <= seen
        assert ("para-mini", "fast", "decode", batch) in seen
        if "hf" in sides:
            assert {("hf", "eager", phase, batch) for phase in ("prefill", "decode")} <= seen
    assert {(impl, "train", "train", 2) for impl in sides} <= seen
    for e in report["attention"]:
        assert e["backend"] in {"FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"} and e["calls"] >= 1
        if e["phase"] == "decode" and e["impl"] == "para-mini":  # keys: the prompt's 20 and those decoded since
            low, high = e["kv_len"]
            assert 21 <= low <= high and (low == high or e["path"] == "eager")  # the fast step's cache is static
    torch.backends.cuda.enable_cudnn_sdp(True)  # torch's default again, for the tests that follow


def test_the_bench_runs_on_cpu_both_paths_and_prints_json_with_the_documented_keys_and_targets(tmp_path):
    proc = subprocess.run([sys.executable, "bench/decode.py", "--shape", "tiny", "--device", "cpu", "--quick",
                           "--out", str(tmp_path / "bench.json")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report == json.loads((tmp_path / "bench.json").read_text())
    assert {"shape", "device", "settings", "definitions", "results", "ratios", "floor_tokens_per_s", "targets",
            "cpu_rss_peak_mib", "notes"} <= set(report)
    ours = [(r["path"], r["method"], r["batch"], r["beam"]) for r in report["results"] if r["impl"] == "para-mini"]
    assert sorted(ours) == sorted((p, m, b, k) for p in ("eager", "fast") for m in ("base", "para", "ia3", "lora")
                                  for b, k in [(1, 1), (1, 3), (4, 1)])
    assert sorted({t["target"] for t in report["targets"]}) == [1, 2, 3, 4, 5]
    assert all(set(t) == {"target", "what", "ratio", "goal", "met"} for t in report["targets"])
    for r in report["results"]:
        # ttft and total are medians of separate runs: under load either may come out larger, so no order is asserted
        assert r["tokens_per_s"] > 0 and r["ttft_s"] > 0 and r["total_s"] > 0
        assert set(r) >= {"impl", "path", "method", "batch", "beam", "tokens_per_s", "ttft_s", "peak_mem_mib"}
    assert report["floor_tokens_per_s"] is None and report["cpu_rss_peak_mib"] > 0  # CUDA only; CPU: the RSS
    assert report["complete"] is True and report["dtype"] == "float32"  # CPU's default
    assert all(r["timed_calls"] == {"ttft": 1, "total": 1} for r in report["results"])  # --quick: one timed run


def test_the_bench_runs_only_the_methods_and_settings_asked_for(tmp_path):
    # a GPU run with little time left measures only the rows it needs, e.g. the compiled fast path at batch 1
    proc = subprocess.run([sys.executable, "bench/decode.py", "--shape", "tiny", "--device", "cpu", "--quick",
                           "--no-hf", "--methods", "base,para", "--beams", "1", "--mixed", "none"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = sorted((r["path"], r["method"], r["batch"], r["beam"]) for r in report["results"])
    assert rows == sorted((p, m, 1, 1) for p in ("eager", "fast") for m in ("base", "para"))
    assert sorted({t["target"] for t in report["targets"]}) == [1, 2, 3, 5]  # no mixed batch: no target 4
    bad = subprocess.run([sys.executable, "bench/decode.py", "--quick", "--methods", "base,prefix"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "--methods base,prefix: choose among base,para,ia3,lora" in bad.stderr


def test_max_timed_s_times_fewer_calls_only_where_the_warm_up_call_says_the_repeats_would_take_too_long():
    from decode import timed
    calls, cpu = [], torch.device("cpu")

    def slow():
        calls.append(1)
        time.sleep(0.05)

    assert timed(slow, cpu, 1, 3)[1] == 3 and len(calls) == 4  # one warm-up call, three timed
    assert timed(slow, cpu, 1, 3, max_s=60)[1] == 3  # 3 x 0.05 s is well under a minute: no cut
    calls.clear()
    median, n, warm = timed(slow, cpu, 1, 3, max_s=0.08)  # 3 x 0.05 s would take over 0.08 s: one timed call
    assert n == 1 and len(calls) == 2 and median >= 0.05 and warm >= 0.05  # warm: the warm-up call's own time
