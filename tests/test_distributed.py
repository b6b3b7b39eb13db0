# train.py under torchrun, on CPU: two processes started here with the environment torchrun gives them (RANK,
# WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / PORT) and the gloo backend, on the shared 260K model, against one process.
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_train import run_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from para_mini.adapters import read_adapter  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch has no torch.distributed gloo backend")


def rank_worker(rank, world, port, runs, tmp):
    """One torchrun-like process: each run is (args, step after which rank 0 gets a Ctrl-C, or None)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    writes = []
    if rank != 0:  # record every file this rank creates, writes, renames or makes under the test's directory
        def audit(event, a):
            if event == "open" and str(a[0]).startswith(tmp) and (
                    any(c in (a[1] or "") for c in "wax+") or (a[2] or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                writes.append((event, str(a[0])))
            elif event in ("os.rename", "os.mkdir", "os.remove") and str(a[0]).startswith(tmp):
                writes.append((event, str(a[0])))
        sys.addaudithook(audit)
    for args, ctrl_c_at in runs:
        def on_step(step):
            if rank == 0 and step == ctrl_c_at:
                os.kill(os.getpid(), signal.SIGINT)
        try:
            train.train(args, on_step=on_step)
        except KeyboardInterrupt:
            assert ctrl_c_at is not None
    if rank != 0:
        assert not writes, f"rank {rank} wrote {writes}"
    dist.destroy_process_group()


def torchrun(tmp_path, runs, world=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_worker, args=(world, port, runs, str(tmp_path)), nprocs=world)


def final_adapter(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["adapter"]


# a global batch of 8: one process runs two micro-batches of 4; two ranks run one each
GLOBAL_8 = ("--batch-size", "4", "--grad-accum", "2", "--max-steps", "8", "--eval-every", "4")


def test_two_ranks_train_the_same_adapter_as_one_process_and_only_rank_0_writes_and_a_resumed_run_is_exact(tmp_path):
    args = lambda name, *extra: run_args(tmp_path, *GLOBAL_8, "--out", str(tmp_path / name), *extra)
    for method in ("para", "lora"):
        train.train(args(f"one-{method}", "--method", method))
    torchrun(tmp_path, [(args("two-para"), None), (args("two-lora", "--method", "lora"), None),
                        (args("broken"), 6), (args("broken", "--resume"), None)])

    for method in ("para", "lora"):
        one, two = final_adapter(tmp_path / f"one-{method}"), final_adapter(tmp_path / f"two-{method}")
        assert one.keys() == two.keys()
        for k in one:
            assert torch.allclose(one[k], two[k], rtol=0, atol=1e-5), (method, k, (one[k] - two[k]).abs().max())
        assert (tmp_path / f"two-{method}" / "summary.json").is_file()
        assert (tmp_path / f"two-{method}" / "adapter.safetensors").is_file()
    # Ctrl-C on rank 0 after step 6 stopped both ranks there; the resumed run ends exactly where the straight one does
    straight, resumed = final_adapter(tmp_path / "two-para"), final_adapter(tmp_path / "broken")
    assert torch.load(tmp_path / "broken" / "checkpoint.pt", weights_only=True)["step"] == 8
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not list(tmp_path.rglob("*.tmp"))


def test_the_sharded_mode_trains_the_same_adapter_as_one_process(tmp_path):
    args = lambda name, *extra: run_args(tmp_path, *GLOBAL_8, "--out", str(tmp_path / name), *extra)
    train.train(args("one"))
    torchrun(tmp_path, [(args("sharded", "--shard"), None)])
    _, _, one = read_adapter(tmp_path / "one" / "adapter.safetensors")
    _, _, sharded = read_adapter(tmp_path / "sharded" / "adapter.safetensors")
    assert one.keys() == sharded.keys()
    for k in one:
        assert torch.allclose(one[k], sharded[k], rtol=0, atol=1e-5), (k, (one[k] - sharded[k]).abs().max())
    assert not (tmp_path / "sharded" / "checkpoint.pt").exists()  # --shard writes no resumable checkpoint (README)
    assert (tmp_path / "sharded" / "summary.json").is_file()
