"""What happens around the loop: progress and logs, periodic evaluation with best-model
tracking, checkpoints and the final outputs. Each callback reacts to a few typed events
(``protoseg.engine.state``) and acts through the ``RunContext`` it got at the start."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from protoseg.engine.checkpoint import checkpoint_dir, prune_checkpoints
from protoseg.engine.runtime import deferred_interrupts
from protoseg.engine.state import FinalEvaluation, RunContext, StepEnd, TrainEnd
from protoseg.files import atomic_write, save_file
from protoseg.inference import EvalResult, format_table, save_result
from protoseg.progress import show_progress

log = logging.getLogger("protoseg.train")


class Callback:
    """No-op events; a callback overrides the ones it needs (main and other ranks alike)."""

    def on_train_start(self, run: RunContext) -> None:
        """Before the first step of this process (after any resume)."""

    def on_step_end(self, event: StepEnd) -> None:
        """After each optimiser step."""

    def on_train_end(self, event: TrainEnd) -> None:
        """After the last step of this call (finished or stopped early)."""

    def on_final_evaluation(self, event: FinalEvaluation) -> None:
        """After the final evaluation of a finished run (and its checkpoint)."""


class ProgressLogger(Callback):
    """Running means every ``train.log_every`` steps: history, TensorBoard, bar or log lines.

    A progress bar on a terminal (``train.progress``); plain log lines otherwise, so a batch
    job's log holds the step, losses, lr, speed and ETA instead of bar redraws.
    """

    def __init__(self) -> None:
        self.running: dict[str, float] = {}
        self.count = 0
        self.bar: Any = None
        self.redirect: Any = None
        self.started = 0.0
        self.start_step = 0
        self.run: RunContext | None = None

    def on_train_start(self, run: RunContext) -> None:
        """Open the bar (rank 0, on a terminal)."""
        self.run = run
        if not run.is_main:
            return
        cfg = run.cfg
        if show_progress(cfg.train.progress):
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(
                total=run.total_steps,
                initial=run.state.step,
                desc=cfg.method.name,
                dynamic_ncols=True,
            )
            # Log lines go through the bar instead of breaking it.
            self.redirect = logging_redirect_tqdm()
            self.redirect.__enter__()
        self.started, self.start_step = time.perf_counter(), run.state.step

    def on_step_end(self, event: StepEnd) -> None:
        """Accumulate the step's terms; write their means at the logging cadence."""
        run = self.run
        assert run is not None, "on_train_start comes first"
        for key, value in event.logs.items():
            self.running[key] = self.running.get(key, 0.0) + value
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        step, total = event.step, run.total_steps
        if not run.is_main or (step % run.cfg.train.log_every and step != total):
            return
        means = {k: v / self.count for k, v in self.running.items()}
        means["lr"] = run.lr()
        for key, value in means.items():
            run.writer.add_scalar(f"train/{key}", value, step)
        run.state.history.append({"step": step, **means})
        self.running, self.count = {}, 0
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{means['lr']:.2e}")
        done = step - self.start_step
        per_step = (time.perf_counter() - self.started) / max(done, 1)
        terms = " ".join(f"{k}={v:.4g}" for k, v in means.items() if k not in ("lr", "loss"))
        memory = ""
        if run.device.type == "cuda":
            memory = f" mem={torch.cuda.max_memory_allocated(run.device) / 2**30:.1f}GiB"
        log.info(
            "step %d/%d loss=%.4f %s lr=%.3e %.2fs/it eta=%s%s",
            step,
            total,
            means["loss"],
            terms,
            means["lr"],
            per_step,
            _duration(per_step * (total - step)),
            memory,
        )

    def on_train_end(self, event: TrainEnd) -> None:
        """Close the bar; the writer is closed by the trainer after the final evaluation."""
        if self.redirect is not None:
            self.redirect.__exit__(None, None, None)
            self.redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def track_best(run: RunContext, results: dict[str, EvalResult]) -> None:
    """Remember the best primary-head result and write its model file as ``best.pt``."""
    if run.state.is_new_best(results) and run.is_main:
        save_file(run.model_file(), run.out_dir / "best.pt")


