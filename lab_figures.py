"""The lab's figures, drawn with matplotlib from the results lab.py writes (pip install -e ".[lab]").

Each function takes a result (the dict lab.py writes as <name>.json) and writes PNGs beside it in `folder`; draw()
picks the ones a result has. lab.py imports this module only to draw, so the lab runs without matplotlib.
"""
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no window, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 120
METHOD_COLOURS = plt.get_cmap("tab10").colors


def draw(result: dict, folder: Path) -> list:
    """Every figure of one result (compare, ablations, sweep, tune or vectors), as PNG paths in folder. The attention
    maps need the maps themselves, which the JSON does not hold: lab.py draws them with attention()."""
    name, folder = result["name"], Path(folder)
    kind = name.split("-")[0]
    paths = []
    if kind in ("compare", "ablations", "sweep") and result.get("rows") and result.get("baseline"):
        paths.append(intervals(result, folder / f"{name}.png"))
    if kind == "tune" and result.get("rows"):
        paths.append(tune(result, folder / f"{name}.png"))
    # a curve needs two evaluations: the quick runs evaluate once, and older results have no history
    if kind in ("compare", "ablations", "sweep", "tune") and any(
            len(run.get("history") or []) > 1 for row in result.get("rows", []) for run in row["runs"]):
        paths.append(curves(result, folder / f"{name}-curves.png"))
    if kind == "vectors" and result.get("adapters"):
        paths.append(vectors(result, folder / f"{name}.png"))
    return paths


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ the tables

def intervals(result: dict, path: Path) -> Path:
    """Each row's mean test accuracy with its 95% interval (lab.interval) and its seeds, against the majority class."""
    from lab import interval  # the tables' own noise model, so the picture and the table agree
    rows, base = result["rows"], result["baseline"]
    n = base["examples"]
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.6))
    low, high = interval([base["test"]], n)
    ax.axvspan(low, high, color="0.9", zorder=0)
    ax.axvline(base["test"], color="0.4", ls="--", lw=1, zorder=1,
               label=f"majority class (always \"{base['label']}\") and its 95% interval")
    for y, row in enumerate(rows):
        accs = [run["test"] for run in row["runs"]]
        lo, hi = interval(accs, n)
        mean = statistics.fmean(accs)
        ax.plot([lo, hi], [y, y], color="C0", lw=2.5, solid_capstyle="butt", zorder=2)
        ax.plot(accs, [y] * len(accs), "o", mfc="none", mec="0.35", ms=5, zorder=3,
                label="one seed" if y == 0 else None)
        ax.plot(mean, y, "o", color="C0", ms=8, zorder=4, label="mean and its 95% interval" if y == 0 else None)
        ax.annotate(f"{mean:.1f}", (hi, y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [row["method"] for row in rows])
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_ylim(len(rows) - 0.5, -0.9)
    seeds = len(rows[0]["runs"])
    ax.set_xlabel(f"test accuracy (%): the label the answer starts with, {n} test examples, "
                  f"{seeds} seed{'s' if seeds > 1 else ''}")
    ax.set_title(result["title"], fontsize=10)
    ax.grid(axis="x", color="0.92")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.07), ncol=2, fontsize=7.5, frameon=False)
    return save(fig, path)


