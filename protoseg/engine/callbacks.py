"""What happens around the loop: progress and logs, periodic evaluation with best-model
tracking, checkpoints. Each callback reacts to a few events of the Trainer."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from protoseg.engine.checkpoint import checkpoint_dir, prune_checkpoints
from protoseg.files import atomic_write, save_file
from protoseg.inference import format_table, save_result
from protoseg.progress import show_progress

if TYPE_CHECKING:
    from protoseg.engine.trainer import Trainer
    from protoseg.inference import EvalResult

log = logging.getLogger("protoseg.train")


class Callback:
    """No-op events; a callback overrides the ones it needs (main and other ranks alike)."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step of this process (after any resume)."""

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        """After each optimiser step; ``trainer.step`` already counts it."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step of this call (finished or stopped early)."""


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

    def on_train_start(self, trainer: Trainer) -> None:
        """Open the bar (rank 0, on a terminal)."""
        if not trainer.dist.is_main:
            return
        cfg = trainer.cfg
        if show_progress(cfg.train.progress):
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(
                total=trainer.total_steps,
                initial=trainer.step,
                desc=cfg.method.name,
                dynamic_ncols=True,
            )
            # Log lines go through the bar instead of breaking it.
            self.redirect = logging_redirect_tqdm()
            self.redirect.__enter__()
        self.started, self.start_step = time.perf_counter(), trainer.step

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        """Accumulate the step's terms; write their means at the logging cadence."""
        for key, value in logs.items():
            self.running[key] = self.running.get(key, 0.0) + value
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        step, total = trainer.step, trainer.total_steps
        if not trainer.dist.is_main or (step % trainer.cfg.train.log_every and step != total):
            return
        means = {k: v / self.count for k, v in self.running.items()}
        means["lr"] = trainer.optimizer.param_groups[0]["lr"]
        for key, value in means.items():
            trainer.writer.add_scalar(f"train/{key}", value, step)
        trainer.history.append({"step": step, **means})
        self.running, self.count = {}, 0
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{means['lr']:.2e}")
        done = step - self.start_step
        per_step = (time.perf_counter() - self.started) / max(done, 1)
        terms = " ".join(f"{k}={v:.4g}" for k, v in means.items() if k not in ("lr", "loss"))
        memory = ""
        if trainer.device.type == "cuda":
            memory = f" mem={torch.cuda.max_memory_allocated(trainer.device) / 2**30:.1f}GiB"
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

    def on_train_end(self, trainer: Trainer) -> None:
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


class PeriodicEvaluation(Callback):
    """Validation every ``train.eval_every`` steps; keeps ``best.pt`` of the primary head."""

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        """Evaluate at the cadence, except at the last step (the final evaluation does)."""
        every = trainer.cfg.train.eval_every
        if not every or trainer.step % every or trainer.step >= trainer.total_steps:
            return
        results = trainer.evaluate(f"eval@{trainer.step}")
        track_best(trainer, results)
        if trainer.dist.is_main:
            for head, res in results.items():
                trainer.writer.add_scalar(f"val/miou_{head}", res.miou, trainer.step)
                log.info("step %d: validation mIoU (%s head) %.2f", trainer.step, head, res.miou)
            trainer.history.append(
                {"step": trainer.step, **{f"val_miou_{h}": r.miou for h, r in results.items()}}
            )
        trainer.method.train()


def track_best(trainer: Trainer, results: dict[str, EvalResult]) -> None:
    """Remember the best primary-head result and write its model file as ``best.pt``."""
    current = next(iter(results.values()))
    if trainer.best is None or current.miou > trainer.best.miou:
        trainer.best, trainer.best_step = current, trainer.step
        if trainer.dist.is_main:
            save_file(trainer.model_file(), trainer.out_dir / "best.pt")


class Checkpointing(Callback):
    """``checkpoints/step_<n>.pt`` every ``train.checkpoint_every`` steps (rank 0)."""

    def on_step_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        """Save at the cadence."""
        every = trainer.cfg.train.checkpoint_every
        if every and trainer.step % every == 0:
            trainer.save_checkpoint()


def save_checkpoint(trainer: Trainer) -> None:
    """Write ``step_<n>.pt`` atomically and drop the oldest beyond ``train.keep_last``."""
    folder = checkpoint_dir(trainer.out_dir)
    save_file(trainer.state_dict(), folder / f"step_{trainer.step:07d}.pt")
    prune_checkpoints(folder, trainer.cfg.train.keep_last)


def write_final_outputs(trainer: Trainer, final: dict[str, EvalResult]) -> None:
    """Final results per head, the best result, model.pt and history.json (rank 0)."""
    names = trainer.cfg.data.class_names
    for head, res in final.items():
        trainer.writer.add_scalar(f"val/miou_{head}", res.miou, trainer.step)
        save_result(
            res,
            trainer.out_dir / f"eval_final_{head}.json",
            names,
            {"step": trainer.step, "head": head, "mode": trainer.cfg.eval.mode},
        )
        log.info("final (%s head) at step %d:\n%s", head, trainer.step, format_table(res, names))
    if trainer.best is not None:
        save_result(
            trainer.best, trainer.out_dir / "eval_best.json", names, {"step": trainer.best_step}
        )
    save_file(trainer.model_file(), trainer.out_dir / "model.pt")
    history = json.dumps(trainer.history).encode()
    atomic_write(trainer.out_dir / "history.json", lambda handle: handle.write(history))
    trainer.close_writer()
