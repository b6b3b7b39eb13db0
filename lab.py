"""The teaching lab: the paper's comparisons in miniature, in minutes on a CPU, and a look inside PARA.

    python lab.py tune --data sst2      # each method's learning rate, chosen on the dev split
    python lab.py compare --data sst2   # Table 1: PARA vs (IA)^3, LoRA, BitFit at one parameter budget
    python lab.py ablations             # Table 6: PARADE against PARADE-1 .. PARADE-4
    python lab.py sweep                 # Figure 2: the bottleneck r
    python lab.py vectors               # do the generated vectors depend on the prompt?
    python lab.py attention             # Figures 3-6: attention maps under PARADE and (IA)^3
    python lab.py figures               # every figure of lab/results drawn again from its results

Everything trains on the shared 260K-parameter TinyStories model (the LLaMA-2 architecture at toy scale) through
train.py, with settings small enough that each table takes under 30 minutes on a 2-core CPU. Each command prints its
table and writes it as <name>.md and .json to lab/runs/results/ (git-ignored, beside the runs themselves in
lab/runs/), with its figures as <name>.png when matplotlib is installed (pip install -e ".[lab]", lab_figures.py);
lab/results/ holds the reference tables that LAB.md shows, and --results lab/results refreshes them.
"""
import argparse
import contextlib
import functools
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

import train
from para_mini import AdapterConfig, count_parameters, find_tokenizer, load_adapter, load_model, load_tokenizer
from para_mini.cli import SEED, Parser, at_least
from para_mini.data import SYSTEM_PROMPT, load_task, one_per_query
from para_mini.metrics import label_first_accuracy, score
from para_mini.model import VectorGenerator, apply_rope
from para_mini.runs import RUN_FILES, SAME_RUN, save_predictions, save_summary
from para_mini.tokenizer import B_INST, B_SYS, E_SYS
from para_mini.training import MAX_NEW_TOKENS, predict, tokenize

ROOT = Path(__file__).resolve().parent
# lab/results: the reference tables LAB.md shows (committed); a rerun writes to lab/runs/results unless told otherwise
REFERENCE, RUNS = ROOT / "lab" / "results", ROOT / "lab" / "runs"

# Each task's files and training settings (LAB.md says how they were found and what each did). GLUE's SST-2 test
# split has no labels, so its labelled dev.tsv (872 examples, all used) is the test set and train.py takes a seeded
# 10% of train.tsv as the dev set. SST-2 needs 1,400 steps to learn at this scale, and leaves out the paper's
# 61-token system prompt, which is most of each sequence (42% of the compute); the vectors and attention exercises
# train with it. BoolQ passages are cut to fit 256 tokens; the 260K model does not read them (LAB.md), so
# its runs stay short. A model this small wants a learning rate far above the paper's. Generation stops at the
# longest label's length (SST-2: "positive" is 6 tokens, BoolQ: "yes" and "no" are 2), because the model rarely
# learns to emit EOS after the label (see para_mini.metrics.label_first). "quick": the classroom version, five runs in
# under a minute on a 2-core CPU (SST-2: 50 steps, from 2,000 training examples, more than 50 steps of 16 read).
# "tuned": compare wants each method's rate from `lab.py tune` (chosen on the dev split); the other tasks train every
# method at the flags' single rate until they have a tune result.
TASKS = {
    "sst2": {"train": "sst2/train.tsv", "dev": None, "test": "sst2/dev.tsv", "tuned": True,
             "settings": dict(max_train=20000, max_eval=872, batch_size=16, max_steps=1400, eval_every=350, lr=1e-2,
                              max_new_tokens=6, system="", no_eos_loss=True),
             "quick": dict(max_steps=50, max_eval=200, eval_every=50, max_train=2000)},
    "boolq": {"train": "boolq/train.jsonl", "dev": "boolq/dev.jsonl", "test": "boolq/test.jsonl",
              "settings": dict(max_eval=400, max_len=256, batch_size=16, max_steps=120, eval_every=40, lr=1e-2,
                               max_new_tokens=2),
              "quick": dict(max_steps=40, max_eval=100, eval_every=40)},
}
SEEDS = (0, 1, 2)
# tune's learning rates: steps of about 3x around 1e-2, the rate the 260K model was found to learn at (LAB.md), wide
# enough to hold the rates the first SST-2 table gave LoRA (3e-3) and (IA)^3 (2e-2) after looking at the test set
RATES = (3e-3, 1e-2, 3e-2)
# The size knob each method's budget is matched with: PARA's bottleneck, LoRA's rank, and for (IA)^3 and BitFit the
# projection of the paper's Section 4.1 (their original form has a fixed size: one vector per target).
KNOB = {"para": "r", "lora": "r", "ia3": "proj", "bitfit": "proj"}


# ------------------------------------------------------------------------------------------- matched budgets

def knob_step(cfg: AdapterConfig) -> int:
    # the capsule poolers split r into K capsules, so r moves in steps of K
    return cfg.K if cfg.method == "para" and cfg.pooler in ("capsule", "routing") else 1


def match_budget(args, target: int, method: str, **settings) -> AdapterConfig:
    """The adapter of `method` (other settings fixed) whose tunable parameter count is closest to `target`.

    Counts grow with the knob, so we walk it up until the count passes the target; a tie goes to the smaller one.
    """
    knob = KNOB[method]
    cfg = AdapterConfig(method, **{knob: settings.get("K", 4) if method == "para" else 1} | settings)
    step = knob_step(cfg)
    best, value = None, step
    while True:
        candidate = replace(cfg, **{knob: value})
        n = count_parameters(args, candidate)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (candidate, n)
        if n >= target:
            return best[0]
        value += step


def describe(cfg: AdapterConfig) -> str:
    s = f"targets {','.join(cfg.targets)}"
    if cfg.method == "para":
        s += f", r={cfg.r}, pooler {cfg.pooler}" + (f", K={cfg.K}" if cfg.pooler in ("capsule", "routing") else "")
    if cfg.method == "lora":
        s += f", r={cfg.r}"
    if cfg.proj:
        s += f", proj={cfg.proj}"
    return s


def adapter_settings(cfg: AdapterConfig) -> dict:
    """The adapter as train.py's settings (--method, --targets, ...)."""
    f = {"method": cfg.method, "targets": ",".join(cfg.targets)}
    if cfg.method in ("para", "lora"):
        f["r"] = cfg.r
    if cfg.method == "para":
        f |= {"pooler": cfg.pooler, "K": cfg.K}
    if cfg.proj:
        f["proj"] = cfg.proj
    return f


# ------------------------------------------------------------------------------------------------ training runs

