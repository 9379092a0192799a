"""The one training loop: method-agnostic, single process or torchrun, CPU or CUDA.

The Trainer builds data, network, method and optimiser from a Config, runs optimiser
steps (with gradient accumulation when the per-device batch is capped) and hands
everything around the steps to callbacks, as typed events (``protoseg.engine.state``).
It speaks to the method only through ``protoseg.methods.SegmentationMethod``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from protoseg.config import Config, config_yaml
from protoseg.distributed import DistInfo, init_distributed
from protoseg.engine import callbacks as cb
from protoseg.engine.checkpoint import (
    TrainedParts,
    checkpoint_dir,
    latest_checkpoint,
    latest_finite_checkpoint,
    remove_stale_temp_files,
    restore_training_state,
    resume_path,
    training_state,
)
from protoseg.engine.data import TrainingData
from protoseg.engine.optim import build_optimizer, build_scheduler
from protoseg.engine.run_lock import RunLock
from protoseg.engine.runtime import configure_determinism, resolve_precision, run_log
from protoseg.engine.state import FinalEvaluation, RunContext, StepEnd, TrainEnd, TrainingState
from protoseg.files import atomic_write_text
from protoseg.inference import EvalResult, evaluate
from protoseg.inference.model_file import model_payload
from protoseg.lifecycle import InitContext
from protoseg.methods import as_module, create_method
from protoseg.models import create_model, lock_backbone
from protoseg.progress import show_progress

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient."""