def history_entry(
    history: list[dict[str, float]], step: int, results: dict[str, EvalResult]
) -> dict[str, float]:
    """An evaluation's history entry: each head's mIoU (``val_miou_<head>``) and its best so
    far (``best_val_miou_<head>``); ``best.pt`` follows the primary head alone, so the other
    heads' best results are kept here."""
    entry: dict[str, float] = {"step": step}
    for head, res in results.items():
        earlier = [e[f"val_miou_{head}"] for e in history if f"val_miou_{head}" in e]
        entry[f"val_miou_{head}"] = res.miou
        entry[f"best_val_miou_{head}"] = max([*earlier, res.miou])
    return entry


class PeriodicEvaluation(Callback):
    """Validation every ``train.eval_every`` steps; keeps ``best.pt`` of the primary head."""

    def __init__(self) -> None:
        self.run: RunContext | None = None

    def on_train_start(self, run: RunContext) -> None:
        """Keep the run's context."""
        self.run = run

    def on_step_end(self, event: StepEnd) -> None:
        """Evaluate at the cadence, except at the last step (the final evaluation does)."""
        run = self.run
        assert run is not None, "on_train_start comes first"
        every, step = run.cfg.train.eval_every, event.step
        if not every or step % every or step >= run.total_steps:
            return
        # A Ctrl-C or SIGTERM here waits for the evaluation and the best model to be kept, so
        # an interrupted run's best.pt is the one an uninterrupted run would have.
        with deferred_interrupts(f"the evaluation at step {step}"):
            results = run.evaluate(f"eval@{step}")
            track_best(run, results)
        if run.is_main:
            for head, res in results.items():
                run.writer.add_scalar(f"val/miou_{head}", res.miou, step)
                log.info("step %d: validation mIoU (%s head) %.2f", step, head, res.miou)
            run.state.history.append(history_entry(run.state.history, step, results))
        run.set_train_mode()


class Checkpointing(Callback):
    """``checkpoints/step_<n>.pt`` every ``train.checkpoint_every`` steps (rank 0)."""

    def __init__(self) -> None:
        self.run: RunContext | None = None

    def on_train_start(self, run: RunContext) -> None:
        """Keep the run's context."""
        self.run = run

    def on_step_end(self, event: StepEnd) -> None:
        """Save at the cadence."""
        assert self.run is not None, "on_train_start comes first"
        every = self.run.cfg.train.checkpoint_every
        if every and event.step % every == 0:
            self.run.save_checkpoint()


class FinalOutputs(Callback):
    """Final results per head, the best result, model.pt and history.json (rank 0)."""

    def __init__(self) -> None:
        self.run: RunContext | None = None

    def on_train_start(self, run: RunContext) -> None:
        """Keep the run's context."""
        self.run = run

    def on_final_evaluation(self, event: FinalEvaluation) -> None:
        """Write the run's result files."""
        run = self.run
        assert run is not None, "on_train_start comes first"
        if not run.is_main:
            return
        names, state = run.cfg.data.class_names, run.state
        for head, res in event.results.items():
            run.writer.add_scalar(f"val/miou_{head}", res.miou, event.step)
            save_result(
                res,
                run.out_dir / f"eval_final_{head}.json",
                names,
                {"step": event.step, "head": head, "mode": run.cfg.eval.mode},
            )
            log.info("final (%s head) at step %d:\n%s", head, event.step, format_table(res, names))
        if state.best is not None:
            save_result(
                state.best, run.out_dir / "eval_best.json", names, {"step": state.best_step}
            )
        save_file(run.model_file(), run.out_dir / "model.pt")
        history = json.dumps(state.history).encode()
        atomic_write(run.out_dir / "history.json", lambda handle: handle.write(history))


def default_callbacks() -> list[Callback]:
    """Logging, periodic evaluation and checkpoints, in this order (the trainer adds
    ``FinalOutputs`` after whatever callbacks it is given)."""
    return [ProgressLogger(), PeriodicEvaluation(), Checkpointing()]


def save_checkpoint(state: dict[str, Any], out_dir: Any, step: int, keep_last: int) -> None:
    """Write ``step_<n>.pt`` atomically and drop the oldest beyond ``keep_last``."""
    folder = checkpoint_dir(out_dir)
    save_file(state, folder / f"step_{step:07d}.pt")
    prune_checkpoints(folder, keep_last)