def run_config(opts, cfg: AdapterConfig, seed: int, out: Path, extra=None, lr=None, test=True,
               select=None) -> train.TrainConfig:
    """One run's train.py settings: the task's; then this run's: lr (its rate instead of the task's), test=False (no
    test file: --no-test, the same train / dev split), select (--select-by), the adapter, seed and folder; then
    --quick's and those given after --; then `extra` (this run's alone, e.g. its system prompt). Each wins over the
    ones before."""
    t, data = TASKS[opts.data], opts.shared / "data"
    task = train.TrainConfig(data=str(data / t["train"]), dev=t["dev"] and str(data / t["dev"]),
                             weights=str(opts.shared / "assets" / "stories260K" / "hf"), device="cpu", beam=1,
                             log_every=10 ** 6, overwrite=True, **t["settings"])  # overwrite: a re-run replaces it
    run = ({"test": str(data / t["test"])} if test else {"no_test": True}) | ({"lr": lr} if lr else {}) \
        | ({"select_by": select} if select else {}) | adapter_settings(cfg) | {"seed": seed, "out": str(out)}
    return replace(task, **run | opts.overrides | (extra or {}))


def run_name(name: str, seed: int, lr=None) -> str:
    return f"{name}{f'-lr{lr:g}' if lr else ''}-seed{seed}"


def train_one(opts, table: str, name: str, cfg: AdapterConfig, seed: int, extra=None, lr=None, test=True,
              select=None, reuse=None) -> dict:
    """One train.py run, its output kept in lab/runs/<table>/<name>[-lr<rate>]-seed<seed>/train.log; one line
    printed. extra, lr, test, select: run_config's.
    test=False: scored on the dev split alone. reuse: the folder of a finished run that trained exactly this run
    (same flags but the test file): its kept adapter is scored on the test set instead of training it again."""
    out = RUNS / table / run_name(name, seed, lr if not test else None)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    args = run_config(opts, cfg, seed, out, extra, lr, test, select)
    with open(out / "train.log", "w") as log, contextlib.redirect_stdout(log):
        summary = score_kept(args, reuse, out) if reuse else train.train(args)
    seconds = time.time() - t0
    row = {"seed": seed, "lr": args.lr, "best_dev_loss": summary["best_dev_loss"],
           "best_dev_label_acc": summary.get("best_dev_label_acc"), "best_step": summary.get("best_step"),
           "steps": summary["steps"], "seconds": round(seconds, 1), "adapter": shown(summary["adapter"]),
           "history": compact(summary.get("history", []))}
    dev = f"dev loss {summary['best_dev_loss']:.4f}"
    if row["best_dev_label_acc"] is not None:
        dev = f"dev acc {row['best_dev_label_acc']:5.1f}  {dev}"
    if not test:
        print(f"  {table}: {name:<12} lr {row['lr']:<6g} seed {seed}  {dev}  ({seconds:.0f} s)", flush=True)
        return row
    acc = file_label_accuracy(summary["task"], out / "predictions_test.jsonl")
    how = f"the kept adapter of {shown(reuse)}, " if reuse else ""
    print(f"  {table}: {name:<12} seed {seed}  test acc {acc:5.1f} (train.py's parse "
          f"{summary['test']['acc']:5.1f})  {dev}  ({how}{seconds:.0f} s)", flush=True)
    return {"seed": seed, "test": acc, "test_strict": summary["test"]["acc"]} | row | (
        {"reused": shown(reuse)} if reuse else {})


def compact(history: list) -> list:
    """A run's evaluations as [step, train loss, dev loss, dev label acc or None], rounded, for the JSON."""
    r = lambda x, n: None if x is None else round(x, n)
    return [[h["step"], r(h["train_loss"], 4), r(h["dev_loss"], 4), r(h.get("dev_label_acc"), 2)] for h in history]


def file_label_accuracy(task: str, predictions_file: Path) -> float:
    """label_first_accuracy of a predictions_<part>.jsonl that train.py wrote."""
    rows = [json.loads(line) for line in Path(predictions_file).read_text().splitlines()]
    return label_first_accuracy(task, [r["prediction"] for r in rows], [r["references"][0] for r in rows])


# What must be the same for a finished run to stand for a run about to train: every setting a resume checks, and
# what decides the predictions. The test file and the output folder may differ.
REUSE_SAME = SAME_RUN + ("max_new_tokens", "beam", "eval_batch_size", "skip_long", "tokenizer", "dtype", "device")


def reusable(args, folder: Path):
    """Why the run in `folder` did not train what `args` would (a string), or None if it did."""
    try:
        done = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return f"no finished run in {shown(folder)}"
    if not (folder / "adapter.safetensors").is_file():
        return f"no adapter in {shown(folder)}"
    differ = [k for k in REUSE_SAME if done["settings"].get(k) != getattr(args, k)]
    return f"{shown(folder)} was trained with other {', '.join(differ)}" if differ else None


@torch.no_grad()
def score_kept(args, folder: Path, out: Path) -> dict:
    """What train.train(args) returns, for a run that `folder` already trained (reusable() says so): its kept
    adapter's test predictions, made as train.py makes them after training, written to `out` with its summary."""
    done = json.loads((folder / "summary.json").read_text())
    model = load_model(args.weights)
    tok = load_tokenizer(args.tokenizer or find_tokenizer(args.weights))
    load_adapter(model, folder / "adapter.safetensors")
    model.eval()
    task = done["task"]
    test = one_per_query(load_task(args.test, task)[1])[:args.max_eval]
    preds = predict(model, tok, task, test, args.system, args.max_len, args.beam, args.max_new_tokens,
                    args.eval_batch_size, args.skip_long)
    kept = [(ex, p) for ex, p in zip(test, preds) if p is not None]  # None: too long, skipped (--skip-long)
    for name in RUN_FILES:  # what a run trained here before: this folder now holds the reused run's scores
        (out / name).unlink(missing_ok=True)
    save_predictions(kept, out / "predictions_test.jsonl")
    summary = done | {"test": score(task, [p for _, p in kept], [ex for ex, _ in kept]), "reused": str(folder)}
    save_summary(summary, out / "summary.json")
    print(f"the run of {folder} trained what this run would: its kept adapter, scored on {len(kept)} test examples")
    return summary


# ---------------------------------------------------------------------------------------------------- the noise

Z95 = 1.959964  # the normal distribution's 97.5% quantile: +-Z95 standard errors hold 95%
NOISE_NOTE = ("The 95% interval is that of the mean over the seeds, from the seeds' spread and the binomial noise of "
              "the test size (lab.interval); a verdict calls a difference of two means real only when it is larger "
              "than the 95% noise of both together (lab.verdict).")


def noise_variance(accs: list, n: int) -> float:
    """The variance (in points^2) of a method's mean test accuracy over its seeds, from two sources of noise:
    the seeds' spread (sample variance across the k seeds, divided by k for their mean) and the binomial noise of a
    test set of n examples (p(1 - p) / n; every seed is scored on the same n examples, so it does not shrink with k).
    With 3 seeds the first term is itself a rough estimate; read the intervals as a guide, not a proof. The binomial
    term is Agresti and Coull's: two right and two wrong answers added, so that 0% or 100% still has some noise."""
    k, p = len(accs), statistics.fmean(accs) / 100
    seeds = statistics.variance(accs) / k if k > 1 else 0.0
    p_tilde = (p * n + 2) / (n + 4)
    return seeds + 100 ** 2 * p_tilde * (1 - p_tilde) / (n + 4)


