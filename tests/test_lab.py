# The lab's instruments (lab.py): the vector statistics, the budget matching, the figures and the attention maps are
# checked against hand-worked numbers, brute force, the PNGs written, and Hugging Face's own attention.
import json
import math
import shutil
import struct
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED, shared

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lab  # noqa: E402
from para_mini import AdapterConfig, add_adapter, count_parameters, load_model  # noqa: E402
from para_mini.metrics import label_first  # noqa: E402
from para_mini.params import PRESETS  # noqa: E402

TINY = PRESETS["stories260K"]


# ------------------------------------------------------------------------------------------- vector statistics

def test_vectors_that_are_the_same_for_every_prompt_have_zero_spread():
    l = torch.tensor([[2.0, 1.0], [2.0, 1.0], [2.0, 1.0]])  # three prompts, one constant vector: (IA)^3
    s = lab.vector_spread(l)
    assert s["spread"] == 0 and s["prompt_share"] == 0
    assert s["off_identity"] == pytest.approx(0.5)  # |2 - 1| and |1 - 1|, averaged


def test_vector_spread_matches_hand_worked_values():
    # mean (2, 1), |mean| = sqrt(5); deviations (-1, 0), (1, 0) of norm 1; |l - 1| entries 0, 0, 2, 0;
    # |l_p - 1| = 0 and 2, mean 1, so the whole adjustment is prompt-dependent
    s = lab.vector_spread(torch.tensor([[1.0, 1.0], [3.0, 1.0]]))
    assert s["spread"] == pytest.approx(1 / math.sqrt(5))
    assert s["off_identity"] == pytest.approx(0.5)
    assert s["prompt_share"] == pytest.approx(1.0)
    # a prompt-dependent part on top of a constant one: l = (1 + 2, 1) and (1 + 4, 1)
    s = lab.vector_spread(torch.tensor([[3.0, 1.0], [5.0, 1.0]]))
    assert s["spread"] == pytest.approx(1 / math.sqrt(17))  # deviations of norm 1, mean (4, 1)
    assert s["off_identity"] == pytest.approx((2 + 4) / 4)
    assert s["prompt_share"] == pytest.approx(1 / 3)  # |l_p - 1| = 2 and 4


def test_the_identity_vectors_have_no_spread_and_no_share():
    s = lab.vector_spread(torch.ones(4, 3))
    assert s == {"spread": 0.0, "off_identity": 0.0, "prompt_share": 0.0}


def test_captured_vectors_are_one_per_prompt_and_do_not_depend_on_the_batch(tmp_path):
    model = load_model(shared("assets", "stories260K", "hf"))
    add_adapter(model, AdapterConfig("para", r=12))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.layers:
            layer.vg.up.weight.normal_(0, 0.5)  # a trained-looking generator, not the identity
    prompts = [[1, 5, 9, 30, 7], [1, 40, 41], [1, 3, 3, 3, 3, 3, 3, 8]]
    together = lab.capture_vectors(model, prompts)
    alone = [lab.capture_vectors(model, [p]) for p in prompts]
    assert set(together) == {(i, s) for i in range(5) for s in ("q", "v", "u", "z")}  # z: the pooled summary
    assert together[(0, "u")].shape == (3, 172) and together[(2, "q")].shape == (3, 64)
    assert together[(4, "z")].shape == (3, 12)
    for key, l in together.items():  # right padding never reaches the pooler
        torch.testing.assert_close(l, torch.cat([a[key] for a in alone]), rtol=1e-5, atol=1e-6)
    assert lab.vector_spread(together[(0, "v")])["spread"] > 0


def test_the_lab_scores_the_label_an_answer_starts_with():
    assert label_first("sst2", " Positive8 p") == "positive"  # train.py's whole-word parse says None here
    assert label_first("sst2", "negative$ po") == "negative"
    assert label_first("boolq", "no") == "no" and label_first("boolq", "yes") == "yes"
    assert label_first("sst2", "pos") is None and label_first("boolq", "maybe") is None


# -------------------------------------------------------------------------------------------------- the noise

def agresti_coull_variance(p, n):  # in points^2: two right and two wrong answers added
    p = (p * n + 2) / (n + 4)
    return 1e4 * p * (1 - p) / (n + 4)


def test_one_run_has_the_binomial_interval_of_its_test_size():
    # 240 of 400 right: p~ = 242 / 404, standard error sqrt(p~(1 - p~) / 404) = 2.438 points, half-width 4.779
    low, high = lab.interval([60.0], 400)
    half = 1.959964 * math.sqrt(242 / 404 * 162 / 404 / 404) * 100
    assert half == pytest.approx(4.779, abs=1e-3)
    assert (low, high) == pytest.approx((60 - half, 60 + half), abs=1e-9)


