"""The teaching lab: the paper's comparisons in miniature, in minutes on a CPU, and a look inside PARA.

    python lab.py compare --data sst2   # Table 1: PARA vs (IA)^3, LoRA, BitFit at one parameter budget
    python lab.py ablations             # Table 6: PARADE against PARADE-1 .. PARADE-4
    python lab.py sweep                 # Figure 2: the bottleneck r
    python lab.py vectors               # do the generated vectors depend on the prompt?
    python lab.py attention             # Figures 3-6: attention maps under PARADE and (IA)^3

Everything trains on the shared 260K-parameter TinyStories model (the LLaMA-2 architecture at toy scale) through
train.py, with settings small enough that each table takes under 30 minutes on a 2-core CPU. Each command prints its
table and writes it as <name>.md and .json to lab/runs/results/ (git-ignored, beside the runs themselves in
lab/runs/); lab/results/ holds the reference tables that LAB.md shows, and --results lab/results refreshes them.
"""
import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import struct
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import train
from para_mini import AdapterConfig, count_parameters, load_adapter, load_model, load_tokenizer
from para_mini.cli import SEED, Parser, at_least
from para_mini.data import LABELS, SYSTEM_PROMPT, load_task, one_per_query
from para_mini.metrics import score
from para_mini.model import VectorGenerator, apply_rope
from para_mini.tokenizer import B_INST, B_SYS, E_SYS
from para_mini.training import MAX_NEW_TOKENS, tokenize

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
# learns to emit EOS after the label (see label_first_accuracy). "quick": the classroom version, under a minute.
TASKS = {
    "sst2": {"train": "sst2/train.tsv", "dev": None, "test": "sst2/dev.tsv",
             "settings": dict(max_train=20000, max_eval=872, batch_size=16, max_steps=1400, eval_every=350, lr=1e-2,
                              max_new_tokens=6, system="", no_eos_loss=True),
             "method": {"lora": dict(lr=3e-3), "ia3": dict(lr=2e-2)},  # each method's best rate (LAB.md)
             "quick": dict(max_steps=100, max_eval=200, eval_every=100)},
    "boolq": {"train": "boolq/train.jsonl", "dev": "boolq/dev.jsonl", "test": "boolq/test.jsonl",
              "settings": dict(max_eval=400, max_len=256, batch_size=16, max_steps=120, eval_every=40, lr=1e-2,
                               max_new_tokens=2),
              "quick": dict(max_steps=40, max_eval=100, eval_every=40)},
}
SEEDS = (0, 1, 2)
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

def run_config(opts, cfg: AdapterConfig, seed: int, out: Path, extra=None) -> train.TrainConfig:
    """One run's settings: the task's, the method's own rate, the adapter, then --quick's and those given after --,
    then `extra` (this run's alone, e.g. its system prompt), each on top of the one before."""
    t, data = TASKS[opts.data], opts.shared / "data"
    base = train.TrainConfig(data=str(data / t["train"]), dev=t["dev"] and str(data / t["dev"]),
                             test=str(data / t["test"]), weights=str(opts.shared / "assets" / "stories260K" / "hf"),
                             device="cpu", beam=1, log_every=10 ** 6, overwrite=True,  # a re-run replaces it
                             **t["settings"])
    settings = t.get("method", {}).get(cfg.method, {}) | adapter_settings(cfg) | {"seed": seed, "out": str(out)}
    return replace(base, **settings | opts.overrides | (extra or {}))


def train_one(opts, table: str, name: str, cfg: AdapterConfig, seed: int, extra=None) -> dict:
    """One train.py run, its output kept in lab/runs/<table>/<name>-seed<seed>/train.log; one line printed.
    `extra`: settings of this run alone (they win over every other)."""
    out = RUNS / table / f"{name}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "train.log", "w") as log, contextlib.redirect_stdout(log):
        summary = train.train(run_config(opts, cfg, seed, out, extra))
    seconds = time.time() - t0
    acc = label_first_accuracy(summary["task"], out / "predictions_test.jsonl")
    print(f"  {table}: {name:<12} seed {seed}  test acc {acc:5.1f} (train.py's parse "
          f"{summary['test']['acc']:5.1f})  dev loss {summary['best_dev_loss']:.4f}  ({seconds:.0f} s)", flush=True)
    return {"seed": seed, "test": acc, "test_strict": summary["test"]["acc"],
            "best_dev_loss": summary["best_dev_loss"], "steps": summary["steps"], "seconds": round(seconds, 1),
            "adapter": shown(summary["adapter"])}