def interval(accs: list, n: int) -> tuple:
    """The 95% interval (low, high) of the mean accuracy in points: mean +- Z95 x its standard error, within 0-100."""
    mean, half = statistics.fmean(accs), Z95 * math.sqrt(noise_variance(accs, n))
    return max(0.0, mean - half), min(100.0, mean + half)


def verdict(name_a: str, accs_a: list, name_b: str, accs_b: list, n: int) -> str:
    """One line: is the difference of the mean accuracies of a and b larger than the noise of the two? The noise of
    the difference is Z95 x sqrt(var_a + var_b), treating the two as independent (they share the test set, so this
    errs on the cautious side)."""
    diff = statistics.fmean(accs_a) - statistics.fmean(accs_b)
    noise = Z95 * math.sqrt(noise_variance(accs_a, n) + noise_variance(accs_b, n))
    word = "above" if diff > 0 else "below"
    if abs(diff) > noise:
        return f"{name_a} is {abs(diff):.1f} points {word} {name_b}: larger than the noise (±{noise:.1f})"
    return f"{name_a} vs {name_b}: {diff:+.1f} points, within the noise (±{noise:.1f}): no difference shown"


def train_alone(opts, *job) -> dict:
    """train_one with one thread, in this process or a worker. The number of threads changes the order in which
    floating-point sums are added up, and fifty steps at lr 3e-2 amplify the last bit into other accuracies (the
    quick SST-2 table's PARA, last token: 47.5 with one thread, 52.0 with two); with one thread everywhere, a rerun
    on the same torch and CPU gives the reference's numbers, whatever the machine's cores and --jobs."""
    torch.set_num_threads(1)
    return train_one(opts, *job)


def train_many(opts, jobs: list) -> list:
    """train_alone for each (table, name, cfg, seed, extra[, lr, test, select, reuse]) in jobs (all of one length),
    --jobs of them at a time. A model this small
    keeps one core busy with small matrix products far better than two, so separate processes with one thread each
    finish sooner than one process with every thread; the runs are independent, and their results do not change."""
    if opts.jobs <= 1:
        return [train_alone(opts, *job) for job in jobs]
    with ProcessPoolExecutor(opts.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(train_alone, [opts] * len(jobs), *zip(*jobs)))


def run_rows(opts, table: str, rows: list) -> list:
    """rows: (label, run name, AdapterConfig) -> each with its parameter count and the median over the seeds.
    opts.rates: a rate per run name (else the task's); opts.select: train.py's --select-by; opts.reuse: run name ->
    a finished run that trained its seed-0 run (see train_one)."""
    args = model_args(opts)
    reuse = lambda name, seed: opts.reuse.get(name) if seed == 0 else None
    done = iter(train_many(opts, [(table, name, cfg, seed, None, opts.rates.get(name), True, opts.select,
                                   reuse(name, seed)) for _, name, cfg in rows for seed in opts.seeds]))
    out = []
    for label, name, cfg in rows:
        runs = [next(done) for _ in opts.seeds]
        out.append({"method": label, "name": name, "settings": describe(cfg), "config": cfg.__dict__,
                    "parameters": count_parameters(args, cfg), "median": statistics.median(r["test"] for r in runs),
                    "runs": runs})
    return out


def model_args(opts):
    return load_model(opts.shared / "assets" / "stories260K" / "hf").args


def run_settings(opts, test=True):
    return run_config(opts, AdapterConfig("para"), 0, RUNS, test=test, select=opts.select)


def majority_baseline(opts) -> dict:
    """Always answer the label most frequent in the training file; scored on the test examples the runs use."""
    t = TASKS[opts.data]
    task, train_ex = load_task(opts.shared / "data" / t["train"])
    label = Counter(ex.response for ex in train_ex).most_common(1)[0][0]
    test = one_per_query(load_task(opts.shared / "data" / t["test"], task)[1])[:run_settings(opts).max_eval]
    return {"label": label, "test": score(task, [label] * len(test), test)["acc"], "examples": len(test)}


# ----------------------------------------------------------------------------------------------- the tables

def settings_line(opts, test=True) -> str:
    """The runs' settings in one line. opts.lr_text, when set, says how each method's rate was chosen."""
    a = run_settings(opts, test)
    system = "the paper's system prompt" if a.system == SYSTEM_PROMPT else \
        "no system prompt (the paper: its Appendix C one)" if not a.system else "system prompt given by --system"
    kept = (f"dev loss and dev label accuracy every {a.eval_every} steps (the adapter with the best dev label "
            "accuracy is kept, a tie to the lower dev loss)" if a.select_by == "label-acc" else
            f"dev loss every {a.eval_every} steps (the best adapter is kept)")
    scored = (f"test = the first {a.max_eval} test examples" if test else
              f"dev = the first {a.max_eval} examples of a seeded 10% of the training file (never trained on), no "
              "test file read")
    acc = ("Test acc: the label the answer starts with; train.py's acc: the label as a whole word" if test else
           "Dev acc: the label the answer starts with")
    return (f"{opts.data}: {a.max_train or 'all'} training examples, {a.max_steps} steps of {a.batch_size}, "
            f"{opts.lr_text or f'lr {a.lr:g}'} (the paper: 1e-4 on 7B), {system}, max-len {a.max_len}, {kept}, "
            f"{scored}, greedy decoding (the paper: beam 3) of at most {a.max_new_tokens} tokens, seeds "
            f"{', '.join(map(str, opts.seeds))}. {acc}")


def result_table(rows, baseline=None) -> str:
    n = baseline["examples"] if baseline else None
    by_acc = rows and rows[0]["runs"][0].get("best_dev_label_acc") is not None  # kept by dev label accuracy
    lines = ["| method | settings | tunable parameters | test acc, median | per seed | mean [95% interval] | "
             "train.py's acc, median | dev loss, median |" + (" dev acc, median |" if by_acc else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if by_acc else "")]
    if baseline:
        b = f"{baseline['test']:.1f}"
        low, high = interval([baseline["test"]], n)
        lines.append(f"| majority class of train | always \"{baseline['label']}\" | 0 | {b} | | "
                     f"{b} [{low:.1f}, {high:.1f}] | {b} | |" + (" |" if by_acc else ""))
    for r in rows:
        accs = [x["test"] for x in r["runs"]]
        seeds = " / ".join(f"{a:.1f}" for a in accs)
        strict = statistics.median(x["test_strict"] for x in r["runs"])
        loss = statistics.median(x["best_dev_loss"] for x in r["runs"])
        spread = ""
        if n:
            low, high = interval(accs, n)
            spread = f"{statistics.fmean(accs):.1f} [{low:.1f}, {high:.1f}]"
        dev = f" {statistics.median(x['best_dev_label_acc'] for x in r['runs']):.1f} |" if by_acc else ""
        lines.append(f"| {r['method']} | {r['settings']} | {r['parameters']:,} | {r['median']:.1f} | {seeds} | "
                     f"{spread} | {strict:.1f} | {loss:.4f} |{dev}")
    return "\n".join(lines)