def test_a_perfect_score_still_has_an_interval_and_it_stays_within_0_and_100():
    low, high = lab.interval([100.0], 50)  # p~ = 52 / 54: the interval is not a single point
    assert high == 100 and low == pytest.approx(100 - 1.959964 * math.sqrt(52 / 54 * 2 / 54 / 54) * 100)
    assert lab.interval([0.0, 0.0], 50)[0] == 0


def test_the_seeds_spread_widens_the_interval():
    # seeds 58, 60, 62: mean 60, sample variance 4, of the mean 4 / 3, plus the binomial noise of 400 examples
    low, high = lab.interval([58.0, 60.0, 62.0], 400)
    assert high - 60 == pytest.approx(1.959964 * math.sqrt(4 / 3 + agresti_coull_variance(0.6, 400)), abs=1e-9)
    assert 60 - low == pytest.approx(high - 60)
    assert high - low > lab.interval([60.0, 60.0, 60.0], 400)[1] - lab.interval([60.0, 60.0, 60.0], 400)[0]


def test_a_verdict_calls_a_difference_real_only_beyond_the_noise():
    n = 400  # majority 52.0 against a method at 60 on every seed: noise 1.96 x sqrt(5.94 + 6.18) = 6.82
    noise = 1.959964 * math.sqrt(agresti_coull_variance(0.6, n) + agresti_coull_variance(0.52, n))
    assert noise == pytest.approx(6.82, abs=0.01)
    real = lab.verdict("LoRA", [60.0, 60.0, 60.0], "the majority class", [52.0], n)
    assert real.startswith("LoRA is 8.0 points above the majority class: larger than the noise (±6.8)")
    close = lab.verdict("LoRA", [56.0, 56.0, 56.0], "the majority class", [52.0], n)
    assert "+4.0 points, within the noise" in close and "no difference shown" in close
    below = lab.verdict("BitFit", [44.0], "the majority class", [52.0], 2000)  # a bigger test set: less noise
    assert below.startswith("BitFit is 8.0 points below the majority class: larger than the noise")


def test_the_verdicts_compare_every_row_with_the_majority_and_with_the_first_row():
    rows = [{"method": m, "runs": [{"test": a} for a in accs]}
            for m, accs in (("PARADE", [70.0, 71.0, 69.0]), ("LoRA", [70.5, 69.5, 70.0]), ("BitFit", [52.0] * 3))]
    lines = lab.verdicts(rows, {"test": 52.0, "examples": 400})
    assert len(lines) == 5  # three against the majority, two against PARADE
    assert "PARADE is 18.0 points above the majority class" in lines[0]
    assert "within the noise" in lines[2]  # BitFit at the majority class
    assert lines[3].startswith("LoRA vs PARADE: +0.0 points, within the noise")
    assert lines[4].startswith("BitFit is 18.0 points below PARADE: larger than the noise")


# ----------------------------------------------------------------------------------------------- budgets

@pytest.mark.parametrize("method, settings", [("para", {}), ("para", {"pooler": "last"}),
                                              ("para", {"targets": ("q", "k", "v", "g", "u")}),
                                              ("para", {"targets": ("q", "v")}), ("lora", {}), ("ia3", {}),
                                              ("bitfit", {})])
@pytest.mark.parametrize("target", [5_000, 22_220, 40_000])
def test_the_matched_budget_is_the_closest_any_knob_value_reaches(method, settings, target):
    cfg = lab.match_budget(TINY, target, method, **settings)
    knob = lab.KNOB[method]
    step = lab.knob_step(cfg)
    every = [count_parameters(TINY, AdapterConfig(method, **settings, **{knob: v})) for v in range(step, 97, step)]
    assert abs(count_parameters(TINY, cfg) - target) == min(abs(n - target) for n in every)
    assert all(getattr(cfg, k) == v for k, v in settings.items())


def test_the_default_budget_gives_the_papers_choices_on_the_260k_model():
    target = count_parameters(TINY, AdapterConfig("para", r=12))
    assert target == 22_220
    assert lab.match_budget(TINY, target, "para").r == 12
    assert lab.match_budget(TINY, target, "para", targets=("q", "k", "v", "g", "u")).r == 8  # the paper's PARADE-3
    assert lab.match_budget(TINY, target, "para", targets=("q", "v")).r == 24  # the paper's PARADE-4
    assert lab.match_budget(TINY, target, "lora").r == 4  # the paper's LoRA rank


