# lab.py tune and compare's use of it: the rates are chosen on the dev split, tune never opens the test file, compare
# trains at the chosen rates, and the seed-0 run it takes over from tune is the run it would have trained.
import builtins
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import SHARED, shared

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lab  # noqa: E402
from para_mini.adapters import read_adapter  # noqa: E402

# a few steps on a few hundred sentences: the mechanics, not learning
TINY = dict(max_train=64, max_eval=12, batch_size=4, max_steps=4, eval_every=2, lr=1e-2, max_new_tokens=6, system="",
            no_eos_loss=True)


@pytest.fixture
def tiny_sst2(tmp_path, monkeypatch):
    """SST-2 at tiny settings, its files copied small into tmp_path, the runs there too; returns the files opened
    (resolved paths) and the test file."""
    lines = shared("data", "sst2", "train.tsv").read_text().splitlines()
    (tmp_path / "train.tsv").write_text("\n".join(lines[:401]) + "\n")  # the header and 400 sentences
    test = tmp_path / "test.tsv"
    test.write_text("\n".join(shared("data", "sst2", "dev.tsv").read_text().splitlines()[:41]) + "\n")
    task = lab.TASKS["sst2"] | {"train": str(tmp_path / "train.tsv"), "test": str(test), "settings": TINY, "quick": {}}
    monkeypatch.setitem(lab.TASKS, "sst2", task)  # absolute paths: shared / "data" / path is the path itself
    monkeypatch.setattr(lab, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(lab, "RATES", (1e-2, 3e-2))
    opened = []

    def recording(real):
        def open_(f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                opened.append(Path(f).resolve())
            return real(f, *args, **kwargs)
        return open_

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(io, "open", recording(io.open))  # pathlib's read_text and open go through io.open
    return opened, test.resolve(), tmp_path


def lab_main(tmp_path, *argv):
    lab.main(["--shared", str(SHARED), *argv, "--jobs", "1", "--results", str(tmp_path / "results")])


def test_tune_scores_every_method_at_every_rate_on_dev_and_never_opens_the_test_file(tiny_sst2, capsys):
    opened, test, tmp_path = tiny_sst2
    lab_main(tmp_path, "tune", "--data", "sst2")
    assert (tmp_path / "train.tsv").resolve() in opened  # the recorder sees the files read...
    assert test not in opened  # ...and tune never opened the test file
    result = json.loads((tmp_path / "results" / "tune-sst2.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["para-capsule", "para-last", "ia3", "lora", "bitfit"]
    for row in result["rows"]:
        assert [x["lr"] for x in row["runs"]] == [1e-2, 3e-2] and all(x["seed"] == 0 for x in row["runs"])
        assert all("test" not in x for x in row["runs"])
        for x in row["runs"]:
            assert [h[0] for h in x["history"]] == [2, 4]  # step, train loss, dev loss, dev label acc
            assert x["best_dev_label_acc"] == pytest.approx(max(h[3] for h in x["history"]), abs=0.005)
        best = min(row["runs"], key=lambda x: (-x["best_dev_label_acc"], x["best_dev_loss"], x["lr"]))
        assert row["lr"] == result["chosen"][row["name"]] == best["lr"]
    md = (tmp_path / "results" / "tune-sst2.md").read_text()
    assert "no test file read" in md and "chosen lr" in md and "wall time" in md


def test_compare_trains_at_the_tuned_rates_and_takes_over_exactly_the_tune_run_of_seed_0(tiny_sst2, monkeypatch,
                                                                                          capsys):
    opened, test, tmp_path = tiny_sst2
    monkeypatch.setattr(lab, "REFERENCE", tmp_path / "reference")  # not the committed reference tables
    with pytest.raises(SystemExit, match="run python lab.py tune --data sst2 first"):
        lab_main(tmp_path, "compare", "--data", "sst2", "--seeds", "0")
    assert not (lab.RUNS / "compare-sst2").exists()  # refused before anything trained
    lab_main(tmp_path, "tune", "--data", "sst2")
    chosen = json.loads((tmp_path / "results" / "tune-sst2.json").read_text())["chosen"]
    del opened[:]

    lab_main(tmp_path, "compare", "--data", "sst2", "--seeds", "0")
    assert test in opened  # the final table reads it
    result = json.loads((tmp_path / "results" / "compare-sst2.json").read_text())
    assert result["rates"] == chosen and result["tune"].endswith("tune-sst2.json")
    assert "lr per method as `lab.py tune` chose it on the dev split" in result["settings"]
    assert "the adapter with the best dev label accuracy is kept" in result["settings"]
    assert sorted(result["reused"]) == sorted(chosen)  # every tune run at its chosen rate trained compare's seed 0
    reused = {r["name"]: r["runs"][0] for r in result["rows"]}
    assert all(run["lr"] == chosen[name] and run["reused"] for name, run in reused.items())
    folder = lab.RUNS / "compare-sst2"
    predictions = {name: (folder / f"{name}-seed0" / "predictions_test.jsonl").read_text() for name in chosen}

    # trained again, each seed-0 run keeps the same adapter and gives the same test predictions
    lab_main(tmp_path, "compare", "--data", "sst2", "--seeds", "0", "--retrain")
    result = json.loads((tmp_path / "results" / "compare-sst2.json").read_text())
    assert result["reused"] == {}
    for r in result["rows"]:
        run, before = r["runs"][0], reused[r["name"]]
        assert "reused" not in run and run["adapter"] != before["adapter"]
        assert (run["test"], run["best_dev_label_acc"], run["history"]) == (
            before["test"], before["best_dev_label_acc"], before["history"])
        assert (folder / f"{r['name']}-seed0" / "predictions_test.jsonl").read_text() == predictions[r["name"]]
        a, b = (read_adapter(lab.ROOT / x["adapter"])[2] for x in (run, before))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_task_without_a_tune_result_compares_at_its_single_rate_and_says_so(tmp_path, monkeypatch):
    shared("assets", "stories260K", "hf")
    monkeypatch.setattr(lab, "REFERENCE", tmp_path / "reference")
    seen = {}
    monkeypatch.setattr(lab, "run_table", lambda opts, *a, **k: seen.update(opts=opts, rows=a[3]))
    lab.main(["--shared", str(SHARED), "compare", "--data", "boolq", "--results", str(tmp_path)])
    opts = seen["opts"]
    assert opts.rates == {} and opts.select is None and opts.reuse == {}  # train.py's defaults: dev loss keeps
    assert opts.lr_text.startswith("lr 0.01 for every method (no tune result at ")
    assert "python lab.py tune --data boolq makes one" in lab.settings_line(opts)
    assert len(seen["rows"]) == 5