def verdicts(rows, baseline, reference=0) -> list:
    """A verdict line for every row against the majority class, and for every other row against rows[reference]."""
    n, accs = baseline["examples"], lambda r: [x["test"] for x in r["runs"]]
    out = [verdict(r["method"], accs(r), "the majority class", [baseline["test"]], n) for r in rows]
    ref = rows[reference]
    out += [verdict(r["method"], accs(r), ref["method"], accs(ref), n) for r in rows if r is not ref]
    return out


def shown(path: Path) -> str:
    """A path as the results show it: relative to the project root (../shared/... for the shared files), so that no
    result names a folder of the machine it ran on."""
    return os.path.relpath(Path(path).resolve(), ROOT)


def write_result(opts, name: str, title: str, wall: float, body: str, data: dict, note: str = ""):
    jobs, command, results = opts.jobs, opts.command, opts.results
    threads = f"{jobs} runs at once, 1 thread(s) each" if jobs > 1 else "1 run at a time, 1 thread"
    machine = f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, {threads}"
    took = f"{wall / 60:.1f} min" if wall >= 60 else f"{wall:.0f} s"
    md = f"### {title}\n\n`{command}` ({machine}; wall time {took})\n\n"
    md += (note + "\n\n" if note else "") + body + "\n"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.md").write_text(md)
    record = {"name": name, "title": title, "command": command, "machine": machine, "wall_seconds": round(wall, 1)}
    (results / f"{name}.json").write_text(json.dumps(record | data, indent=2, default=str) + "\n")
    print("\n" + md)
    print(f"written: {shown(results / name)}.md, .json")
    draw_figures(record | data, results)
    if results.resolve() != REFERENCE.resolve() and (REFERENCE / f"{name}.md").is_file():
        print(f"the reference: {shown(REFERENCE / name)}.md (LAB.md, \"Rerunning the lab\", says what should match)")


@functools.cache
def figures():
    """lab_figures (matplotlib's drawings of the results), imported on first use; None, said once, without
    matplotlib: every command still prints and writes its tables."""
    try:
        import lab_figures
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("matplotlib"):
            raise
        print('no figures: matplotlib is not installed (pip install -e ".[lab]" adds it); the tables are complete')
        return None
    return lab_figures


def draw_figures(result: dict, folder: Path) -> list:
    """The figures of one result (lab_figures.draw) beside its JSON, each path printed."""
    paths = figures().draw(result, folder) if figures() else []
    for path in paths:
        print(f"figure: {shown(path)}")
    return paths


def run_table(opts, t0, name: str, title: str, rows: list, note: str, **extra):
    """Train every row, then write the table beside the majority baseline; `extra` goes into the JSON first."""
    results = run_rows(opts, name, rows)
    baseline = majority_baseline(opts)  # the test file is read after every run has kept its adapter
    judged = verdicts(results, baseline)
    body = result_table(results, baseline) + "\n\n" + "\n".join(f"- {line}" for line in judged)
    write_result(opts, name, title, time.time() - t0, body,
                 extra | {"baseline": baseline, "rows": results, "verdicts": judged, "settings": settings_line(opts)},
                 f"{note}\n{settings_line(opts)}. {NOISE_NOTE}")


def compare_rows(opts) -> tuple:
    """(budget, rows): the comparison's five methods, each with its knob matched to the budget."""
    args = model_args(opts)
    target = opts.target or count_parameters(args, AdapterConfig("para", r=12))
    return target, [("PARADE (capsule pooler)", "para-capsule", match_budget(args, target, "para")),
                    ("PARA (last-token pooler)", "para-last", match_budget(args, target, "para", pooler="last")),
                    ("(IA)^3, projected", "ia3", match_budget(args, target, "ia3")),
                    ("LoRA", "lora", match_budget(args, target, "lora")),
                    ("BitFit, projected", "bitfit", match_budget(args, target, "bitfit"))]


def tune_file(opts) -> Path:
    """The tune result compare reads: --tune, else the one beside compare's own results (where a tune run with the
    same --results wrote it), else the reference in lab/results."""
    if opts.tune:
        return Path(opts.tune)
    name = f"tune-{opts.data}{opts.suffix}.json"
    return next((p for p in (opts.results / name, REFERENCE / name) if p.is_file()), REFERENCE / name)


def budget_note(target: int) -> str:
    return f"Budget: {target:,} tunable parameters (PARA r=12's count on this model), each method's knob matched to it."


def cmd_tune(opts):
    """Every method of compare at every rate of RATES, seed 0, compare's steps, scored on the dev split alone: no
    test file is given to train.py, whose --no-test keeps the same train / dev split as compare's runs."""
    t0 = time.time()
    target, rows = compare_rows(opts)
    args = model_args(opts)
    opts.select, opts.seeds = "label-acc", [0]
    name = f"tune-{opts.data}{opts.suffix}"
    runs = iter(train_many(opts, [(name, run, cfg, 0, None, lr, False, opts.select, None)
                                  for _, run, cfg in rows for lr in RATES]))
    results, chosen = [], {}
    for label, run, cfg in rows:
        by_rate = [next(runs) for _ in RATES]
        # the best dev label accuracy; a tie goes to the lower dev loss, then to the smaller rate
        best = min(by_rate, key=lambda x: (-x["best_dev_label_acc"], x["best_dev_loss"], x["lr"]))
        chosen[run] = best["lr"]
        results.append({"method": label, "name": run, "settings": describe(cfg), "config": cfg.__dict__,
                        "parameters": count_parameters(args, cfg), "lr": best["lr"], "runs": by_rate})
    lines = ["| method | settings | tunable parameters | "
             + " | ".join(f"lr {lr:g}: dev acc (dev loss)" for lr in RATES) + " | chosen lr |",
             "|---|---|---|" + "---|" * len(RATES) + "---|"]
    for r in results:
        cells = " | ".join(f"{x['best_dev_label_acc']:.1f} ({x['best_dev_loss']:.4f})" for x in r["runs"])
        lines.append(f"| {r['method']} | {r['settings']} | {r['parameters']:,} | {cells} | {r['lr']:g} |")
    opts.lr_text = f"lr {', '.join(f'{lr:g}' for lr in RATES)} for every method"
    settings = settings_line(opts, test=False)
    note = (f"{budget_note(target)}\n{settings}. Each method's rate: the best dev label accuracy of the kept adapter "
            "(train.py --select-by label-acc); a tie goes to the lower dev loss, then to the smaller rate. "
            f"`python lab.py compare --data {opts.data}{' --quick' if opts.quick else ''}` trains at these rates.")
    write_result(opts, name, f"Each method's learning rate, chosen on the dev split ({opts.data})", time.time() - t0,
                 "\n".join(lines), {"target": target, "rates": list(RATES), "seed": 0, "chosen": chosen,
                                    "rows": results, "settings": settings}, note)