def test_the_projected_ia3_and_bitfit_reach_the_papers_7b_budgets():
    b7 = PRESETS["7b"]
    assert count_parameters(b7, AdapterConfig("ia3", proj=16)) == 9_831_936  # the paper's 9.8M
    assert count_parameters(b7, AdapterConfig("bitfit", proj=8)) == 10_880_768  # the paper's 10.9M
    assert lab.match_budget(b7, 9_800_000, "ia3").proj == 16
    assert lab.match_budget(b7, 10_900_000, "bitfit").proj == 8


# ----------------------------------------------------------------------------------------------- figures

def tiny_result(name: str, history=True) -> dict:
    """A result as lab.py writes it, two rows of two seeds, small enough to draw in a moment."""
    runs = lambda accs: [{"seed": s, "test": a, "test_strict": a, "best_dev_loss": 0.1, "lr": 1e-2,
                          "best_dev_label_acc": a, "history": [[50, 0.5, 0.2, a - 5], [100, 0.3, 0.1, a]]
                          if history else []} for s, a in enumerate(accs)]
    return {"name": name, "title": "a title", "baseline": {"label": "positive", "test": 50.0, "examples": 100},
            "rows": [{"method": "PARADE", "runs": runs([60.0, 62.0])}, {"method": "LoRA", "runs": runs([55.0, 58.0])}]}


def png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])  # width, height


def test_a_table_gets_its_interval_plot_and_its_learning_curves(tmp_path):
    figures = pytest.importorskip("lab_figures", reason="the figures need matplotlib: pip install -e \".[lab]\"")
    paths = figures.draw(tiny_result("compare-sst2"), tmp_path)
    assert paths == [tmp_path / "compare-sst2.png", tmp_path / "compare-sst2-curves.png"]
    assert all(min(png_size(p)) > 100 for p in paths)
    # runs kept by the dev loss (BoolQ) have no dev label accuracy: the curves are the dev loss panel alone
    result = tiny_result("sweep-boolq")
    for run in (r for row in result["rows"] for r in row["runs"]):
        run["history"] = [h[:3] + [None] for h in run["history"]]
    one, two = figures.draw(result, tmp_path / "loss")[1], paths[1]
    assert png_size(one)[0] < 0.7 * png_size(two)[0] and png_size(one)[1] == png_size(two)[1]
    # no history (an older result) or one evaluation (a quick run): no curves, quietly
    assert figures.draw(tiny_result("sweep-boolq", history=False), tmp_path) == [tmp_path / "sweep-boolq.png"]
    assert figures.draw({"name": "compare-sst2", "rows": []}, tmp_path / "empty") == []


def test_attention_maps_are_drawn_one_png_per_layer(tmp_path):
    figures = pytest.importorskip("lab_figures", reason="the figures need matplotlib: pip install -e \".[lab]\"")
    T = 12
    probs = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]  # causal rows that sum to 1
    maps = {"PARADE": {2: np.stack([probs] * 8)}, "(IA)^3": {2: np.stack([probs.T.copy()] * 8)}}
    path = figures.attention(tmp_path / "a" / "layer2.png", maps, 2, [0, 4], system_end=5)
    assert path.is_file() and min(png_size(path)) > 100


def test_without_matplotlib_a_command_writes_its_table_and_says_once_how_to_get_the_figures(tmp_path, monkeypatch,
                                                                                               capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails, as when it is not installed
    monkeypatch.delitem(sys.modules, "lab_figures", raising=False)
    lab.figures.cache_clear()
    try:
        opts = lab.parse_args(["compare", "--data", "sst2", "--quick", "--results", str(tmp_path)])
        for name in ("compare-sst2-quick", "sweep-boolq-quick"):
            lab.write_result(opts, name, "a title", 3.0, "| a | table |", tiny_result(name))
        out = capsys.readouterr().out
        assert out.count("| a | table |") == 2 and sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json",
                                                                                                    ".md", ".md"]
        assert out.count('matplotlib is not installed (pip install -e ".[lab]" adds it)') == 1
        with pytest.raises(SystemExit, match="the figures need matplotlib"):
            lab.cmd_figures(lab.parse_args(["figures", "--results", str(tmp_path)]))
    finally:
        lab.figures.cache_clear()  # the next test finds matplotlib again


# ----------------------------------------------------------------------------------------------- attention

def trained_looking_para(model):
    add_adapter(model, AdapterConfig("para", r=12, targets=("q", "k", "v", "u")))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.layers:
            layer.vg.up.weight.normal_(0, 0.5)
    return model


