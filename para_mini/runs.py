# A training run's folder: one run per folder, files written whole or not at all, and a checkpoint that resumes
# only the run that wrote it (its settings, data and base weights compared by content). Every tensor in the
# checkpoint is whole, so one file resumes with or without torchrun, sharded or not.
import hashlib
import json
import os
from pathlib import Path

import torch

from .adapters import adapter_state, weights_digest
from .distributed import like, whole
from .loading import torch_load

# What a run leaves in its folder: a new run must not mix its files with these.
RUN_FILES = ("adapter.safetensors", "checkpoint.pt", "summary.json", "predictions_dev.jsonl", "predictions_test.jsonl")

# The settings a resumed run must share with the interrupted one, or it would not continue the same run.
SAME_RUN = ("data", "dev", "task", "max_train", "max_eval", "max_len", "system", "no_eos_loss", "weights", "method",
            "targets", "r", "pooler", "K", "lora_alpha", "proj", "lr", "weight_decay", "warmup", "epochs", "max_steps",
            "batch_size", "grad_accum", "clip", "eval_every", "patience", "seed", "select_by")


def check_files(files: dict, weights):
    """Every file a flag names (flag -> path or None) exists and is a file (--weights: or a folder), before anything
    is read."""
    for flag, path in files.items():
        if path is not None and Path(path).is_dir():
            raise ValueError(f"--{flag} {path} is a folder: give the file itself"
                             + (" (tokenizer.model)" if flag == "tokenizer" else " (.jsonl, .json, .tsv or .csv)"))
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"--{flag} {path}: no such file")
    if not Path(weights).exists():
        raise FileNotFoundError(f"--weights {weights}: no such file or folder")


def claim_out(out, resume, overwrite, rank=0):
    """Make `out` this run's folder. A folder holding another run is refused: it is continued (resume), replaced
    (overwrite) or left alone (another --out), never silently overwritten or mixed with this one. Under torchrun
    every rank checks (and refuses alike), rank 0 alone deletes."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        if not (out / "checkpoint.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}")
        return
    if found and not overwrite:
        raise FileExistsError(f"{out} already holds a run ({', '.join(found)}): continue it with --resume, "
                              "replace it with --overwrite, or give another --out")
    if rank == 0:  # the folder itself is made by the run's first file, so a run that fails before has left none
        for name in found:
            (out / name).unlink()


def atomic_save(obj, path):
    """torch.save, or a str written as text, through a temporary file: a stopped run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)  # the run's folder is made by its first file
    tmp = Path(str(path) + ".tmp")
    if isinstance(obj, str):
        tmp.write_text(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def save_predictions(kept, path):
    """(example, generated text) pairs as a run's predictions_<part>.jsonl: a JSON line each, written whole."""
    atomic_save("".join(json.dumps({"prompt": ex.query, "prediction": text, "references": ex.references}) + "\n"
                        for ex, text in kept), path)


def save_summary(summary: dict, path):
    atomic_save(json.dumps(summary, indent=2, default=str), path)


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def same_run_settings(settings: dict, model) -> dict:
    """The SAME_RUN part of a run's settings, its files by content, not by how their path is spelt (a relative and an
    absolute path are the same file), and the base weights by weights_digest (the adapter file records it too).
    Under --shard every rank must call this (weights_digest gathers)."""
    same = {k: settings[k] for k in SAME_RUN}
    same["data"], same["dev"] = file_digest(same["data"]), same["dev"] and file_digest(same["dev"])
    same["weights"] = weights_digest(model, whole)
    return same


def adapter_tensors(model):
    """The adapter's tensors by file name, whole; under --shard every rank must call this (it gathers)."""
    return {k: whole(v).detach().clone() for k, v in adapter_state(model).items()}


def set_adapter(model, tensors):
    """Copy an adapter's tensors (file name -> whole tensor) into the model; under --shard each rank its rows."""
    with torch.no_grad():
        for name, p in adapter_state(model).items():
            p.copy_(like(p, tensors[name]))


def checkpoint_state(model, opt, step, best, bad, settings, history=()):
    """Every tensor whole, so one file resumes with or without torchrun; under --shard every rank must call this.
    best: the kept evaluation's dev loss, or with --select-by label-acc [-accuracy, dev loss] (lower is better)."""
    optimizer = opt.state_dict()  # AdamW's moments are sharded like their parameters under --shard: gather them
    optimizer["state"] = {i: {k: whole(v) for k, v in s.items()} for i, s in optimizer["state"].items()}
    return {"step": step, "best": best, "bad": bad, "optimizer": optimizer, "settings": settings,
            "adapter": adapter_tensors(model), "history": list(history)}


def read_checkpoint(path):
    """train.py's checkpoint.pt, read with weights_only (it cannot run code); a file that cannot be read, or that is
    no checkpoint of ours, is one line of error."""
    anew = "Start anew with --overwrite, or give another --out"
    try:
        ck = torch_load(path, mmap=False, remedy=anew)
    except ValueError as e:
        raise ValueError(f"--resume: {e}" + ("" if str(e).endswith(anew) else f". {anew}")) from None
    keys = {"step", "best", "bad", "optimizer", "settings", "adapter"}
    if not isinstance(ck, dict) or not keys <= ck.keys():
        raise ValueError(f"--resume: {path} is not a checkpoint written by train.py (it has no "
                         f"{', '.join(sorted(keys - set(ck if isinstance(ck, dict) else ())))}). {anew}")
    return ck


def resume(ck, path, settings, model, opt, by_acc):
    """Put checkpoint ck (read from path) into the model's adapter and the optimizer, once its settings are this
    run's -> (step, best, evaluations without a better one, the evaluations' history). by_acc: this run keeps its
    best adapter by dev label accuracy, so best is (-accuracy, dev loss)."""
    changed = {k: (v, settings.get(k)) for k, v in ck["settings"].items() if settings.get(k) != v}
    if changed:
        raise ValueError(f"--resume: {path} was written with other settings (was, now; files and the base weights "
                         f"by content): {changed}; resume with the interrupted run's flags and files, or start anew "
                         "with another --out")
    set_adapter(model, ck["adapter"])
    # AdamW's state is by parameter position: the order of the adapter's tensors in the run that wrote it (older
    # checkpoints, from stacked tenants, had PARA's up.bias before up.weight, and shapes [1, ...])
    params = adapter_state(model)
    was, state = {name: i for i, name in enumerate(ck["adapter"])}, ck["optimizer"]["state"]
    ck["optimizer"]["state"] = {i: {k: v.view(p.shape) if v.dim() else v for k, v in state[was[n]].items()}
                                for i, (n, p) in enumerate(params.items()) if was[n] in state}
    params = list(params.values())
    for i, s in ck["optimizer"]["state"].items():  # under --shard each rank keeps its rows of each moment
        s.update({k: like(params[i], v) for k, v in s.items() if k != "step"})  # the step count is one number
    opt.load_state_dict(ck["optimizer"])
    best = tuple(ck["best"]) if isinstance(ck["best"], (list, tuple)) else ck["best"]
    if by_acc != isinstance(best, tuple):
        raise ValueError(f"--resume: {path} kept its best adapter by "
                         f"{'label-acc' if isinstance(best, tuple) else 'dev-loss'}: give that --select-by")
    return ck["step"], best, ck["bad"], ck.get("history", [])