def cmd_compare(opts):
    t0 = time.time()
    target, rows = compare_rows(opts)
    path, names = tune_file(opts), {run: label for label, run, _ in rows}
    if path.is_file():  # each method at its rate, chosen on dev; the best adapter kept by dev label accuracy
        tuned = json.loads(path.read_text())
        missing = [run for run in names if run not in tuned["chosen"]]
        if missing:
            raise SystemExit(f"error: {shown(path)} has no rate for {', '.join(missing)}: rerun python lab.py tune "
                             f"--data {opts.data}{' --quick' if opts.quick else ''}")
        opts.rates, opts.select = {run: tuned["chosen"][run] for run in names}, "label-acc"
        opts.lr_text = (f"lr per method as `lab.py tune` chose it on the dev split ({shown(path)}): " +
                        ", ".join(f"{names[run]} {lr:g}" for run, lr in opts.rates.items()))
        if not opts.retrain:
            opts.reuse = find_reusable(opts, rows, tuned)
    elif opts.tune or TASKS[opts.data].get("tuned"):
        raise SystemExit(f"error: no tune result at {shown(path)}: run python lab.py tune --data {opts.data}"
                         f"{' --quick' if opts.quick else ''} first (it writes one to {shown(opts.results)}), or "
                         "give --tune PATH")
    else:
        opts.lr_text = (f"lr {run_settings(opts).lr:g} for every method (no tune result at {shown(path)}: python "
                        f"lab.py tune --data {opts.data} makes one)")
    run_table(opts, t0, f"compare-{opts.data}{opts.suffix}",
              f"PARA against the baselines at a matched budget ({opts.data})", rows, budget_note(target),
              target=target, tune=shown(path) if opts.rates else None, rates=opts.rates or None,
              reused={run: shown(p) for run, p in opts.reuse.items()})


def find_reusable(opts, rows, tuned) -> dict:
    """run name -> the tune run that trained exactly compare's seed-0 run of it (same flags but the test file: same
    data split, rate, steps, selection), whose kept adapter compare scores on the test set instead of training it
    again; a method whose tune run is gone or differs is trained."""
    if 0 not in opts.seeds:
        return {}
    found = {}
    for _, run, cfg in rows:
        folder = RUNS / tuned["name"] / run_name(run, 0, opts.rates[run])
        args = run_config(opts, cfg, 0, folder, None, opts.rates[run], True, opts.select)
        why = reusable(args, folder)
        if why:
            print(f"  {run}: seed 0 is trained ({why})")
        else:
            found[run] = folder
    if found:
        print(f"  seed 0 of {', '.join(found)}: the tune run at the chosen rate trained it; its kept adapter is "
              "scored on the test set (--retrain trains it again)")
    return found


def cmd_ablations(opts):
    t0 = time.time()
    args = model_args(opts)
    parade = AdapterConfig("para", r=12)
    target = count_parameters(args, parade)
    rows = [("PARADE", "parade", parade),
            ("PARADE-1 (last-token pooler)", "parade-1", AdapterConfig("para", r=12, pooler="last")),
            ("PARADE-2 (routing pooler)", "parade-2", AdapterConfig("para", r=12, pooler="routing")),
            ("PARADE-3 (q,k,v,g,u, r matched)", "parade-3",
             match_budget(args, target, "para", targets=("q", "k", "v", "g", "u"))),
            ("PARADE-4 (q,v, r matched)", "parade-4", match_budget(args, target, "para", targets=("q", "v")))]
    run_table(opts, t0, f"ablations-{opts.data}{opts.suffix}", f"PARADE's variants (paper Table 6) on {opts.data}",
              rows,
              f"PARADE-3 and PARADE-4 get the r closest to PARADE's {target:,} parameters, as the paper chose r=8 and "
              f"r=24 on 7B.", target=target)


def cmd_sweep(opts):
    t0 = time.time()
    rows = []
    for r in opts.r:
        K = 4 if r % 4 == 0 else 3  # the capsule pooler needs K | r: K=4 as in the paper where it divides r, else 3
        rows.append((f"PARADE r={r}", f"r{r}", AdapterConfig("para", r=r, K=K)))
    run_table(opts, t0, f"sweep-{opts.data}{opts.suffix}", f"PARADE's bottleneck r (paper Figure 2) on {opts.data}",
              rows,
              "The bottleneck r of paper Figure 2 (r=12 is the paper's default). The capsule pooler splits r into K "
              "capsules, so K=4 where 4 divides r and K=3 for r=3 and 6.")


# ---------------------------------------------------------------------------------- inside PARA: the vectors

def vector_spread(l: torch.Tensor) -> dict:
    """How one layer's vector for one target varies across prompts. l: [N prompts, d].

    spread: mean_p ||l_p - mean|| / ||mean||, 0 when the vector is the same for every prompt (then PARA is (IA)^3);
    off_identity: mean |l - 1| over prompts and entries, how far the vector is from leaving the model unchanged;
    prompt_share: mean_p ||l_p - mean|| / mean_p ||l_p - 1||, the part of the adjustment that depends on the prompt.
    """
    l = l.double()
    mean = l.mean(0)
    dev = (l - mean).norm(dim=-1)
    change = (l - 1).norm(dim=-1).mean()
    return {"spread": (dev.mean() / mean.norm()).item(), "off_identity": (l - 1).abs().mean().item(),
            "prompt_share": (dev.mean() / change).item() if change > 0 else 0.0}


@torch.no_grad()
def capture_vectors(model, prompts: list, batch_size: int = 16) -> dict:
    """(layer, target) -> [N, d]: the vectors every layer's generator makes for each prompt, read with hooks;
    with a capsule or routing pooler also (layer, "z") -> [N, r], the pooled summary the vectors are made from."""
    store = {}

    def hook(i):
        def keep(module, inputs, out):  # a generator's out: target -> [B, 1, d]; a pooler's: z [B, r]
            for site, l in (out.items() if isinstance(out, dict) else [("z", out[:, None])]):
                store.setdefault((i, site), []).append(l[:, 0].float())
        return keep

    generators = [(i, layer.vg) for i, layer in enumerate(model.layers) if isinstance(layer.vg, VectorGenerator)]
    if not generators:
        raise ValueError("the model has no PARA adapter attached: there are no generated vectors to look at")
    handles = [m.register_forward_hook(hook(i)) for i, vg in generators
               for m in ([vg, vg.pool] if hasattr(vg, "pool") else [vg])]
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            tokens = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)  # right padding: never pooled
            for b, p in enumerate(chunk):
                tokens[b, :len(p)] = torch.tensor(p)
            model(tokens, prompt_lens=torch.tensor([len(p) for p in chunk]))
    finally:
        for h in handles:
            h.remove()
    return {key: torch.cat(parts) for key, parts in store.items()}


def test_prompts(opts, tok, n: int, system=None) -> tuple:
    """The first n test prompts of the task, built with the runs' system prompt (or `system`)."""
    t = TASKS[opts.data]
    task, examples = load_task(opts.shared / "data" / t["test"])
    examples = one_per_query(examples)[:n]
    budget = MAX_NEW_TOKENS.get(task, 8)
    settings = run_settings(opts)
    system = settings.system if system is None else system
    pairs, _, _ = tokenize(examples, tok, settings.max_len, system, budget)
    return [p for p, _ in pairs], examples


