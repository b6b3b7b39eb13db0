# train.py end to end on the shared 260K model: it learns, it saves, it resumes exactly, it says what is wrong.
import json
import os
import random
import re
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import shared

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from para_mini import load_adapter, load_model, load_tokenizer  # noqa: E402
from para_mini.adapters import read_adapter  # noqa: E402
from para_mini.data import SYSTEM_PROMPT  # noqa: E402
from para_mini.metrics import score  # noqa: E402
from para_mini import training  # noqa: E402

COLOURS = {"apple": "red", "banana": "yellow", "sky": "blue", "grass": "green", "snow": "white", "coal": "black"}


def write_colour_data(path, n, seed):
    """A task the 260K model can learn in a few steps: name the colour of a thing."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            thing = rng.choice(sorted(COLOURS))
            f.write(json.dumps({"prompt": f"What colour is the {thing}?", "response": COLOURS[thing]}) + "\n")
    return path


def run_argv(tmp_path, *extra):
    weights = shared("assets", "stories260K", "hf")
    data = write_colour_data(tmp_path / "train.jsonl", 96, 0)
    dev = write_colour_data(tmp_path / "dev.jsonl", 24, 1)
    test = write_colour_data(tmp_path / "test.jsonl", 24, 2)
    return ["--data", str(data), "--dev", str(dev), "--test", str(test), "--weights", str(weights),
            "--tokenizer", str(weights / "tokenizer.model"), "--lr", "1e-2", "--batch-size", "8",
            "--max-steps", "12", "--eval-every", "4", "--beam", "1", "--max-new-tokens", "4",
            "--out", str(tmp_path / "run"), "--device", "cpu", *extra]


def run_args(tmp_path, *extra):
    return train.parse_args(run_argv(tmp_path, *extra))


def test_training_lowers_the_dev_loss_writes_an_adapter_and_a_summary_that_reloading_reproduces(tmp_path, capsys):
    args = run_args(tmp_path, "--max-steps", "40", "--eval-every", "8")
    summary = train.train(args)
    out = tmp_path / "run"
    assert (out / "adapter.safetensors").is_file() and (out / "checkpoint.pt").is_file()
    assert json.loads((out / "summary.json").read_text())["test"] == summary["test"]
    printed = capsys.readouterr().out
    dev_losses = [float(line.split("dev loss ")[1].split()[0]) for line in printed.splitlines() if "dev loss" in line]
    assert len(dev_losses) == 5 and dev_losses[-1] < dev_losses[0] - 2.0, dev_losses
    assert summary["test"]["rouge-l"] > 0  # it answers some colours right
    assert "dev rouge-l:" in printed and "test rouge-l:" in printed

    # reloading the adapter into a fresh backbone reproduces the reported metric
    model = load_model(args.weights)
    tok = load_tokenizer(args.tokenizer)
    load_adapter(model, out / "adapter.safetensors")
    from para_mini.data import load_task, one_per_query
    task, test = load_task(args.test)
    test = one_per_query(test)
    preds = training.predict(model, tok, task, test, SYSTEM_PROMPT, args.max_len, args.beam, args.max_new_tokens)
    assert score(task, preds, test) == summary["test"]


def test_an_interrupted_run_resumed_ends_with_the_same_adapter_bit_for_bit(tmp_path):
    straight = run_args(tmp_path, "--out", str(tmp_path / "straight"))
    train.train(straight)

    def ctrl_c_at_step_6(step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # the real Ctrl-C path: stop at the step boundary, checkpoint

    broken = run_args(tmp_path, "--out", str(tmp_path / "broken"))
    with pytest.raises(KeyboardInterrupt):
        train.train(broken, on_step=ctrl_c_at_step_6)
    assert torch.load(tmp_path / "broken" / "checkpoint.pt", weights_only=True)["step"] == 6
    train.train(run_args(tmp_path, "--out", str(tmp_path / "broken"), "--resume"))

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "broken" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for k in a["adapter"]:
        assert torch.equal(a["adapter"][k], b["adapter"][k]), k
    # and the best adapters on disk hold the same tensors (safetensors may order its metadata either way)
    cfg_a, base_a, best_a = read_adapter(tmp_path / "straight" / "adapter.safetensors")
    cfg_b, base_b, best_b = read_adapter(tmp_path / "broken" / "adapter.safetensors")
    assert (cfg_a, base_a) == (cfg_b, base_b) and best_a.keys() == best_b.keys()
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_the_loss_mask_covers_exactly_the_response_tokens_and_eos():
    tok = load_tokenizer(shared("assets", "llama2-tokenizer", "tokenizer.model"))
    pairs = [tok.encode_chat("Is the sky blue?", "yes", SYSTEM_PROMPT), tok.encode_chat("Two plus two?", "four")]
    tokens, targets, lens = training.collate(pairs, tok.pad_id, "cpu")
    for b, (p, r) in enumerate(pairs):
        assert r[-1] == tok.eos_id
        assert lens[b] == len(p)
        supervised = (targets[b] != -100).nonzero().flatten().tolist()
        assert supervised == list(range(len(p) - 1, len(p) + len(r) - 1))  # the last prompt token predicts r[0]
        assert targets[b, supervised].tolist() == r
        assert tokens[b, :len(p) + len(r)].tolist() == p + r


@torch.no_grad()
def test_the_loss_is_the_cross_entropy_of_every_position_with_the_prompt_and_padding_ignored():
    # loss_sum sends only the response positions through the LM head; the textbook loss scores every position and
    # ignores the -100 targets, and the two must agree
    model = load_model(shared("assets", "stories260K", "hf"))
    train.add_adapter(model, train.AdapterConfig("para"))
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)  # a trained-looking adapter, not the identity
    pairs = [([1, 5, 9, 300, 41], [72, 2]), ([1, 8, 8], [11, 12, 13, 2])]
    tokens, targets, lens = training.collate(pairs, 0, "cpu")
    want = torch.nn.functional.cross_entropy(model(tokens, prompt_lens=lens).flatten(0, 1), targets.flatten(),
                                             ignore_index=-100, reduction="sum")
    got = training.loss_sum(model, tokens, targets, lens, torch.autocast("cpu", enabled=False))
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-5) and want > 1.0


def test_the_learning_rate_warms_up_for_6_percent_then_decays_linearly():
    args = train.parse_args(["--data", "x", "--weights", "y", "--lr", "1e-4"])
    lrs = [training.lr_at(s, 100, args.lr, args.warmup) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4 / 6) and lrs[5] == pytest.approx(1e-4)
    assert lrs[6] == pytest.approx(1e-4 * 94 / 94) and lrs[53] == pytest.approx(1e-4 * 47 / 94)
    assert lrs[99] == pytest.approx(1e-4 / 94) and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def bad_run(tmp_path, capsys, data_text, *extra, name="train.jsonl"):
    path = tmp_path / name
    path.write_text(data_text)
    weights = shared("assets", "stories260K", "hf")
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(path), "--weights", str(weights), "--out", str(tmp_path / "run"), *extra])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_get_clear_messages(tmp_path, capsys):
    good = lambda n: "".join(json.dumps({"prompt": f"question {i}", "response": "b"}) + "\n" for i in range(n))
    err = bad_run(tmp_path, capsys, good(3) + "{not json\n")
    assert "train.jsonl:4" in err
    err = bad_run(tmp_path, capsys, json.dumps({"foo": 1, "bar": 2}) + "\n")
    assert "no known task has the fields" in err and "boolq" in err and '"prompt"' in err
    err = bad_run(tmp_path, capsys, "")
    assert "no examples" in err
    err = bad_run(tmp_path, capsys, json.dumps({"question": "q", "passage": "p", "idx": 0}) + "\n")
    assert "no label" in err
    err = bad_run(tmp_path, capsys, good(4), "--dev", str(tmp_path / "nothing.jsonl"))
    assert "nothing.jsonl" in err
    err = bad_run(tmp_path, capsys, good(30), "--weights", str(tmp_path / "no-weights"))
    assert "no-weights" in err
    long = "".join(json.dumps({"prompt": f"{i} " + "word " * 600, "response": "b"}) + "\n" for i in range(30))
    err = bad_run(tmp_path, capsys, long)
    assert "train.jsonl:" in err and "longer than 512 tokens" in err and "--skip-long" in err
    assert "--max-len" not in err  # 512 is already the model's whole context
    err = bad_run(tmp_path, capsys, good(30), "--max-len", "4096")
    assert "exceeds the model's context of 512" in err


SHORT = ("--max-steps", "4", "--eval-every", "4", "--max-eval", "8")


def short_run(tmp_path, *extra):
    return run_args(tmp_path, *SHORT, *extra)


def test_a_second_run_into_the_same_folder_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    train.train(short_run(tmp_path))
    run = tmp_path / "run"
    first = (run / "adapter.safetensors").read_bytes()
    mode = lambda name: oct((run / name).stat().st_mode & 0o777)
    assert mode("adapter.safetensors") == mode("summary.json") == mode("checkpoint.pt")  # the umask's, all three
    with pytest.raises(SystemExit) as e:
        train.main(run_argv(tmp_path, *SHORT))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(run) in err and "--resume" in err and "--overwrite" in err and "--out" in err
    assert (run / "adapter.safetensors").read_bytes() == first  # untouched

    # --overwrite starts anew and leaves nothing of the old run: no test file now, so no test predictions
    args = short_run(tmp_path, "--overwrite", "--seed", "7")
    args.test = None
    train.train(args)
    assert not (run / "predictions_test.jsonl").exists() and (run / "predictions_dev.jsonl").exists()
    assert (run / "adapter.safetensors").read_bytes() != first
    assert json.loads((run / "summary.json").read_text())["settings"]["seed"] == 7


def test_resume_knows_the_same_weights_and_data_under_another_path_and_refuses_other_content(tmp_path, capsys):
    train.train(short_run(tmp_path))
    capsys.readouterr()
    # the same files, named another way (a copy elsewhere, a relative path): the same run, continued
    copy = shutil.copytree(shared("assets", "stories260K", "hf"), tmp_path / "copy of weights")
    train.train(short_run(tmp_path, "--resume", "--weights", os.path.relpath(copy)))
    assert "resumed from" in capsys.readouterr().out

    # other weights (one norm changed) or other data under the same names: refused, naming what changed
    from safetensors.torch import load_file, save_file
    tensors = load_file(copy / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"other settings .*'weights'"):
        train.train(short_run(tmp_path, "--resume", "--weights", str(copy)))
    other = tmp_path / "other.jsonl"
    other.write_text((tmp_path / "train.jsonl").read_text() + json.dumps({"prompt": "The sea?", "response": "blue"}))
    with pytest.raises(ValueError, match=r"other settings .*'data'"):
        train.train(short_run(tmp_path, "--resume", "--data", str(other)))


def test_an_over_long_example_is_named_by_file_and_line_or_skipped_and_counted(tmp_path, capsys):
    lines = write_colour_data(tmp_path / "long.jsonl", 96, 0).read_text().splitlines()
    lines[40] = json.dumps({"prompt": "word " * 600, "response": "red"})  # line 41: no passage to cut
    (tmp_path / "long.jsonl").write_text("\n".join(lines) + "\n")
    long = ("--data", str(tmp_path / "long.jsonl"))
    with pytest.raises(ValueError, match=rf"long.jsonl:41: prompt longer than 512 tokens.*--skip-long"):
        train.train(short_run(tmp_path, *long))
    summary = train.train(short_run(tmp_path, *long, "--skip-long", "--out", str(tmp_path / "skipping")))
    assert summary["skipped_too_long"] == {"train": 1, "dev": 0, "dev predictions": 0, "test predictions": 0}
    assert summary["train_examples"] == 95
    assert "1 too long even so, skipped" in capsys.readouterr().out


def test_evaluation_and_predictions_show_progress(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.Progress, "LOG_SECONDS", 0)
    train.train(short_run(tmp_path, "--eval-batch-size", "4"))
    printed = capsys.readouterr().out
    # dev loss on the first 8 dev examples, predictions once per distinct prompt (6 of them), as the header says
    assert "8 dev / 6 test examples" in printed.splitlines()[0]
    assert "dev loss: 4/8" in printed and "dev predictions: 4/6" in printed and "test predictions: 4/6" in printed
    assert "eta" in printed.split("test predictions: 4/6")[1].splitlines()[0]


def test_no_eos_loss_leaves_exactly_the_final_eos_out_of_the_training_and_dev_loss(tmp_path, monkeypatch):
    tok = load_tokenizer(shared("assets", "stories260K", "hf", "tokenizer.model"))
    responses = {tuple(tok.encode_chat("x", c)[1]) for c in COLOURS.values()}  # each colour's ids, EOS at the end
    seen = []
    collate = training.collate
    seeing = lambda pairs, *a: seen.extend(r for _, r in pairs) or collate(pairs, *a)
    monkeypatch.setattr(train, "collate", seeing)  # the training steps
    monkeypatch.setattr(training, "collate", seeing)  # the dev loss
    for flags, want in (((), responses), (("--no-eos-loss",), {r[:-1] for r in responses})):
        seen.clear()
        train.train(run_args(tmp_path, "--max-steps", "2", "--eval-every", "2", "--overwrite", *flags))
        assert {tuple(r) for r in seen} <= want and len(seen) == 2 * 8 + 24  # two steps of 8, the 24 dev examples


# ------------------------------------------------------------------------------------ the terminal, the flags

def test_on_a_terminal_the_step_lines_stay_the_evaluations_progress_is_erased_and_results_stand_alone(
        tmp_path, capsys, monkeypatch):
    pyte = pytest.importorskip("pyte")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    train.train(run_args(tmp_path, "--max-steps", "8", "--eval-every", "4", "--log-every", "2", "--max-eval", "8",
                         "--eval-batch-size", "4"))
    raw = capsys.readouterr().out
    assert "\rdev loss: 4/8" in raw and "\rdev predictions: 4/6" in raw  # they were shown, then erased
    screen = pyte.Screen(200, 40)
    screen.set_mode(pyte.modes.LNM)  # a terminal's "\n" is CR LF
    pyte.Stream(screen).feed(raw)
    shown = [line.rstrip() for line in screen.display if line.strip()]
    number, progress = r"\d+\.\d{4}", r"lr \S+  [\d,]+ tok/s  elapsed \d+s  eta \d+s"
    want = [r"task generic: 96 train / 8 dev / 6 test examples; 0 passages truncated to fit 512 tokens",
            r"para: 22,220 tunable parameters \(.*\)",
            rf"step 4/8  loss {number}  {progress}", rf"step 4: dev loss {number}  \(best: adapter saved\)",
            rf"step 8/8  loss {number}  {progress}", rf"step 8: dev loss {number}  \((best: adapter saved|no .*)\)",
            r"dev rouge-l: \d+\.\d\d \(6 examples\)", r"test rouge-l: \d+\.\d\d \(6 examples\)",
            r"adapter: .*adapter\.safetensors", r"summary: .*summary\.json"]
    assert len(shown) == len(want), shown
    for line, pattern in zip(shown, want):
        assert re.fullmatch(pattern, line), (line, pattern)


# every numeric flag and a value out of its range (--max-steps 0 is legal: it evaluates the untrained adapter)
OUT_OF_RANGE = [("--max-train", "0"), ("--max-eval", "0"), ("--max-len", "0"), ("--r", "0"), ("--K", "0"),
                ("--lora-alpha", "0"), ("--proj", "-1"), ("--lr", "0"), ("--lr", "-1e-4"), ("--lr", "nan"),
                ("--weight-decay", "-0.1"), ("--warmup", "1.5"), ("--epochs", "0"), ("--max-steps", "-1"),
                ("--batch-size", "0"), ("--grad-accum", "0"), ("--clip", "0"), ("--eval-every", "0"),
                ("--patience", "0"), ("--seed", "-1"), ("--beam", "0"), ("--max-new-tokens", "0"),
                ("--eval-batch-size", "0"), ("--log-every", "0"), ("--batch-size", "two")]


@pytest.mark.parametrize("flag, value", OUT_OF_RANGE)
def test_a_numeric_flag_out_of_its_range_is_one_line_and_exit_2_before_anything_runs(flag, value, tmp_path,
                                                                                     capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "x.jsonl", "--weights", "w", "--out", str(tmp_path / "run"), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: argument {flag}: ") and "--help" in err
    assert not (tmp_path / "run").exists()


def test_every_numeric_flag_has_a_range_and_every_flag_says_what_it_does_and_its_default():
    from para_mini.cli import Range
    actions = [a for a in train.parser()._actions if a.option_strings != ["-h", "--help"]]
    numeric = {a.option_strings[0] for a in actions if isinstance(a.type, Range)}
    assert {a.option_strings[0] for a in actions if a.type in (int, float)} == set()  # no unchecked number
    assert numeric == {flag for flag, _ in OUT_OF_RANGE}  # and each is tried above
    for a in actions:
        assert a.help, a.option_strings
        if a.default not in (None, False) and a.option_strings[0] != "--system":
            assert "default" in a.help, a.option_strings


def test_resume_with_overwrite_and_a_config_made_in_code_out_of_range_are_refused_as_the_flags_are(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "x.jsonl", "--weights", "w", "--resume", "--overwrite"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --resume continues the run")
    cfg = train.parse_args(["--data", "x.jsonl", "--weights", "w"])
    assert cfg == train.TrainConfig(data="x.jsonl", weights="w")  # the flags' defaults are the fields'
    for change, message in [({"lr": 0.0}, "--lr: must be above 0.0, got 0.0"), ({"K": 0}, "--K: must be at least 1"),
                            ({"warmup": 2.0}, "--warmup: must be between 0.0 and 1.0"),
                            ({"resume": True, "overwrite": True}, "--resume continues the run")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            replace(cfg, **change)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_on_a_cpu_only_torch_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "x.jsonl", "--weights", "w", "--device", "cuda"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: argument --device: cuda: ")


def test_max_steps_0_evaluates_the_untrained_adapter(tmp_path):
    summary = train.train(run_args(tmp_path, "--max-steps", "0", "--max-eval", "8"))
    assert summary["steps"] == 0 and summary["test"] is not None
    _, _, tensors = read_adapter(tmp_path / "run" / "adapter.safetensors")
    ups = [t for k, t in tensors.items() if k.endswith("vg.up.weight")]
    assert ups and all(torch.equal(t, torch.zeros_like(t)) for t in ups)  # W_up = 0: PARA at initialisation


def test_a_missing_file_or_a_folder_is_named_by_its_flag_and_a_failed_run_leaves_no_folder(tmp_path, capsys):
    good = write_colour_data(tmp_path / "train.jsonl", 30, 0)
    for extra, message in [(("--dev", str(tmp_path / "nothing.jsonl")), "--dev "),
                           (("--test", str(tmp_path / "nothing.jsonl")), "--test "),
                           (("--tokenizer", str(tmp_path / "tok.model")), "--tokenizer "),
                           (("--data", str(tmp_path)), f"--data {tmp_path} is a folder"),
                           (("--weights", str(tmp_path / "no-weights")), "--weights "),
                           (("--max-len", "4096"), "exceeds the model's context of 512"),  # after the weights load
                           (("--K", "5"), "r % K must be 0")]:
        err = bad_run(tmp_path, capsys, good.read_text(), *extra)
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "run").exists(), extra


def test_resume_on_a_checkpoint_that_cannot_be_read_is_one_line_and_exit_2(tmp_path, capsys):
    import argparse
    train.train(short_run(tmp_path))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    whole = ckpt.read_bytes()
    foreign = (tmp_path / "run" / "adapter.safetensors").read_bytes()[:64]
    for damage, message in [(lambda: ckpt.write_bytes(whole[:len(whole) // 2]), "cannot read it"),
                            (lambda: ckpt.write_bytes(b""), "cannot read it"),
                            (lambda: ckpt.write_bytes(foreign), "cannot read it"),
                            (lambda: torch.save({"step": 4, "x": argparse.Namespace(a=1)}, ckpt),
                             "refused to unpickle"),
                            (lambda: torch.save({"step": 4}, ckpt), "not a checkpoint written by train.py")]:
        damage()
        with pytest.raises(SystemExit) as e:
            train.main(run_argv(tmp_path, *SHORT, "--resume"))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: --resume: {ckpt}") and message in err, err
        assert err.count("\n") == 1 and "--overwrite" in err


def test_a_second_ctrl_c_quits_at_once_and_says_what_was_kept(tmp_path, capsys, monkeypatch):
    def ctrl_c_twice_at_step_6(step):
        if step == 6:  # the checkpoint on disk is step 4's (--eval-every 4)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "train", lambda args: train_run(args, on_step=ctrl_c_twice_at_step_6))
    with pytest.raises(SystemExit) as e:
        train.main(run_argv(tmp_path))
    assert e.value.code == 130
    last = capsys.readouterr().out.splitlines()[-1]
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert last == f"interrupted after step 6 of 12: {ckpt} holds step 4; continue with --resume"
    assert torch.load(ckpt, weights_only=True)["step"] == 4

    monkeypatch.setattr(train, "load_model", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(train, "train", train_run)
    with pytest.raises(SystemExit) as e:
        train.main(run_argv(tmp_path, "--out", str(tmp_path / "other")))
    assert e.value.code == 130
    assert "interrupted before training started: this run wrote no file" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


train_run = train.train


def test_save_format_peft_also_writes_the_best_adapter_as_peft_s_directory_and_refuses_para_at_once(tmp_path):
    train.train(run_args(tmp_path, "--method", "lora", "--max-steps", "2", "--eval-every", "2",
                         "--save-format", "peft"))
    out = tmp_path / "run"
    ours, peft_dir = read_adapter(out / "adapter.safetensors"), read_adapter(out / "peft")
    assert peft_dir[0] == ours[0] and ours[2].keys() == peft_dir[2].keys()
    assert all(torch.equal(ours[2][k], peft_dir[2][k]) for k in ours[2])
    with pytest.raises(ValueError, match="--save-format peft: a para adapter has no PEFT form"):
        train.train(run_args(tmp_path, "--out", str(tmp_path / "para"), "--save-format", "peft"))
    assert not (tmp_path / "para" / "checkpoint.pt").exists()


def sst2_sample(tmp_path, n=400):
    """The first n SST-2 training sentences: a labelled task for --select-by label-acc."""
    lines = shared("data", "sst2", "train.tsv").read_text().splitlines()[:n + 1]  # with the header
    path = tmp_path / "sst2_train.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_select_by_label_acc_keeps_the_evaluation_with_the_best_dev_label_accuracy_and_no_test_keeps_the_split(
        tmp_path, monkeypatch, capsys):
    from para_mini.data import load_task, one_per_query, split
    from para_mini.metrics import label_first_accuracy
    weights = shared("assets", "stories260K", "hf")
    data = sst2_sample(tmp_path)
    test = tmp_path / "test.tsv"
    test.write_text(data.read_text())  # any labelled file: the point is whether the run reads it
    common = ["--data", str(data), "--weights", str(weights), "--lr", "3e-2", "--batch-size", "8", "--max-steps",
              "12", "--eval-every", "3", "--beam", "1", "--max-new-tokens", "6", "--max-eval", "24", "--system", "",
              "--no-eos-loss", "--device", "cpu", "--seed", "3", "--select-by", "label-acc"]
    opened = []
    real_open = open
    def recording_open(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            opened.append(Path(f).resolve())
        return real_open(f, *args, **kwargs)

    monkeypatch.setattr("builtins.open", recording_open)
    blind = train.train(train.parse_args(common + ["--no-test", "--out", str(tmp_path / "blind")]))
    assert data.resolve() in opened and test.resolve() not in opened  # the recorder sees the files train.py reads
    seen = train.train(train.parse_args(common + ["--test", str(test), "--out", str(tmp_path / "seen")]))
    assert test.resolve() in opened
    printed = capsys.readouterr().out
    assert "dev label acc" in printed and "0 test examples" in printed

    # --no-test trains on what --test trains on (the seeded split keeps no test part either way), and the test file
    # changes nothing the dev selection sees: the same evaluations, the same adapter kept
    assert blind["train_examples"] == seen["train_examples"] == len(split(load_task(data)[1], 0.1, 0.0, seed=3)[0])
    assert blind["history"] == seen["history"] and "test" not in blind and "test" in seen
    a, b = (read_adapter(tmp_path / name / "adapter.safetensors")[2] for name in ("blind", "seen"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    history = blind["history"]
    assert [h["step"] for h in history] == [3, 6, 9, 12]
    assert all(h["train_loss"] > 0 and h["dev_loss"] > 0 and 0 <= h["dev_label_acc"] <= 100 for h in history)
    best = min(history, key=lambda h: (-h["dev_label_acc"], h["dev_loss"]))
    assert (blind["best_step"], blind["best_dev_label_acc"], blind["best_dev_loss"]) == (
        best["step"], best["dev_label_acc"], best["dev_loss"])
    assert json.loads((tmp_path / "blind" / "summary.json").read_text())["history"] == history

    # the kept adapter, reloaded, answers the dev examples with that accuracy
    args = train.parse_args(common + ["--no-test"])
    task, examples = load_task(data)
    dev = one_per_query(split(examples, 0.1, 0.0, seed=3)[1])[:24]
    model = load_model(weights)
    load_adapter(model, tmp_path / "blind" / "adapter.safetensors")
    preds = training.predict(model, load_tokenizer(train.find_tokenizer(weights)), task, dev, "", args.max_len,
                             args.beam, args.max_new_tokens)
    assert label_first_accuracy(task, preds, [ex.response for ex in dev]) == blind["best_dev_label_acc"]


def test_no_test_refuses_a_test_file_and_label_acc_on_a_generation_task_keeps_dev_loss(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(run_argv(tmp_path, "--no-test"))
    assert "--no-test reads no test file" in capsys.readouterr().err
    summary = train.train(run_args(tmp_path, "--select-by", "label-acc", "--max-steps", "4", "--eval-every", "2"))
    assert "has no labels, so the best adapter is kept by dev loss" in capsys.readouterr().out
    assert summary["select_by"] == "dev-loss" and "best_dev_label_acc" not in summary
    assert [sorted(h) for h in summary["history"]] == [["dev_loss", "step", "train_loss"]] * 2
    assert summary["best_dev_loss"] == min(h["dev_loss"] for h in summary["history"])
