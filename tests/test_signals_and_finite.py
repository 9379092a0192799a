"""Signals that save (SIGTERM as Ctrl-C, interrupts that wait for a write) and weights that
must be finite (model files, resumes, the "last good" checkpoint)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides
from method_contract import tiny_config

from protoseg.cli import main
from protoseg.config import load_config
from protoseg.engine.checkpoint import checkpoint_dir, latest_finite_checkpoint
from protoseg.engine.trainer import NonFiniteLossError, Trainer
from protoseg.files import (
    CheckpointError,
    atomic_write,
    load_file,
    non_finite_tensors,
    save_file,
    state_is_finite,
)
from protoseg.inference import load, model_payload
from protoseg.models import create_model
from protoseg.signals import deferred_interrupts, sigterm_as_interrupt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt in these tests, as in a terminal: a process started in
    the background by a shell without job control inherits SIGINT ignored, and Python then
    leaves it ignored, so the signals these tests send would be lost."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


# ---- SIGTERM as Ctrl-C ------------------------------------------------------------------------
def test_sigterm_raises_keyboard_interrupt_and_the_old_handler_comes_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs at the next bytecode; never reached
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigterm_to_a_real_training_process_saves_a_checkpoint(
    synthetic_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "protoseg.cli", "train", "synthetic/supervised.yaml"]
    argv += tiny_overrides(synthetic_root, run, "train.iterations=100000", "train.log_every=1")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # wait for the second logged step: the loop is running
        lines.append(line)
        if " step 2/100000 " in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert "run the same command again to resume" in output
    saved = sorted(checkpoint_dir(run).glob("step_*.pt"))
    assert saved, output
    assert load_file(saved[-1])["step"] >= 2


# ---- interrupts that wait for a write ---------------------------------------------------------
class InterruptingHandle:
    """A file whose writes deliver SIGINT to this process (as a user's Ctrl-C would) midway
    through torch.save's C++ writer; ``times`` interrupts, on the first writes."""

    def __init__(self, handle, times: int = 1) -> None:
        self.handle, self.times, self.calls = handle, times, 0

    def write(self, data) -> int:
        self.calls += 1
        if self.calls <= self.times:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # let the Python-level handler run here
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def test_ctrl_c_during_a_checkpoint_write_finishes_the_file_then_stops(tmp_path: Path) -> None:
    state = {"format": "protoseg-training/2", "weights": torch.arange(100_000.0)}
    target = tmp_path / "step_0000010.pt"
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, lambda handle: torch.save(state, InterruptingHandle(handle)))
    assert torch.equal(load_file(target)["weights"], state["weights"])  # complete and readable
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "step_0000010.pt"
    save_file({"format": "protoseg-training/2", "step": 1}, target)
    state = {"format": "protoseg-training/2", "step": 2, "weights": torch.arange(100_000.0)}
    with pytest.raises((KeyboardInterrupt, CheckpointError)):
        atomic_write(target, lambda h: torch.save(state, InterruptingHandle(h, times=2)))
    assert load_file(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_deferred_interrupts_leave_a_non_interrupt_sigterm_alone() -> None:
    # Outside sigterm_as_interrupt SIGTERM keeps its own handler while a write runs.
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with deferred_interrupts("a test"):
            assert signal.getsignal(signal.SIGTERM) is not signal.default_int_handler
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_during_a_training_checkpoint_keeps_that_checkpoint(
    synthetic_root: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    run = tmp_path / "r"
    extra = ["train.iterations=6", "train.checkpoint_every=2"]
    cfg = load_config("synthetic/supervised.yaml", tiny_overrides(synthetic_root, run, *extra))
    real_save = torch.save
    interrupted = []

    def save(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 2 and not interrupted:
            interrupted.append(True)
            return real_save(obj, InterruptingHandle(handle), *args, **kwargs)
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg).fit()
    checkpoint = checkpoint_dir(run) / "step_0000002.pt"
    assert load_file(checkpoint)["step"] == 2
    assert "disk has room" not in caplog.text
    assert f"saved {checkpoint}" in caplog.text


# ---- finite weights -----------------------------------------------------------------------------
def _model_file(tmp_path: Path, poison: str | None = None) -> Path:
    cfg = tiny_config("supervised", "data.num_classes=6", "data.class_names=[]")
    payload = model_payload(cfg, create_model(cfg.model, 6), {})
    if poison:
        payload["state_dict"][poison] = payload["state_dict"][poison].clone()
        payload["state_dict"][poison].view(-1)[0] = float("nan")
    return save_file(payload, tmp_path / ("bad.pt" if poison else "good.pt"))


def test_a_model_file_with_one_nan_bias_is_refused_naming_it(tmp_path: Path, capsys) -> None:
    good = _model_file(tmp_path)
    bias = next(k for k in torch.load(good, weights_only=True)["state_dict"] if "bias" in k)
    bad = _model_file(tmp_path, poison=bias)
    with pytest.raises(CheckpointError, match=f"NaN or infinite values \\({bias}\\)"):
        load(bad)
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 24), (10, 200, 10)).save(image)
    argv = ["predict", str(image), "--checkpoint", str(bad), "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    assert bias in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_finiteness_is_judged_per_tensor_in_nested_states() -> None:
    state = {"a": torch.ones(3), "b": {"c": [torch.zeros(2), torch.tensor([1.0, float("inf")])]}}
    assert non_finite_tensors(state) == ["b.c.1"]
    assert not state_is_finite(state)
    state["b"]["c"][1] = torch.tensor([1, 2])  # integers are always finite
    assert state_is_finite(state)


def test_the_newest_finite_checkpoint_is_the_last_good_one(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    for step, value in ((2, 1.0), (4, 2.0), (6, float("nan"))):
        state = {"format": "protoseg-training/2", "method": {"w": torch.full((3,), value)}}
        save_file(state, folder / f"step_{step:07d}.pt")
    (folder / "step_0000008.pt").write_bytes(b"truncated")
    assert latest_finite_checkpoint(folder) == folder / "step_0000004.pt"


def _diverging_trainer(root: Path, run: Path) -> Trainer:
    """A trainer whose weights turn NaN in the update of step 3 while that step's loss is
    finite (as an overflowing learning rate does), so the step-4 checkpoint is NaN."""
    extra = ["train.iterations=8", "train.checkpoint_every=1", "train.keep_last=8"]
    trainer = Trainer(load_config("synthetic/supervised.yaml", tiny_overrides(root, run, *extra)))
    after_step = trainer.method.after_optimizer_step

    def diverge(step: int) -> None:
        after_step(step)
        if step == 3:
            with torch.no_grad():
                next(trainer.method.student.parameters()).fill_(float("nan"))

    trainer.method.after_optimizer_step = diverge  # type: ignore[method-assign]
    return trainer


def test_resuming_from_a_non_finite_checkpoint_is_refused(
    synthetic_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "r"
    with pytest.raises(NonFiniteLossError):
        _diverging_trainer(synthetic_root, run).fit()
    cfg = load_config(
        "synthetic/supervised.yaml",
        tiny_overrides(synthetic_root, run, "train.iterations=8", "train.checkpoint_every=1"),
    )
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        Trainer(cfg).fit()


def test_the_last_good_checkpoint_named_after_a_divergence_is_finite(
    synthetic_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "r"
    with pytest.raises(NonFiniteLossError) as err:
        _diverging_trainer(synthetic_root, run).fit()
    found = re.search(r"the last good checkpoint is (\S+?\.pt)", str(err.value))
    assert found, err.value
    named = Path(found.group(1))
    assert state_is_finite(load_file(named)["method"])


def test_ctrl_c_during_a_periodic_evaluation_keeps_that_evaluation(
    synthetic_root: Path, tmp_path: Path
) -> None:
    run = tmp_path / "r"
    extra = ["train.iterations=6", "train.eval_every=2"]
    trainer = Trainer(
        load_config("synthetic/supervised.yaml", tiny_overrides(synthetic_root, run, *extra))
    )
    evaluate = trainer.evaluate

    def interrupted_evaluate(desc):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the evaluation runs
        time.sleep(0.05)
        return evaluate(desc)

    trainer.evaluate = interrupted_evaluate  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert (run / "best.pt").is_file()  # the evaluation at step 2 finished and counted
    assert trainer.best_step == 2


def test_pretrained_weights_with_a_nan_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    from protoseg.models import ModelError
    from protoseg.models.weights import read_state_dict

    state = {"conv1.weight": torch.ones(4, 3, 3, 3), "fc.bias": torch.zeros(5)}
    state["fc.bias"][2] = float("inf")
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"NaN or infinite values \(fc\.bias\)"):
        read_state_dict(path)
    state["fc.bias"][2] = 0.0
    torch.save(state, path)
    assert set(read_state_dict(path)) == {"conv1.weight", "fc.bias"}


def test_a_prototype_bank_with_a_nan_is_refused(tmp_path: Path) -> None:
    from test_methods import TestPCR

    method, _ = TestPCR().build()
    bank = method.branch.bank.prototypes.detach().clone()
    bank[0, 0, 0] = float("nan")
    path = tmp_path / "bank.pt"
    torch.save({"prototypes": bank}, path)
    with pytest.raises(ValueError, match="bank holds NaN"):
        method.branch.load_bank(path)