def vector_stats(opts, path: Path, system: str) -> dict:
    """The spread of every layer's vectors across the first --n test prompts, for one PARA adapter file."""
    model = load_model(opts.shared / "assets" / "stories260K" / "hf")
    tok = load_tokenizer(opts.shared / "assets" / "stories260K" / "tok512.model")
    cfg = load_adapter(model, path).adapter
    prompts, _ = test_prompts(opts, tok, opts.n, system)
    vectors = capture_vectors(model, prompts)
    stats = {f"{i}.{site}": vector_spread(l) for (i, site), l in vectors.items() if site != "z"}  # layer by layer
    pooled = {i: {"norm": z.norm(dim=-1).mean().item(), "spread": vector_spread(z)["spread"]}
              for (i, site), z in vectors.items() if site == "z"}
    return {"adapter": shown(path), "pooler": cfg.pooler, "K": cfg.K, "system_prompt": bool(system),
            "prompts": len(prompts), "stats": stats, "pooled": pooled}


def cmd_vectors(opts):
    t0 = time.time()
    system = run_settings(opts).system
    if opts.para:  # the user's adapters, read with the runs' system prompt (-- --system "..." to change it)
        adapters = [(f"`{shown(p)}`", Path(p), system, None) for p in opts.para]
    else:  # PARADE's capsule pooler and PARA's last token, each trained with and without the shared system prompt
        variants = [(pooler, label, sys_prompt) for pooler, label in (("capsule", "capsule (PARADE)"),
                                                                      ("last", "last token (PARA)"))
                    for sys_prompt in (system, "" if system else SYSTEM_PROMPT)]
        print(f"training {len(variants)} PARA adapters on {opts.data} (seed 0; give --para to use your own)")
        runs = train_many(opts, [("vectors" + opts.suffix, f"para-{pooler}-{'system' if sys_prompt else 'query'}",
                                  AdapterConfig("para", r=12, pooler=pooler), 0, {"system": sys_prompt})
                                 for pooler, _, sys_prompt in variants])
        adapters = [(f"{label}, {'system prompt + query' if sys_prompt else 'the query alone'}",
                     ROOT / run["adapter"], sys_prompt, run["test"])
                    for (_, label, sys_prompt), run in zip(variants, runs)]
    results = []
    for label, path, sys_prompt, acc in adapters:
        results.append({"label": label, "test": acc} | vector_stats(opts, path, sys_prompt))

    lines = ["| adapter: pooler, tokens pooled | test acc | mean abs(l - 1) | prompt-dependent share, mean (max) |",
             "|---|---|---|---|"]
    for r in results:
        off = statistics.fmean(s["off_identity"] for s in r["stats"].values())
        shares = [s["prompt_share"] for s in r["stats"].values()]  # over layers and targets
        acc = f"{r['test']:.1f}" if r["test"] is not None else ""
        lines.append(f"| {r['label']} | {acc} | {off:.3g} | {statistics.fmean(shares):.3g} ({max(shares):.3g}) |")
    lines += ["", "The prompt-dependent share by layer and target, for "
              + "; ".join(f"({k + 1}) {r['label']}" for k, r in enumerate(results)) + ":", "",
              "| layer | target | " + " | ".join(f"({k + 1})" for k in range(len(results))) + " |",
              "|---|---|" + "---|" * len(results)]
    for key in results[0]["stats"]:
        i, site = key.split(".")
        lines.append(f"| {i} | {site} | " + " | ".join(f"{r['stats'][key]['prompt_share']:.3g}" for r in results)
                     + " |")
    capsules = [r for r in results if r["pooled"]]
    if capsules:  # the capsules' lengths are squashed below 1, so |z| is at most sqrt(K)
        K = capsules[0]["K"]
        lines += ["", f"Capsule pooler: pooled z's mean length (at most sqrt(K) = {K ** 0.5:.3g}) and its spread "
                  "across prompts, by layer:", "", "| layer | " + " | ".join(r["label"] for r in capsules) + " |",
                  "|---|" + "---|" * len(capsules)]
        for i in capsules[0]["pooled"]:
            lines.append(f"| {i} | " + " | ".join(f"{r['pooled'][i]['norm']:.3g} ({r['pooled'][i]['spread']:.3g})"
                                                  for r in capsules) + " |")
    note = (f"{opts.n} test prompts of {opts.data}. spread = mean over prompts of ||l_p - mean_p l_p|| / "
            "||mean_p l_p|| (0: one constant vector, i.e. (IA)^3); mean abs(l - 1): how far the vectors are from the "
            "identity; prompt-dependent share = mean ||l_p - mean|| / mean ||l_p - 1||, the part of the adjustment "
            "that changes with the prompt. The pooled z is the capsule pooler's output, GeLU(z) W_up + b_up = l.")
    name = f"vectors-{opts.data}{opts.suffix}" + ("-given" if opts.para else "")  # the user's adapters: another file
    write_result(opts, name, f"How much PARA's vectors depend on the prompt ({opts.data})", time.time() - t0,
                 "\n".join(lines), {"adapters": results}, note)


# --------------------------------------------------------------------------------- inside PARA: attention maps

def attention_probs(attn, x, cos, sin, mask, l) -> torch.Tensor:
    """softmax(Q'K^T / sqrt(head_dim)) [B, n_heads, T, T], computed exactly as Attention.forward does it."""
    B, T, _ = x.shape
    q, k = attn.wq(x), attn.wk(x)  # with a baseline's adapter, its wrapped projections
    q = (l["q"] * q if "q" in l else q).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)  # l: the vectors
    k = (l["k"] * k if "k" in l else k).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)  # query head h reads KV head h // group
    scores = (q @ k.mT).to(torch.promote_types(q.dtype, torch.float32)) / attn.head_dim ** 0.5  # at least fp32
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


@torch.no_grad()
def attention_maps(model, tokens, prompt_lens=None) -> dict:
    """layer -> [B, n_heads, T, T]: the attention probabilities of every layer in one forward pass. A pre-hook
    catches each attention module's inputs (the normed x, RoPE, mask, and the layer's vectors l).
    prompt_lens: what PARA pools in each row (default: the whole row, a prompt without its response)."""
    maps = {}
    if prompt_lens is None:
        prompt_lens = torch.full((tokens.shape[0],), tokens.shape[1])

    def hook(i):
        def catch(module, args, kwargs):
            maps[i] = attention_probs(module, *args[:5])
        return catch

    handles = [layer.attention.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.layers)]
    try:
        model(tokens, prompt_lens=prompt_lens)
    finally:
        for h in handles:
            h.remove()
    return maps


def segments(tok, prompt: list) -> int:
    """Where the system prompt ends in a chat prompt: the length of the tokens it shares with the system part."""
    head = tok.encode(f"{B_INST} {B_SYS}{SYSTEM_PROMPT}{E_SYS}".rstrip(), bos=True)
    n = 0
    while n < min(len(head), len(prompt)) and head[n] == prompt[n]:
        n += 1
    return n