def label_first(task: str, text: str):
    """The label a generation starts with, or None. train.py's parse wants the label as a whole word; the 260K model
    answers with the label but then runs on (its EOS logit starts near -25 and the adapters never lift it in a
    few hundred steps), sometimes gluing a character to it ("positive8"), so the lab scores the label chosen."""
    text = text.strip().lower()
    return next((name for name in LABELS[task] if text.startswith(name)), None)


def label_first_accuracy(task: str, predictions_file: Path) -> float:
    rows = [json.loads(line) for line in Path(predictions_file).read_text().splitlines()]
    return 100 * sum(label_first(task, r["prediction"]) == r["references"][0] for r in rows) / len(rows)


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
    floating-point sums are added up, and a hundred steps at lr 1e-2 amplify the last bit into other accuracies (the
    quick SST-2 table's PARA, last token: 43.5 with one thread, 51.0 with two); with one thread everywhere, a rerun
    on the same torch and CPU gives the reference's numbers, whatever the machine's cores and --jobs."""
    torch.set_num_threads(1)
    return train_one(opts, *job)


def train_many(opts, jobs: list) -> list:
    """train_alone for each (table, name, cfg, seed, extra) in jobs, --jobs of them at a time. A model this small
    keeps one core busy with small matrix products far better than two, so separate processes with one thread each
    finish sooner than one process with every thread; the runs are independent, and their results do not change."""
    if opts.jobs <= 1:
        return [train_alone(opts, *job) for job in jobs]
    with ProcessPoolExecutor(opts.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(train_alone, [opts] * len(jobs), *zip(*jobs)))


def run_rows(opts, table: str, rows: list) -> list:
    """rows: (label, run name, AdapterConfig) -> each with its parameter count and the median over the seeds."""
    args = model_args(opts)
    done = iter(train_many(opts, [(table, name, cfg, seed, None) for _, name, cfg in rows for seed in opts.seeds]))
    out = []
    for label, name, cfg in rows:
        runs = [next(done) for _ in opts.seeds]
        out.append({"method": label, "name": name, "settings": describe(cfg), "config": cfg.__dict__,
                    "parameters": count_parameters(args, cfg), "median": statistics.median(r["test"] for r in runs),
                    "runs": runs})
    return out


def model_args(opts):
    return load_model(opts.shared / "assets" / "stories260K" / "hf").args


def run_settings(opts):
    return run_config(opts, AdapterConfig("para"), 0, RUNS)


def majority_baseline(opts) -> dict:
    """Always answer the label most frequent in the training file; scored on the test examples the runs use."""
    t = TASKS[opts.data]
    task, train_ex = load_task(opts.shared / "data" / t["train"])
    label = Counter(ex.response for ex in train_ex).most_common(1)[0][0]
    test = one_per_query(load_task(opts.shared / "data" / t["test"], task)[1])[:run_settings(opts).max_eval]
    return {"label": label, "test": score(task, [label] * len(test), test)["acc"], "examples": len(test)}


# ----------------------------------------------------------------------------------------------- the tables

def settings_line(opts) -> str:
    a = run_settings(opts)
    system = "the paper's system prompt" if a.system == SYSTEM_PROMPT else \
        "no system prompt (the paper: its Appendix C one)" if not a.system else "system prompt given by --system"
    return (f"{opts.data}: {a.max_train or 'all'} training examples, {a.max_steps} steps of {a.batch_size}, "
            f"lr {a.lr:g}{lr_exceptions(opts, a.lr)} (the paper: 1e-4 on 7B), {system}, max-len {a.max_len}, dev loss "
            f"every {a.eval_every} steps (the best adapter is kept), test = the first {a.max_eval} test examples, "
            f"greedy decoding (the paper: beam 3) of at most {a.max_new_tokens} tokens, seeds "
            f"{', '.join(map(str, opts.seeds))}. Test acc: the label the answer starts with; train.py's acc: the label "
            "as a whole word")


def lr_exceptions(opts, lr: float) -> str:
    """The methods this task trains at a rate other than `lr`, e.g. " (LoRA: 0.003)"; flags after -- win."""
    names = {"para": "PARA", "lora": "LoRA", "ia3": "(IA)^3", "bitfit": "BitFit"}
    rates = {m: run_config(opts, AdapterConfig(m), 0, RUNS).lr for m in names}
    return "".join(f" ({names[m]}: {rate:g})" for m, rate in rates.items() if rate != lr)


def result_table(rows, baseline=None) -> str:
    n = baseline["examples"] if baseline else None
    lines = ["| method | settings | tunable parameters | test acc, median | per seed | mean [95% interval] | "
             "train.py's acc, median | dev loss, median |", "|---|---|---|---|---|---|---|---|"]
    if baseline:
        b = f"{baseline['test']:.1f}"
        low, high = interval([baseline["test"]], n)
        lines.append(f"| majority class of train | always \"{baseline['label']}\" | 0 | {b} | | "
                     f"{b} [{low:.1f}, {high:.1f}] | {b} | |")
    for r in rows:
        accs = [x["test"] for x in r["runs"]]
        seeds = " / ".join(f"{a:.1f}" for a in accs)
        strict = statistics.median(x["test_strict"] for x in r["runs"])
        loss = statistics.median(x["best_dev_loss"] for x in r["runs"])
        spread = ""
        if n:
            low, high = interval(accs, n)
            spread = f"{statistics.fmean(accs):.1f} [{low:.1f}, {high:.1f}]"
        lines.append(f"| {r['method']} | {r['settings']} | {r['parameters']:,} | {r['median']:.1f} | {seeds} | "
                     f"{spread} | {strict:.1f} | {loss:.4f} |")
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
    if results.resolve() != REFERENCE.resolve() and (REFERENCE / f"{name}.md").is_file():
        print(f"the reference: {shown(REFERENCE / name)}.md (LAB.md, \"Rerunning the lab\", says what should match)")


def run_table(opts, t0, name: str, title: str, rows: list, note: str, **extra):
    """Train every row, then write the table beside the majority baseline; `extra` goes into the JSON first."""
    baseline = majority_baseline(opts)
    results = run_rows(opts, name, rows)
    judged = verdicts(results, baseline)
    body = result_table(results, baseline) + "\n\n" + "\n".join(f"- {line}" for line in judged)
    write_result(opts, name, title, time.time() - t0, body,
                 extra | {"baseline": baseline, "rows": results, "verdicts": judged, "settings": settings_line(opts)},
                 f"{note}\n{settings_line(opts)}. {NOISE_NOTE}")


def cmd_compare(opts):
    t0 = time.time()
    args = model_args(opts)
    target = opts.target or count_parameters(args, AdapterConfig("para", r=12))
    rows = [("PARADE (capsule pooler)", "para-capsule", match_budget(args, target, "para")),
            ("PARA (last-token pooler)", "para-last", match_budget(args, target, "para", pooler="last")),
            ("(IA)^3, projected", "ia3", match_budget(args, target, "ia3")),
            ("LoRA", "lora", match_budget(args, target, "lora")),
            ("BitFit, projected", "bitfit", match_budget(args, target, "bitfit"))]
    run_table(opts, t0, f"compare-{opts.data}{opts.suffix}",
              f"PARA against the baselines at a matched budget ({opts.data})", rows,
              f"Budget: {target:,} tunable parameters (PARA r=12's count on this model), each method's knob matched "
              f"to it.", target=target)


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


def write_png(path, image: np.ndarray):
    """An 8-bit grey (H x W) or RGB (H x W x 3) PNG, written with zlib and struct alone."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"write_png takes uint8 H x W or H x W x 3, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    colour = 0 if image.ndim == 2 else 2  # PNG colour types: 0 grey, 2 RGB

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = image.reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter 0 (none) in front of every row
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)  # 8 bits, deflate, no interlace
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                           + chunk(b"IEND", b""))


