"""Multi-process training on CPU (gloo) and crash recovery, as users of torchrun meet them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from helpers import tiny_overrides

from protoseg.config import load_config
from protoseg.engine.trainer import Trainer


def overrides(root, out, *extra):
    return tiny_overrides(root, out, "model.dropout=0", *extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_torchrun_rank(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives one process of a single-node job (one thread each)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def _ddp_worker(rank: int, world: int, port: int, args: list[str]) -> None:
    _as_torchrun_rank(rank, world, port)
    from protoseg.distributed import cleanup

    try:
        trainer = Trainer(load_config("synthetic/supervised.yaml", args))
        # model.sync_bn is on by default but needs CUDA: on CPU ranks keep plain BatchNorm.
        assert not any(
            isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.method.student.modules()
        )
        trainer.fit()
    finally:
        cleanup()


def parameters(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


def test_two_gloo_processes_match_one_process_with_the_same_total_batch(synthetic_root, tmp_path):
    """2 ranks x 2 images == 1 process x 2 micro-batches of 2 (BN sees 2 images in both)."""
    steps = ["train.iterations=3"]
    mp.start_processes(
        _ddp_worker,
        args=(2, _free_port(), overrides(synthetic_root, tmp_path / "ddp", *steps)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    single = Trainer(
        load_config(
            "synthetic/supervised.yaml",
            overrides(synthetic_root, tmp_path / "one", *steps, "train.max_device_batch=2"),
        )
    )
    assert single.data.accum_steps == 2
    single.fit()
    ddp, one = parameters(tmp_path / "ddp" / "model.pt"), parameters(tmp_path / "one" / "model.pt")
    assert ddp.keys() == one.keys()
    moved = 0
    initial = Trainer(
        load_config(
            "synthetic/supervised.yaml", overrides(synthetic_root, tmp_path / "init", *steps)
        )
    ).method.student.state_dict()
    for key in ddp:
        assert torch.allclose(ddp[key], one[key], atol=1e-5), key
        moved += not torch.equal(one[key], initial[key])
    assert moved > 10  # the runs trained, they did not just both keep the initial weights
    assert (tmp_path / "ddp" / "eval_final_linear.json").is_file()
    assert not (tmp_path / "ddp" / "checkpoints" / "rank1").exists()


def _train_command(root, out):
    return [
        sys.executable,
        "-m",
        "protoseg.cli",
        "train",
        "synthetic/supervised.yaml",
        *overrides(
            root, out, "train.iterations=14", "train.checkpoint_every=2", "train.keep_last=3"
        ),
    ]


# End to end (tens of seconds): in `make test-all`, not the default suite.
@pytest.mark.slow
def test_sigkill_mid_training_resumes_to_the_same_weights(synthetic_root, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(
        _train_command(synthetic_root, tmp_path / "straight"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_command(synthetic_root, out),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = out / "checkpoints" / "step_0000004.pt"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists() and not (out / "model.pt").exists(), "the run was not cut mid-way"

    again = subprocess.run(
        _train_command(synthetic_root, out), env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _wrapped_student_worker(rank: int, world: int, port: int, root, out) -> None:
    _as_torchrun_rank(rank, world, port)
    from helpers import METHOD_OVERRIDES

    from protoseg.distributed import cleanup

    try:
        for method in ("u2pl", "cps", "u2pl+pcr", "cps+pcr"):
            args = overrides(root, out / method, "train.iterations=2", *METHOD_OVERRIDES[method])
            trainer = Trainer(load_config(f"synthetic/{method}.yaml", args))
            before = {n: p.detach().clone() for n, p in trainer.method.named_parameters()}
            trainer.fit()
            method_state = trainer.method.state_dict()
            saved = {n: method_state[n] for n in before}
            saved.update(
                {n: v for n, v in method_state.items() if n.startswith(("queues.", "branch."))}
            )
            moved = [n for n, v in before.items() if not torch.equal(v, method_state[n])]
            torch.save({"state": saved, "moved": moved}, out / f"{method}_rank{rank}.pt")
    finally:
        cleanup()


# Two processes for ~40 s: in `make test-all`, not the default suite.
@pytest.mark.slow
def test_ranks_stay_identical_when_the_student_wraps_more_than_the_network(
    synthetic_root, tmp_path
):
    """U2PL's representation head and CPS's second network are inside DDP and the optimiser,
    U2PL's queues are gathered and the plug-in's bank is updated from every rank: every rank
    ends with the same weights, queues and prototypes."""
    mp.start_processes(
        _wrapped_student_worker,
        args=(2, _free_port(), synthetic_root, tmp_path),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    wrapped = {"u2pl": "student.representation.", "cps": "student.right."}
    for method in ("u2pl", "cps", "u2pl+pcr", "cps+pcr"):
        extra = wrapped[method.removesuffix("+pcr")]
        ranks = [torch.load(tmp_path / f"{method}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        # The extra part trained (the optimiser holds it) ...
        assert any(name.startswith(extra) for name in ranks[0]["moved"]), method
        # ... and identically on both ranks (DDP averaged its gradients).
        for key, value in ranks[0]["state"].items():
            assert torch.allclose(value, ranks[1]["state"][key], atol=1e-6), (method, key)
        if method.endswith("+pcr"):
            assert ranks[0]["state"]["branch.bank.initialized"], method
    u2pl = torch.load(tmp_path / "u2pl_rank0.pt", weights_only=True)["state"]
    assert u2pl["queues.length"].sum() > 0