def attention_of(opts, para_path: Path, ia3_path: Path) -> tuple:
    """(maps, prompt, example, system end) for test example opts.index with the paper's system prompt: maps is
    name -> layer -> [heads, T, T] for the base model, PARADE (para_path) and (IA)^3 (ia3_path)."""
    tok = load_tokenizer(opts.shared / "assets" / "stories260K" / "tok512.model")
    prompts, examples = test_prompts(opts, tok, opts.index + 1, SYSTEM_PROMPT)
    prompt = prompts[opts.index]
    tokens = torch.tensor([prompt])
    maps = {}
    for name, path in (("base", None), ("PARADE", para_path), ("(IA)^3", ia3_path)):
        model = load_model(opts.shared / "assets" / "stories260K" / "hf")
        if path:
            load_adapter(model, path)
        maps[name] = {i: m[0].numpy() for i, m in attention_maps(model, tokens).items()}
    return maps, prompt, examples[opts.index], segments(tok, prompt)


def attention_stats(maps: dict, sys_end: int) -> dict:
    """The paper's reading (Figures 3-6): with PARADE, less attention on the last token of the system prompt, more
    among the instruction's tokens. Per layer, averaged over the instruction's query positions and over all heads."""
    return {i: {"to_system_end": {n: float(m[i][:, sys_end:, sys_end - 1].mean()) for n, m in maps.items()},
                "among_instruction": {n: float(m[i][:, sys_end:, sys_end:].sum(-1).mean()) for n, m in maps.items()}}
            for i in sorted(maps["base"])}


def draw_attention(opts, maps: dict, sys_end: int) -> list:
    """layer<i>.png for each of opts.layers in the result's folder (lab_figures.attention); none without matplotlib."""
    if not figures():
        return []
    folder = opts.results / f"attention-{opts.data}{opts.suffix}"
    paths = [figures().attention(folder / f"layer{i}.png", maps, i, opts.heads, sys_end, opts.scale)
             for i in opts.layers]
    for path in paths:
        print(f"figure: {shown(path)}")
    return paths


def cmd_attention(opts):
    t0 = time.time()
    args = model_args(opts)
    if not all(0 <= i < args.n_layers for i in opts.layers) or not all(0 <= h < args.n_heads for h in opts.heads):
        raise SystemExit(f"error: the model has layers 0-{args.n_layers - 1} and heads 0-{args.n_heads - 1}; "
                         f"asked for layers {opts.layers}, heads {opts.heads}")
    ia3_cfg = match_budget(args, count_parameters(args, AdapterConfig("para", r=12)), "ia3")  # as in compare
    # The paper's figures are about its system prompt, so this exercise trains and looks with it, whatever the
    # tables use. Adapters given with --para / --ia3 are read the same way.
    missing = [(cfg, flag) for cfg, flag in ((AdapterConfig("para", r=12), "para"), (ia3_cfg, "ia3"))
               if not getattr(opts, flag)]
    if missing:
        print(f"training {' and '.join(c.method for c, _ in missing)} on {opts.data} (seed 0; --para and --ia3 take "
              "your own)")
    # (IA)^3 at 2e-2, the rate its reference maps were drawn with (LAB.md); PARADE at the task's rate
    rate = {"para": None, "ia3": 2e-2 if opts.data == "sst2" else None}
    runs = iter(train_many(opts, [("attention" + opts.suffix, cfg.method, cfg, 0, {"system": SYSTEM_PROMPT},
                                   rate[cfg.method]) for cfg, _ in missing]))
    para_path, ia3_path = (Path(getattr(opts, flag)) if getattr(opts, flag) else ROOT / next(runs)["adapter"]
                           for flag in ("para", "ia3"))
    maps, prompt, example, sys_end = attention_of(opts, para_path, ia3_path)
    T = len(prompt)
    stats = attention_stats(maps, sys_end)
    lines = ["| layer | to the system prompt's last token: base / (IA)^3 / PARADE | among instruction tokens: "
             "base / (IA)^3 / PARADE |", "|---|---|---|"]
    for i, s in stats.items():
        last, among = s["to_system_end"], s["among_instruction"]
        lines.append(f"| {i} | {last['base']:.3f} / {last['(IA)^3']:.3f} / {last['PARADE']:.3f} | "
                     f"{among['base']:.3f} / {among['(IA)^3']:.3f} / {among['PARADE']:.3f} |")

    images = draw_attention(opts, maps, sys_end)
    folder = opts.results / f"attention-{opts.data}{opts.suffix}"
    note = (f"Prompt: test example {opts.index} of {opts.data} ({T} tokens, the system prompt is tokens 0-"
            f"{sys_end - 1}). PARADE `{shown(para_path)}`, (IA)^3 `{shown(ia3_path)}` ({describe(ia3_cfg)}). Images "
            f"`{shown(folder)}/layer<i>.png`: one row per head ({', '.join(map(str, opts.heads))}), "
            "columns PARADE | (IA)^3 | PARADE - (IA)^3 (blue: less under PARADE, red: more); rows are query tokens, "
            "columns the keys they attend to; colour = sqrt(weight) (viridis, 0 to 1) and, for the difference, "
            "sqrt of its share of the largest difference.")
    body = "\n".join(lines) + "\n\n" + "\n".join(f"![layer {i}]({p.relative_to(opts.results)})"
                                                  for i, p in zip(opts.layers, images))
    write_result(opts, f"attention-{opts.data}{opts.suffix}",
                 f"Attention under PARADE and (IA)^3 (paper Figures 3-6, {opts.data})", time.time() - t0, body,
                 {"prompt": example.query, "tokens": T, "system_end": sys_end, "stats": stats,
                  "images": [shown(p) for p in images], "para": shown(para_path), "ia3": shown(ia3_path)}, note)


# ---------------------------------------------------------------------------------------------------- figures

def cmd_figures(opts):
    """Every figure of the results in opts.results, drawn again from their JSONs by the current code. The attention
    maps are not in the JSON: they are computed again from the adapters it names, when those are still there."""
    if not figures():
        raise SystemExit("error: the figures need matplotlib")
    found = sorted(opts.results.glob("*.json"))
    if not found:
        raise SystemExit(f"error: no results (*.json) in {opts.results}")
    for path in found:
        result = json.loads(path.read_text())
        if result.get("name", "").startswith("attention"):
            redraw_attention(opts, result)
        else:
            draw_figures(result, opts.results)