def test_recomputed_attention_reproduces_the_attention_modules_output_under_para():
    model = trained_looking_para(load_model(shared("assets", "stories260K", "hf")))
    tokens = torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    caught = {}

    def keep(module, args, kwargs, out):
        caught[module] = (args, out)

    layer = model.layers[3].attention
    handle = layer.register_forward_hook(keep, with_kwargs=True)
    maps = lab.attention_maps(model, tokens, prompt_lens=torch.tensor([6, 9]))
    handle.remove()
    probs = maps[3]
    assert probs.shape == (2, 8, 11, 11)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 8, 11))  # every row is a distribution
    assert (probs.triu(1) == 0).all()  # causal: no position sees a later one

    (x, cos, sin, mask, l), out = caught[layer][0][:5], caught[layer][1]
    B, T, _ = x.shape
    assert "v" in l  # PARA scales V (Eq. 4): l_v * V
    v = (l["v"] * layer.wv(x)).view(B, T, layer.n_kv_heads, layer.head_dim).transpose(1, 2)
    v = v.repeat_interleave(layer.n_heads // layer.n_kv_heads, dim=1)
    mixed = (probs @ v).transpose(1, 2).reshape(B, T, -1)
    torch.testing.assert_close(layer.wo(mixed), out, rtol=1e-5, atol=1e-6)


def test_attention_maps_with_an_identity_adapter_equal_hugging_face_eager_attentions():
    transformers = pytest.importorskip("transformers")
    path = shared("assets", "stories260K", "hf")
    # in float64; both compute RoPE's angles in fp32 (rounded differently), which leaves ~1e-7
    hf = transformers.LlamaForCausalLM.from_pretrained(str(path), attn_implementation="eager").double().eval()
    model = load_model(path, dtype=torch.float64)
    add_adapter(model, AdapterConfig("para", r=12))  # at initialisation: every vector is ones
    tokens = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    ours = lab.attention_maps(model, tokens)
    with torch.no_grad():
        theirs = hf(tokens, output_attentions=True).attentions
    assert len(theirs) == len(ours) == 5
    for i, a in enumerate(theirs):
        torch.testing.assert_close(ours[i], a, rtol=1e-5, atol=1e-6)


def test_figures_draws_the_attention_maps_again_from_the_adapters_a_result_names(tmp_path, capsys):
    pytest.importorskip("lab_figures", reason="the figures need matplotlib: pip install -e \".[lab]\"")
    from para_mini import save_adapter
    from para_mini.adapters import adapter_state
    paths = {}
    for method, cfg in (("para", AdapterConfig("para", r=12)), ("ia3", AdapterConfig("ia3", targets=("k", "v", "u")))):
        model = load_model(shared("assets", "stories260K", "hf"))
        add_adapter(model, cfg)
        torch.manual_seed(0)
        with torch.no_grad():  # trained-looking values, so that the two adapters attend differently
            for tensor in adapter_state(model).values():
                tensor.add_(0.3 * torch.randn_like(tensor))
        paths[method] = tmp_path / f"{method}.safetensors"
        save_adapter(model, paths[method])
    argv = ["attention", "--quick", "--layers", "1", "--heads", "2", "--para", str(paths["para"]), "--ia3",
            str(paths["ia3"])]
    opts = lab.parse_args(["--shared", str(SHARED)] + argv + ["--results", str(tmp_path)])
    maps, prompt, _, sys_end = lab.attention_of(opts, paths["para"], paths["ia3"])
    stats = lab.attention_stats(maps, sys_end)
    assert not np.allclose(maps["PARADE"][1], maps["(IA)^3"][1])
    result = {"name": "attention-sst2-quick", "command": "python lab.py " + " ".join(argv), "stats": stats,
              "para": lab.shown(paths["para"]), "ia3": lab.shown(paths["ia3"])}
    (tmp_path / "attention-sst2-quick.json").write_text(json.dumps(result))
    lab.cmd_figures(lab.parse_args(["--shared", str(SHARED), "figures", "--results", str(tmp_path)]))
    assert "attention-sst2-quick: the maps computed again give the JSON's numbers exactly" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "attention-sst2-quick").iterdir()] == ["layer1.png"]
    # a result whose adapters are gone is left alone, with the command that makes them again
    paths["ia3"].unlink()
    lab.cmd_figures(lab.parse_args(["--shared", str(SHARED), "figures", "--results", str(tmp_path)]))
    assert "not drawn, its adapters are not here" in capsys.readouterr().out


