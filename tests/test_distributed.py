# train.py under torchrun, on CPU: two processes started here with the environment torchrun gives them (RANK,
# WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / PORT) and the gloo backend, on the shared 260K model, against one process.
# Starting processes is slow on a small machine, so all the runs are made once (the `runs` fixture) and each test
# reads the part it states a fact about.
import os
import signal
import socket
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_train import run_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from para_mini.adapters import read_adapter  # noqa: E402
from para_mini.distributed import whole  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch has no torch.distributed gloo backend")

# a global batch of 8: one process runs two micro-batches of 4; two ranks run one each
GLOBAL_8 = ("--batch-size", "4", "--grad-accum", "2", "--max-steps", "8", "--eval-every", "4")
CLIP = torch.nn.utils.clip_grad_norm_


def first_gradient(into, name):
    """train.py clips every step's gradient, summed over the ranks, before AdamW sees it: keep the first step's,
    whole (a direct check of the loss scaling, which AdamW and clipping would hide in the trained adapter)."""
    def clip(params, *a, **k):
        params = list(params)
        if name not in into:
            into[name] = [whole(p.grad).detach().clone() for p in params]  # --shard: every rank gathers
        return CLIP(params, *a, **k)
    return mock.patch.object(torch.nn.utils, "clip_grad_norm_", clip)


def train_one(args, grads, ctrl_c_at=None):
    """One run: its first step's gradient kept in grads; a Ctrl-C on rank 0 after step ctrl_c_at, if given."""
    def on_step(step):
        if step == ctrl_c_at and int(os.environ.get("RANK", 0)) == 0:
            os.kill(os.getpid(), signal.SIGINT)
    with first_gradient(grads, Path(args.out).name):
        try:
            train.train(args, on_step=on_step)
        except KeyboardInterrupt:
            assert ctrl_c_at is not None


def rank_worker(rank, world, port, runs, tmp):
    """One torchrun-like process: each run is (args, step after which rank 0 gets a Ctrl-C, or None)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    writes, grads = [], {}
    if rank != 0:  # record every file this rank creates, writes, renames or makes under the test's directory
        def audit(event, a):
            if event == "open" and str(a[0]).startswith(tmp) and (
                    any(c in (a[1] or "") for c in "wax+") or (a[2] or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                writes.append((event, str(a[0])))
            elif event in ("os.rename", "os.mkdir", "os.remove") and str(a[0]).startswith(tmp):
                writes.append((event, str(a[0])))
        sys.addaudithook(audit)
    for args, ctrl_c_at in runs:
        train_one(args, grads, ctrl_c_at)
    if rank != 0:
        assert not writes, f"rank {rank} wrote {writes}"
    else:
        torch.save(grads, Path(tmp) / "first-gradients.pt")
    dist.destroy_process_group()


def torchrun(tmp_path, runs, world=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_worker, args=(world, port, runs, str(tmp_path)), nprocs=world)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run once: one process (PARA, LoRA, PARA stopped by Ctrl-C after step 6), then two ranks: DDP (PARA, LoRA,
    PARA stopped after step 6 and resumed) and --shard (PARA, the same stopped and resumed, and the one process's
    stopped run resumed). Only rank 1 is audited for writes."""
    tmp = tmp_path_factory.mktemp("torchrun")
    args = lambda name, *extra: run_args(tmp, *GLOBAL_8, "--out", str(tmp / name), *extra)
    one_grads = {}
    for method in ("para", "lora"):
        train_one(args(f"one-{method}", "--method", method), one_grads)
    train_one(args("one-then-sharded"), one_grads, ctrl_c_at=6)
    torchrun(tmp, [(args("two-para"), None), (args("two-lora", "--method", "lora"), None),
                   (args("broken"), 6), (args("broken", "--resume"), None),
                   (args("sharded", "--shard"), None),
                   (args("sharded-broken", "--shard"), 6), (args("sharded-broken", "--shard", "--resume"), None),
                   (args("one-then-sharded", "--shard", "--resume"), None)])
    return tmp, one_grads, torch.load(tmp / "first-gradients.pt", weights_only=True)


def final_adapter(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["adapter"]


def assert_close(one, two, atol, what):
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=0, atol=atol), (what, k, (one[k] - two[k]).abs().max())


def test_the_summed_gradients_of_two_ranks_are_one_process_gradient(runs):
    tmp, one, two = runs
    for name, ref in (("two-para", "one-para"), ("two-lora", "one-lora"), ("sharded", "one-para")):
        assert len(two[name]) == len(one[ref])
        scale = max(g.abs().max() for g in one[ref])
        assert scale > 0
        for a, b in zip(one[ref], two[name], strict=True):
            assert (a - b).abs().max() <= 1e-6 * scale, (name, (a - b).abs().max() / scale)


def test_two_ranks_train_the_same_adapter_as_one_process(runs):
    tmp, _, _ = runs
    for method in ("para", "lora"):
        assert_close(final_adapter(tmp / f"one-{method}"), final_adapter(tmp / f"two-{method}"), 1e-5, method)
        assert (tmp / f"two-{method}" / "summary.json").is_file()
        assert (tmp / f"two-{method}" / "adapter.safetensors").is_file()


def test_the_sharded_mode_trains_the_same_adapter_as_one_process(runs):
    tmp, _, _ = runs
    _, _, one = read_adapter(tmp / "one-para" / "adapter.safetensors")
    _, _, sharded = read_adapter(tmp / "sharded" / "adapter.safetensors")
    assert_close(one, sharded, 1e-5, "adapter.safetensors")
    assert_close(final_adapter(tmp / "one-para"), final_adapter(tmp / "sharded"), 1e-5, "checkpoint.pt")
    assert (tmp / "sharded" / "summary.json").is_file()


def test_only_rank_0_writes_and_a_resumed_two_rank_run_continues_exactly_with_or_without_shard(runs):
    tmp, _, _ = runs  # rank 1 wrote nothing: the workers assert it
    # Ctrl-C on rank 0 after step 6 stopped both ranks there; the resumed run ends exactly where the straight one does
    for straight, broken in (("two-para", "broken"), ("sharded", "sharded-broken")):
        resumed = torch.load(tmp / broken / "checkpoint.pt", weights_only=True)
        assert resumed["step"] == 8
        ref = torch.load(tmp / straight / "checkpoint.pt", weights_only=True)
        assert all(torch.equal(ref["adapter"][k], resumed["adapter"][k]) for k in ref["adapter"]), broken
        assert all(torch.equal(ref["optimizer"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"])
                   for i, s in resumed["optimizer"]["state"].items()), broken
    assert not list(tmp.rglob("*.tmp"))


def test_a_checkpoint_of_one_process_resumes_under_shard(runs):
    # the file is the same with or without --shard (a --shard one resumes alone too: docs/distributed.md)
    tmp, _, _ = runs
    assert torch.load(tmp / "one-then-sharded" / "checkpoint.pt", weights_only=True)["step"] == 8
    assert_close(final_adapter(tmp / "one-para"), final_adapter(tmp / "one-then-sharded"), 1e-5, "one, then --shard")