def redraw_attention(opts, result: dict):
    """The attention maps of a result, computed again from its adapters with its command's settings (prompt, layers,
    heads), checked against the numbers its JSON holds."""
    run = parse_args(["--shared", str(opts.shared)] + shlex.split(result["command"])[2:])
    run.results = opts.results
    para, ia3 = ROOT / result["para"], ROOT / result["ia3"]
    gone = [result[k] for k, p in (("para", para), ("ia3", ia3)) if not p.is_file()]
    if gone:
        print(f"{result['name']}: not drawn, its adapters are not here ({', '.join(gone)}): "
              f"`{result['command']} --results {shown(opts.results)}` trains them and draws it")
        return
    maps, _, _, sys_end = attention_of(run, para, ia3)
    stats = attention_stats(maps, sys_end)
    differ = max(abs(stats[int(i)][what][n] - v) for i, s in result["stats"].items()
                 for what, by_name in s.items() for n, v in by_name.items())
    print(f"{result['name']}: the maps computed again " + ("give the JSON's numbers exactly" if differ == 0 else
          f"differ from the JSON's numbers by up to {differ:.2g}: its adapters were trained again since?"))
    draw_attention(run, maps, sys_end)


# ------------------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Flags after -- go to train.py and override the table's settings, e.g. "
                                       "python lab.py compare -- --max-steps 50 --lr 3e-3")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared",
                   help="the shared materials: assets/stories260K and data/ (default: ../shared)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="command")

    def command(name, help, data="sst2", seeds=True):
        s = sub.add_parser(name, help=help, description=help)
        s.add_argument("--data", choices=sorted(TASKS), default=data, help=f"task (default: {data})")
        if seeds:
            s.add_argument("--seeds", type=SEED, nargs="+", help="seeds (default: 0 1 2; with --quick: 0)")
        s.add_argument("--jobs", type=at_least(1), default=min(2, os.cpu_count() or 1),
                       help="training runs at once, each in its own process with one thread (default: 2, or 1 on a "
                            "1-core machine); the results do not depend on it")
        s.add_argument("--quick", action="store_true", help="the classroom version, under a minute: one seed, "
                       "fewer steps and test examples (results go to <name>-quick.md / .json)")
        s.add_argument("--results", type=Path, default=RUNS / "results",
                       help="where the table goes (default: lab/runs/results, git-ignored); lab/results holds the "
                            "reference tables LAB.md shows: --results lab/results refreshes them")
        return s

    s = command("compare", "Table 1 in miniature: PARADE, PARA (last token), (IA)^3, LoRA and BitFit at matched "
                "budgets beside the majority class, median of 3 seeds")
    s.add_argument("--target", type=at_least(1), help="parameter budget (default: PARA r=12's count, 22,220)")
    s.add_argument("--tune", help="the tune result to read each method's rate from (default: tune-<data>[-quick].json "
                   "in --results if there, else in lab/results)")
    s.add_argument("--retrain", action="store_true", help="train seed 0 again even where the tune run at the chosen "
                   "rate trained it (default: score that run's kept adapter on the test set)")
    s = command("tune", "Each compare method's learning rate: every method at 3e-3, 1e-2 and 3e-2 (seed 0, compare's "
                "steps), scored by label accuracy on the dev split; no test file is read", seeds=False)
    s.add_argument("--target", type=at_least(1), help="parameter budget (default: PARA r=12's count, 22,220)")
    command("ablations", "Table 6: PARADE against PARADE-1 (last-token pooler), PARADE-2 (routing pooler), "
            "PARADE-3 (q,k,v,g,u) and PARADE-4 (q,v) at matched budgets, median of 3 seeds", data="boolq")
    s = command("sweep", "Figure 2: PARADE's bottleneck r, median of 3 seeds", data="boolq")
    s.add_argument("--r", type=at_least(1), nargs="+", default=[3, 6, 12, 24], help="bottlenecks (default: 3 6 12 24)")
    s = command("vectors", "Do PARA's generated vectors depend on the prompt? Spread across prompts per layer and "
                "target, for the capsule and last-token poolers, pooling the system prompt with the query or the "
                "query alone (trains the four adapters first unless --para is given)", seeds=False)
    s.add_argument("--para", nargs="+", help="trained PARA adapter files (default: train four, see LAB.md)")
    s.add_argument("--n", type=at_least(1), default=128, help="prompts from the test set (default 128)")
    s = command("attention", "Figures 3-6: attention maps of one prompt under PARADE and (IA)^3, as PNGs (trains "
                "both adapters first unless --para and --ia3 are given)", seeds=False)
    s.add_argument("--para", help="a trained PARA adapter file (default: train one)")
    s.add_argument("--ia3", help="a trained (IA)^3 adapter file (default: train one)")
    s.add_argument("--index", type=at_least(0), default=0, help="which test example's prompt (default 0)")
    s.add_argument("--layers", type=at_least(0), nargs="+", default=[0, 2, 4], help="layers to draw (default 0 2 4)")
    s.add_argument("--heads", type=at_least(0), nargs="+", default=[0, 4],
                   help="heads to draw (default 0 4, the paper's 0-th and 16-th of 32 scaled to 8)")
    s.add_argument("--scale", type=at_least(1), default=3, help="pixels per token (default 3)")
    s = sub.add_parser("figures", help="every figure of a results folder drawn again from its JSONs (needs "
                       "matplotlib: pip install -e \".[lab]\")", description="Every figure of a results folder drawn "
                       "again from its JSONs by the current code; the attention maps from the adapters each names")
    s.add_argument("--results", type=Path, default=REFERENCE, help="the results folder (default: lab/results)")
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    opts = p.parse_args(ours)
    if opts.cmd == "figures":
        return opts
    # after "--": train.py flags that override the table's settings, e.g. -- --max-steps 50, checked as train.py
    # checks them, before anything trains
    opts.overrides = (TASKS[opts.data]["quick"] if opts.quick else {}) | vars(train.parser(True).parse_args(extra))
    opts.seeds = getattr(opts, "seeds", None) or ([0] if opts.quick or opts.cmd in ("vectors", "attention", "tune")
                                                  else list(SEEDS))
    opts.suffix = "-quick" if opts.quick else ""
    opts.rates, opts.select, opts.lr_text, opts.reuse = {}, None, None, {}  # compare and tune set them
    opts.target, opts.tune, opts.retrain = (getattr(opts, k, None) for k in ("target", "tune", "retrain"))
    # the command as the table shows it: without --results, so that a refreshed reference names the command to rerun
    shown_argv = [a for i, a in enumerate(ours) if not (a.startswith("--results") or ours[i - 1:i] == ["--results"])]
    opts.command = "python lab.py " + " ".join(shown_argv + (["--"] + extra if "--" in argv else []))
    try:
        run_settings(opts)
    except ValueError as e:
        train.parser().error(str(e))
    return opts


def main(argv=None):
    opts = parse_args(argv)
    if not (opts.shared / "assets" / "stories260K" / "hf").is_dir():
        print(f"error: the shared 260K model is not at {opts.shared / 'assets/stories260K/hf'}; give --shared",
              file=sys.stderr)
        sys.exit(2)
    if opts.cmd == "figures":
        return cmd_figures(opts)
    torch.set_num_threads(1)  # every number computed here, as in the runs (train_alone), with one thread
    {"compare": cmd_compare, "tune": cmd_tune, "ablations": cmd_ablations, "sweep": cmd_sweep, "vectors": cmd_vectors,
     "attention": cmd_attention}[opts.cmd](opts)


if __name__ == "__main__":
    main()