def test_the_system_prompt_ends_where_the_chat_template_says():
    from para_mini import load_tokenizer
    from para_mini.data import SYSTEM_PROMPT
    tok = load_tokenizer(shared("assets", "stories260K", "tok512.model"))
    prompt, _ = tok.encode_chat("the film is great", None, SYSTEM_PROMPT)
    end = lab.segments(tok, prompt)
    assert tok.decode(prompt[:end]).endswith("<</SYS>>") and "film" in tok.decode(prompt[end:])


def test_lab_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        lab.parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("compare", "tune", "ablations", "sweep", "vectors", "attention", "figures"))


def test_a_runs_rate_reaches_that_run_alone_and_flags_after_dashes_win():
    def lr(argv, method, rate=None):
        opts = lab.parse_args(argv)
        return lab.run_config(opts, AdapterConfig(method), 0, Path("out"), lr=rate).lr
    sst2 = ["compare", "--data", "sst2"]
    # no rate is written into the task: every method trains at the flags' rate unless tune chose another
    assert (lr(sst2, "lora"), lr(sst2, "ia3"), lr(sst2, "para"), lr(sst2, "bitfit")) == (1e-2,) * 4
    assert lr(sst2, "lora", 3e-3) == 3e-3 and lr(["compare", "--data", "boolq"], "lora") == 1e-2
    assert lr(sst2 + ["--", "--lr", "5e-4"], "lora") == 5e-4
    assert lr(sst2 + ["--", "--lr", "5e-4"], "lora", 3e-2) == 5e-4


def test_tune_runs_without_a_test_file_and_on_compares_train_dev_split():
    opts = lab.parse_args(["tune", "--data", "sst2"])
    args = lab.run_config(opts, AdapterConfig("para"), 0, Path("out"), lr=3e-2, test=False, select="label-acc")
    assert args.test is None and args.no_test and args.select_by == "label-acc" and args.lr == 3e-2
    assert not any("dev.tsv" in str(v) for v in asdict(args).values())  # SST-2's test file
    assert opts.seeds == [0] and lab.RATES == (3e-3, 1e-2, 3e-2)


# ----------------------------------------------------------------------------------------------------- reruns

ROOT = Path(__file__).resolve().parents[1]


def test_a_rerun_writes_its_table_beside_the_runs_git_ignored_and_leaves_the_reference_alone(tmp_path, capsys):
    opts = lab.parse_args(["compare", "--data", "sst2", "--quick"])
    assert opts.results == ROOT / "lab" / "runs" / "results" and lab.REFERENCE == ROOT / "lab" / "results"
    assert "/lab/runs/" in (ROOT / ".gitignore").read_text().splitlines()
    if (ROOT / ".git").exists() and shutil.which("git"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(opts.results / "compare-sst2-quick.md")], cwd=ROOT)
        assert ignored.returncode == 0
    # refreshing the reference is asked for by --results; its table names the command a student reruns
    refresh = lab.parse_args(["compare", "--data", "sst2", "--quick", "--results", "lab/results"])
    assert refresh.results == Path("lab/results") and refresh.command == opts.command
    assert opts.command == "python lab.py compare --data sst2 --quick"
    opts.results = tmp_path / "mine"
    lab.write_result(opts, "compare-sst2-quick", "a title", 3.0, "| a | table |", {"rows": []})
    assert sorted(p.name for p in opts.results.iterdir()) == ["compare-sst2-quick.json", "compare-sst2-quick.md"]
    out = capsys.readouterr().out
    assert "the reference: lab/results/compare-sst2-quick.md" in out


def test_every_training_run_has_one_thread_whatever_the_jobs_and_cores(monkeypatch):
    # the thread count changes the order of floating-point sums, and a quick run's accuracy with it
    seen = []
    monkeypatch.setattr(lab, "train_one", lambda opts, *job: seen.append(torch.get_num_threads()) or len(seen))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        opts = lab.parse_args(["compare", "--jobs", "1"])
        assert lab.train_many(opts, [("table", "name", None, 0, ())] * 2) == [1, 2] and seen == [1, 1]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("argv", [["compare", "--jobs", "0"], ["compare", "--seeds", "-1"],
                                  ["compare", "--target", "0"], ["sweep", "--r", "0"], ["vectors", "--n", "0"],
                                  ["attention", "--index", "-1"], ["attention", "--layers", "-1"],
                                  ["attention", "--heads", "-1"], ["attention", "--scale", "0"],
                                  ["compare", "--", "--max-steps", "-1"]])
def test_a_lab_flag_out_of_its_range_is_one_line_and_exit_2(argv, capsys):
    if "--" in argv:
        shared("assets", "stories260K", "hf")  # train.py's flags are checked once the shared model is found
    with pytest.raises(SystemExit) as e:
        lab.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: argument ") and err.count("\n") == 1