# viridis at five stops (dark blue -> green -> yellow): perceptually ordered, readable in grey too
VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float)
# blue -> white -> red for signed differences
DIVERGING = np.array([[33, 102, 172], [247, 247, 247], [178, 24, 43]], dtype=float)


def colormap(values: np.ndarray, stops: np.ndarray = VIRIDIS) -> np.ndarray:
    """Values in [0, 1] (H x W) -> RGB uint8 (H x W x 3), linear between the colour stops."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=float)), 0, 1) * (len(stops) - 1)
    i = np.minimum(v.astype(int), len(stops) - 2)
    f = (v - i)[..., None]
    return np.round(stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def grid(panels: list, scale: int, gap: int = 4) -> np.ndarray:
    """Rows of RGB panels of one size, each pixel blown up to scale x scale, on a white background."""
    h, w = panels[0][0].shape[:2]
    rows, cols = len(panels), len(panels[0])
    out = np.full((rows * (h * scale + gap) + gap, cols * (w * scale + gap) + gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(panels):
        for c, p in enumerate(row):
            y, x = gap + r * (h * scale + gap), gap + c * (w * scale + gap)
            out[y:y + h * scale, x:x + w * scale] = p.repeat(scale, 0).repeat(scale, 1)
    return out


def segments(tok, prompt: list) -> int:
    """Where the system prompt ends in a chat prompt: the length of the tokens it shares with the system part."""
    head = tok.encode(f"{B_INST} {B_SYS}{SYSTEM_PROMPT}{E_SYS}".rstrip(), bos=True)
    n = 0
    while n < min(len(head), len(prompt)) and head[n] == prompt[n]:
        n += 1
    return n


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
    runs = iter(train_many(opts, [("attention" + opts.suffix, cfg.method, cfg, 0, {"system": SYSTEM_PROMPT})
                                  for cfg, _ in missing]))
    para_path, ia3_path = (Path(getattr(opts, flag)) if getattr(opts, flag) else ROOT / next(runs)["adapter"]
                           for flag in ("para", "ia3"))
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
    sys_end, T = segments(tok, prompt), len(prompt)

    # the paper's reading (Figures 3-6): with PARADE, less attention on the last token of the system prompt, more
    # among the instruction's tokens. Averaged over the instruction's query positions and over all heads.
    lines = ["| layer | to the system prompt's last token: base / (IA)^3 / PARADE | among instruction tokens: "
             "base / (IA)^3 / PARADE |", "|---|---|---|"]
    stats = {}
    for i in sorted(maps["base"]):
        last = {n: float(m[i][:, sys_end:, sys_end - 1].mean()) for n, m in maps.items()}
        among = {n: float(m[i][:, sys_end:, sys_end:].sum(-1).mean()) for n, m in maps.items()}
        stats[i] = {"to_system_end": last, "among_instruction": among}
        lines.append(f"| {i} | {last['base']:.3f} / {last['(IA)^3']:.3f} / {last['PARADE']:.3f} | "
                     f"{among['base']:.3f} / {among['(IA)^3']:.3f} / {among['PARADE']:.3f} |")

    folder = opts.results / f"attention-{opts.data}{opts.suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in opts.layers:
        panels = []
        for h in opts.heads:
            a, b = maps["PARADE"][i][h], maps["(IA)^3"][i][h]
            d = a - b
            d = np.sign(d) * np.sqrt(np.abs(d) / max(np.abs(d).max(), 1e-12))  # signed, in [-1, 1]
            # square roots, so that the weak weights still show beside the first token's attention sink
            panels.append([colormap(np.sqrt(a)), colormap(np.sqrt(b)), colormap(0.5 + 0.5 * d, DIVERGING)])
        path = folder / f"layer{i}.png"
        write_png(path, grid(panels, opts.scale))
        images.append(path)
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
                 {"prompt": examples[opts.index].query, "tokens": T, "system_end": sys_end, "stats": stats,
                  "images": [shown(p) for p in images], "para": shown(para_path), "ia3": shown(ia3_path)}, note)


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
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    opts = p.parse_args(ours)
    # after "--": train.py flags that override the table's settings, e.g. -- --max-steps 50, checked as train.py
    # checks them, before anything trains
    opts.overrides = (TASKS[opts.data]["quick"] if opts.quick else {}) | vars(train.parser(True).parse_args(extra))
    try:
        run_settings(opts)
    except ValueError as e:
        train.parser().error(str(e))
    opts.seeds = getattr(opts, "seeds", None) or ([0] if opts.quick or opts.cmd in ("vectors", "attention")
                                                  else list(SEEDS))
    opts.suffix = "-quick" if opts.quick else ""
    # the command as the table shows it: without --results, so that a refreshed reference names the command to rerun
    shown_argv = [a for i, a in enumerate(ours) if not (a.startswith("--results") or ours[i - 1:i] == ["--results"])]
    opts.command = "python lab.py " + " ".join(shown_argv + (["--"] + extra if "--" in argv else []))
    return opts


def main(argv=None):
    opts = parse_args(argv)
    if not (opts.shared / "assets" / "stories260K" / "hf").is_dir():
        print(f"error: the shared 260K model is not at {opts.shared / 'assets/stories260K/hf'}; give --shared",
              file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)  # every number computed here, as in the runs (train_alone), with one thread
    {"compare": cmd_compare, "ablations": cmd_ablations, "sweep": cmd_sweep, "vectors": cmd_vectors,
     "attention": cmd_attention}[opts.cmd](opts)


if __name__ == "__main__":
    main()