@dataclass
class TrainResult:
    """What a finished run reports: final and best evaluations and where files are."""

    out_dir: Path
    steps: int
    final: dict[str, EvalResult] = field(default_factory=dict)
    best: EvalResult | None = None
    best_step: int = -1
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Builds data, model, method and optimiser from a Config and runs the loop."""

    def __init__(
        self,
        cfg: Config,
        dist_info: DistInfo | None = None,
        device: torch.device | None = None,
        callbacks: list[cb.Callback] | None = None,
    ) -> None:
        if dist_info is None or device is None:
            dist_info, device = init_distributed(cfg.train.device)
        self.cfg, self.dist, self.device = cfg, dist_info, device
        self.out_dir = Path(cfg.train.out_dir)
        self.autocast_dtype, use_scaler = resolve_precision(cfg.train.precision, device)
        # Every rank builds the same initial weights (teacher included); the random streams
        # of augmentation and sampling then differ per rank.
        configure_determinism(cfg.train.seed, cfg.train.deterministic)
        self.data = TrainingData(cfg, dist_info, device)
        self.total_steps = self.data.total_steps
        model = create_model(cfg.model, cfg.data.num_classes).to(device)
        if cfg.optim.lock_backbone:
            lock_backbone(model)  # before the method copies it (teacher) and DDP wraps it
        if device.type == "cuda" and cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if dist_info.enabled and device.type == "cuda" and cfg.model.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.method = create_method(model, cfg)
        # The method as the nn.Module it is: its state dict, device and mode.
        self.module = as_module(self.method)
        self.module.to(device)
        self.method.setup(self.data.steps_per_epoch)
        self.data.require_unlabeled(self.method.uses_unlabeled, cfg.method.name)
        # The student may wrap the network with other trained parts (a representation head,
        # a second network): DDP and the optimiser must see all of them.
        self.student_forward = self.method.wrap_student(self._wrap_student)
        torch.manual_seed(cfg.train.seed + dist_info.rank)
        self.optimizer = build_optimizer(self.method.student, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.optim.poly_power)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.parts = TrainedParts(self.method, self.optimizer, self.scheduler, self.scaler)
        self.state = TrainingState()
        self.writer: Any = None
        # The final outputs are written whatever other callbacks a caller chose.
        self.callbacks = [*(callbacks or cb.default_callbacks()), cb.FinalOutputs()]

    def _wrap_student(self, student: nn.Module, find_unused_parameters: bool) -> nn.Module:
        """DDP around the student when distributed, then torch.compile when asked."""
        forward: nn.Module = student
        if self.dist.enabled:
            forward = DistributedDataParallel(
                student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )
        if self.cfg.train.compile:
            forward = torch.compile(forward)  # type: ignore[assignment]
        return forward

    # ---- the training state, as attributes ---------------------------------------------------
    @property
    def step(self) -> int:
        """Optimiser steps done so far."""
        return self.state.step

    @property
    def best(self) -> EvalResult | None:
        """The best primary-head evaluation so far."""
        return self.state.best

    @property
    def best_step(self) -> int:
        """The step of ``best`` (-1 before any evaluation)."""
        return self.state.best_step

    @property
    def history(self) -> list[dict[str, float]]:
        """Logged running means and periodic evaluations."""
        return self.state.history

    # ---- files ---------------------------------------------------------------------------------
    def model_file(self) -> dict[str, Any]:
        """The deployed model as a model file's contents (see protoseg.inference.model_file)."""
        deployment = self.method.deploy()
        return model_payload(self.cfg, deployment["network"], deployment["heads"])

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs to continue exactly (plain data only)."""
        return training_state(self.cfg, self.state, self.parts, self.dist.world_size)

    def save_checkpoint(self) -> None:
        """Write ``step_<n>.pt`` (rank 0 only) and drop the oldest beyond keep_last."""
        if self.dist.is_main:
            cb.save_checkpoint(self.state_dict(), self.out_dir, self.step, self.cfg.train.keep_last)

    def resume(self, path: str | Path) -> None:
        """Restore model, teacher, banks, optimiser, schedule, scaler, step and RNG states."""
        restore_training_state(
            path, self.cfg, self.state, self.parts, self.device, self.dist.world_size
        )
        log.info("resumed from %s at step %d", path, self.step)

    def _train_mode(self) -> None:
        """Back to training mode (after an evaluation)."""
        self.module.train()

    def run_context(self) -> RunContext:
        """What the callbacks may read and do during this run."""
        return RunContext(
            cfg=self.cfg,
            out_dir=self.out_dir,
            is_main=self.dist.is_main,
            device=self.device,
            total_steps=self.total_steps,
            state=self.state,
            writer=self.writer,
            evaluate=self.evaluate,
            model_file=self.model_file,
            save_checkpoint=self.save_checkpoint,
            lr=lambda: float(self.optimizer.param_groups[0]["lr"]),
            set_train_mode=self._train_mode,
        )

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, desc: str = "eval") -> dict[str, EvalResult]:
        """Evaluate the primary head (every head with eval.all_heads); all ranks take part."""
        heads = self.method.heads if self.cfg.eval.all_heads else self.method.heads[:1]
        loader = self.data.val_loader()
        results = {}
        for head in heads:
            # Evaluating must not change training's random stream (loader start-up draws).
            with torch.random.fork_rng(devices=[]), self._autocast():
                results[head] = evaluate(
                    self.method.inference_model(head),
                    loader,
                    self.cfg.data.num_classes,
                    self.cfg.eval,
                    self.device,
                    self.cfg.data.ignore_index,
                    progress=show_progress(self.cfg.train.progress) and self.dist.is_main,
                    desc=f"{desc} ({head})",
                )
        return results

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> TrainResult:
        """Train to ``total_steps`` (resuming if asked), evaluate, and write the model files.

        ``max_steps`` stops early at that step with a checkpoint and no evaluation (for
        time-limited jobs); a later ``fit`` resumes from it and ends exactly as one run would.
        """
        with (
            RunLock(self.out_dir, enabled=self.dist.is_main),
            run_log(self.out_dir / "train.log", enabled=self.dist.is_main),
        ):
            return self._fit(max_steps)

    def _fit(self, max_steps: int | None) -> TrainResult:
        cfg, is_main = self.cfg, self.dist.is_main
        resume_from = resume_path(self.cfg.train.resume, self.out_dir)
        if resume_from is not None:
            self.resume(resume_from)
        if is_main:
            # Written only after a resume was accepted, so a refused one changes nothing.
            atomic_write_text(self.out_dir / "config.yaml", config_yaml(cfg))
            for stale in remove_stale_temp_files(checkpoint_dir(self.out_dir)):
                log.info("removed %s, left by an interrupted checkpoint write", stale)
            log.info(
                "training %s for %d steps (%d per epoch), total batch %d = %d process(es) "
                "x %d micro-batch x %d accumulation",
                cfg.method.name,
                self.total_steps,
                self.data.steps_per_epoch,
                cfg.train.batch_size,
                self.dist.world_size,
                self.data.micro_batch,
                self.data.accum_steps,
            )
            if self.method.uses_unlabeled and self.total_steps <= self.method.warmup_steps:
                log.warning(
                    "train.iterations/epochs give %d steps, no more than the %d-step supervised "
                    "warm-up of %s: no unlabelled loss will train, so this run is supervised only",
                    self.total_steps,
                    self.method.warmup_steps,
                    cfg.method.name,
                )
        labeled_iter, unlabeled_iter = self.data.train_iterators(
            self.step, self.method.uses_unlabeled
        )
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        run = self.run_context()
        for callback in self.callbacks:
            callback.on_train_start(run)
        self.module.train()
        started = time.perf_counter()
        stop_at = min(self.total_steps, max_steps or self.total_steps)
        try:
            while self.step < stop_at:
                self.method.before_step(self.step, self._init_context)
                logs = self._train_step(labeled_iter, unlabeled_iter)
                self.state.step += 1
                event = StepEnd(self.step, logs)
                for callback in self.callbacks:
                    callback.on_step_end(event)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        finally:
            end = TrainEnd(self.step, finished=self.step >= self.total_steps)
            for callback in self.callbacks:
                callback.on_train_end(end)
        seconds = time.perf_counter() - started
        if self.step < self.total_steps:
            self.save_checkpoint()
            self.close_writer()
            return TrainResult(self.out_dir, self.step, seconds=seconds, history=self.history)
        final = self.evaluate("final")
        cb.track_best(run, final)
        result = TrainResult(
            self.out_dir, self.step, final, self.best, self.best_step, seconds, self.history
        )
        self.save_checkpoint()
        final_event = FinalEvaluation(self.step, final)
        for callback in self.callbacks:
            callback.on_final_evaluation(final_event)
        self.close_writer()
        return result

    def _init_context(self) -> InitContext:
        loader = self.data.labeled_eval_loader() if self.dist.is_main else None
        return InitContext(loader, self.device, self.cfg.train.seed)

    def _train_step(self, labeled_iter: Any, unlabeled_iter: Any) -> dict[str, float]:
        totals: dict[str, float] = {}
        ddp = self.student_forward
        accum = self.data.accum_steps
        for micro in range(accum):
            labeled = self.data.to_device(next(labeled_iter))
            unlabeled = (
                self.data.to_device(next(unlabeled_iter)) if unlabeled_iter is not None else None
            )
            sync = micro == accum - 1 or not isinstance(ddp, DistributedDataParallel)
            context = (
                ddp.no_sync()
                if not sync and isinstance(ddp, DistributedDataParallel)
                else contextlib.nullcontext()
            )
            with context:
                with self._autocast():
                    out = self.method.training_step(labeled, unlabeled, self.step)
                self.scaler.scale(out["loss"] / accum).backward()
            for key, value in out.items():
                number = float(value.detach()) if torch.is_tensor(value) else float(value)
                totals[key] = totals.get(key, 0.0) + number / accum
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm()
        # DDP averaged the gradients, so every rank sees the same norm and decides alike;
        # the local loss terms only decide in a single process (they could differ by rank).
        finite = math.isfinite(grad_norm) and (
            self.dist.enabled or all(math.isfinite(v) for v in totals.values())
        )
        if finite or self.scaler.is_enabled():
            # With fp16 the scaler skips overflowing steps itself and lowers its scale.
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self._nonfinite(totals, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.method.after_optimizer_step(self.step)
        totals["grad_norm"] = grad_norm
        return totals

    def _grad_norm(self) -> float:
        norms = [
            p.grad.detach().float().norm()
            for p in self.method.student.parameters()
            if p.grad is not None
        ]
        if not norms:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack(norms)))

    def _nonfinite(self, logs: dict[str, float], grad_norm: float) -> None:
        bad = [k for k, v in logs.items() if not math.isfinite(v)]
        what = (
            ", ".join(f"{k}={logs[k]}" for k in bad)
            if bad
            else f"gradient norm {grad_norm} (loss terms finite on this rank)"
        )
        if self.cfg.train.on_nonfinite == "skip":
            log.warning("step %d: non-finite %s; skipping the update", self.step, what)
            self.optimizer.zero_grad(set_to_none=True)
            return
        # The newest checkpoint may already hold the diverged weights: name a finite one.
        last = latest_finite_checkpoint(checkpoint_dir(self.out_dir))
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"step {self.step}: non-finite {what}; training stopped and {kept}. Lower optim.lr, "
            "check the data, or set train.on_nonfinite=skip to skip such steps"
        )

    def _interrupted(self) -> None:
        """Ctrl-C: keep the finished steps in a checkpoint and say how to go on."""
        if not self.dist.is_main:
            return
        if self.step > 0:
            self.save_checkpoint()
        last = latest_checkpoint(checkpoint_dir(self.out_dir))
        where = f"saved {last}" if last else "no checkpoint was written"
        log.warning(
            "interrupted at step %d: %s; run the same command again to resume (train.resume=auto)",
            self.step,
            where,
        )

    def close_writer(self) -> None:
        """Flush and close TensorBoard (rank 0)."""
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