def curves(result: dict, path: Path) -> Path:
    """Dev loss and dev label accuracy over the steps. compare and the others: one colour per method, one line per
    seed; tune: one panel pair per method, one line per learning rate (the chosen one drawn thicker)."""
    rows = result["rows"]
    if result["name"].startswith("tune"):
        fig, axes = plt.subplots(2, len(rows), figsize=(2.6 * len(rows), 5), sharex=True, sharey="row", squeeze=False)
        for c, row in enumerate(rows):
            for k, run in enumerate(row["runs"]):
                chosen = run["lr"] == row["lr"]
                style = dict(color=METHOD_COLOURS[k % 10], lw=2.4 if chosen else 1.1, marker="o", ms=3,
                             label=f"lr {run['lr']:g}" + (" (chosen)" if chosen else ""))
                plot_history(axes[0, c], axes[1, c], run["history"], style)
            axes[0, c].set_title(row["method"], fontsize=9)
            axes[1, c].legend(fontsize=7, frameon=False)
            axes[1, c].set_xlabel("step")
        axes[0, 0].set_ylabel("dev loss")
        axes[1, 0].set_ylabel("dev label accuracy (%)")
        fig.suptitle(f"{result['title']}: learning curves on the dev split", fontsize=10)
    else:
        # the dev label accuracy panel only where runs measured it (--select-by label-acc): BoolQ's keep the dev loss
        scored = any(h[3] is not None for row in rows for run in row["runs"] for h in run["history"] or [])
        fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(11 if scored else 6, 4), squeeze=False)
        loss_ax, acc_ax = axes[0, 0], axes[0, -1]  # one panel: the legend goes on the dev loss
        for c, row in enumerate(rows):
            for s, run in enumerate(row["runs"]):
                style = dict(color=METHOD_COLOURS[c % 10], lw=1.3, alpha=0.85, marker="o", ms=3,
                             ls=("-", "--", ":")[s % 3], label=row["method"] if s == 0 else None)
                plot_history(loss_ax, acc_ax, run["history"] or [], style)
        seeds = ", ".join(str(run["seed"]) for run in rows[0]["runs"])
        loss_ax.set(xlabel="step", ylabel="dev loss", title="dev loss")
        if scored:
            acc_ax.set(xlabel="step", ylabel="dev label accuracy (%)", title="dev label accuracy")
        acc_ax.legend(fontsize=7.5, frameon=False)
        wrap = " " if scored else "\n"  # one panel is narrower: the seeds' key on a second line
        fig.suptitle(f"{result['title']}: learning curves on the dev split{wrap}(seeds {seeds}: solid, dashed, dotted)",
                     fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def plot_history(loss_ax, acc_ax, history: list, style: dict):
    """history: [step, train loss, dev loss, dev label accuracy or None] per evaluation, as lab.compact writes it."""
    steps = [h[0] for h in history]
    loss_ax.plot(steps, [h[2] for h in history], **style)
    if any(h[3] is not None for h in history):
        acc_ax.plot(steps, [math.nan if h[3] is None else h[3] for h in history], **style)


def tune(result: dict, path: Path) -> Path:
    """Dev label accuracy of each method at each learning rate; the rate tune chose is ringed."""
    rows, rates = result["rows"], result["rates"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for c, row in enumerate(rows):
        accs = [run["best_dev_label_acc"] for run in row["runs"]]
        colour = METHOD_COLOURS[c % 10]
        ax.plot([run["lr"] for run in row["runs"]], accs, "o-", color=colour, label=row["method"])
        best = next(run for run in row["runs"] if run["lr"] == row["lr"])
        ax.plot(best["lr"], best["best_dev_label_acc"], "o", ms=13, mfc="none", mec=colour, mew=1.5)
    ax.set_xscale("log")
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.minorticks_off()
    ax.set(xlabel="learning rate", ylabel="dev label accuracy (%) of the kept adapter",
           title=f"{result['title']}\n(ringed: the rate chosen; seed {result.get('seed', 0)})")
    ax.title.set_fontsize(10)
    ax.grid(color="0.92")
    ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    return save(fig, path)


# --------------------------------------------------------------------------------------- inside PARA: vectors

def vectors(result: dict, path: Path) -> Path:
    """By layer, for each adapter: the prompt-dependent share of the adjustment (mean over the targets), how far the
    vectors are from the identity, and for the capsule pooler the length of the pooled z against its maximum."""
    adapters = result["adapters"]
    capsules = [a for a in adapters if a.get("pooled")]
    panels = 3 if capsules else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4))
    for c, a in enumerate(adapters):
        layers = sorted({int(key.split(".")[0]) for key in a["stats"]})
        by_layer = lambda what: [statistics.fmean(s[what] for key, s in a["stats"].items()
                                                  if int(key.split(".")[0]) == i) for i in layers]
        style = dict(color=METHOD_COLOURS[c % 10], marker="o", label=a["label"])
        axes[0].plot(layers, by_layer("prompt_share"), **style)
        axes[1].plot(layers, by_layer("off_identity"), **style)
    # symlog: the last-token pooler's layer 0 is exactly 0 (every prompt ends in the same token), the rest spans decades
    axes[0].set_yscale("symlog", linthresh=1e-6)
    axes[0].set_ylim(bottom=0)
    axes[0].set(xlabel="layer", ylabel="prompt-dependent share (0: a constant vector, as (IA)^3)",
                title="how much of the adjustment depends on the prompt")
    axes[1].set(xlabel="layer", ylabel="mean |l - 1|", title="how far the vectors are from the identity")
    if capsules:
        for c, a in enumerate(adapters):
            if a.get("pooled"):
                pooled = sorted(a["pooled"], key=int)
                axes[2].plot([int(i) for i in pooled], [a["pooled"][i]["norm"] for i in pooled], marker="o",
                             color=METHOD_COLOURS[c % 10], label=a["label"])
        K = capsules[0]["K"]
        axes[2].axhline(math.sqrt(K), color="0.4", ls="--", lw=1, label=f"the most it can be: sqrt(K) = {K ** 0.5:g}")
        axes[2].set_ylim(0, math.sqrt(K) * 1.1)
        axes[2].set(xlabel="layer", ylabel="mean |z|", title="capsule pooler: length of the pooled z")
        axes[2].legend(fontsize=7, frameon=False, loc="lower right")
    for ax in axes:
        ax.title.set_fontsize(9)
        ax.set_xticks(layers)
        ax.grid(color="0.92")
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(f"{result['title']}, {adapters[0]['prompts']} test prompts", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


# ------------------------------------------------------------------------------------ inside PARA: attention

def attention(path: Path, maps: dict, layer: int, heads: list, system_end: int, scale: int = 3) -> Path:
    """One layer's attention maps: a row per head, columns PARADE | (IA)^3 | PARADE - (IA)^3. maps: name ->
    {layer: [heads, T, T] probabilities}. Rows are query tokens, columns the keys they attend to; colour is
    sqrt(weight), so the weak weights still show beside the first token's attention sink, and the difference is
    the signed sqrt of its share of the largest difference. scale: about this many pixels per token."""
    T = maps["PARADE"][layer].shape[-1]
    side = max(T * scale / DPI, 1.5)  # inches per panel
    fig, axes = plt.subplots(len(heads), 3, figsize=(3 * side + 0.6, len(heads) * side + 1.4), squeeze=False,
                             layout="constrained")
    for r, h in enumerate(heads):
        a, b = maps["PARADE"][layer][h], maps["(IA)^3"][layer][h]
        d = a - b
        d = np.sign(d) * np.sqrt(np.abs(d) / max(np.abs(d).max(), 1e-12))  # signed, in [-1, 1]
        panels = [(np.sqrt(a), "viridis", 0, 1, "PARADE"), (np.sqrt(b), "viridis", 0, 1, "(IA)^3"),
                  (d, "RdBu_r", -1, 1, "PARADE - (IA)^3")]
        for c, (image, cmap, vmin, vmax, title) in enumerate(panels):
            ax = axes[r, c]
            shown = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            for line in (ax.axvline, ax.axhline):  # where the system prompt ends
                line(system_end - 0.5, color="white" if c < 2 else "0.5", lw=0.6, ls=":")
            ax.set_title(f"layer {layer}, head {h}: {title}", fontsize=8)
            ax.tick_params(labelsize=6)
            if c == 0:
                ax.set_ylabel("query token", fontsize=7)
            if r == len(heads) - 1:
                ax.set_xlabel("key token", fontsize=7)
            if r == 0 and c > 0:  # one scale under PARADE and (IA)^3, one under their difference
                bar = fig.colorbar(shown, ax=axes[:, :2] if c == 1 else axes[:, 2], location="bottom", shrink=0.6,
                                   aspect=30)
                bar.set_label("sqrt(attention weight)" if c == 1 else "blue: less under PARADE, red: more",
                              fontsize=7)
                bar.ax.tick_params(labelsize=6)
    fig.suptitle(f"Attention, layer {layer} (dotted: the end of the system prompt, token {system_end - 1})",
                 fontsize=9)
    return save(fig, path)
