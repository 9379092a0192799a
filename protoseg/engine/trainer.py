"""The one training loop: method-agnostic, single process or torchrun, CPU or CUDA."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from protoseg import __version__
from protoseg.config import Config, recipe_changes, save_config, to_dict
from protoseg.data import (
    GlobalBatchSampler,
    build_dataset,
    build_eval_loader,
    build_train_loader,
    eval_transform,
    split_batch_sizes,
    train_transform,
    voc_palette,
)
from protoseg.engine.checkpoint import (
    MODEL_FORMAT,
    TRAINING_FORMAT,
    CheckpointError,
    atomic_save,
    atomic_write,
    checkpoint_dir,
    latest_checkpoint,
    load_file,
    load_state_strict,
    prune_checkpoints,
    rng_state,
    set_rng_state,
)
from protoseg.engine.distributed import DistInfo, init_distributed
from protoseg.engine.evaluator import EvalResult, evaluate, format_table, save_result
from protoseg.engine.optim import build_optimizer, build_scheduler
from protoseg.methods import Method, WarmupContext, create_method
from protoseg.models import create_model

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


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed) for a device."""
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if device.type == "cuda":
        return torch.float16, True
    log.warning("precision=fp16 needs CUDA (a loss scaler); using bf16 autocast on %s", device.type)
    return torch.bfloat16, False


def configure_determinism(seed: int, deterministic: bool) -> None:
    """Seed every generator and choose between reproducible and fast kernels."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def steps_per_epoch(num_epoch_samples: int, batch_size: int) -> int:
    """Optimiser steps in one pass over the epoch set (the last partial batch counts)."""
    return max(1, math.ceil(num_epoch_samples / batch_size))


def model_payload(cfg: Config, method: Method) -> dict[str, Any]:
    """A self-contained inference file: weights of the deployed network plus what predict needs."""
    network = method.inference_model("linear")
    payload = {
        "format": MODEL_FORMAT,
        "version": __version__,
        "config": to_dict(cfg),
        "state_dict": network.state_dict(),
        "class_names": list(cfg.data.class_names)
        or [f"class_{i}" for i in range(cfg.data.num_classes)],
        "palette": voc_palette(256),
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
    }
    if "prototype" in method.heads:
        payload["prototypes"] = method.bank.state_dict()  # type: ignore[attr-defined]
    return payload


class Trainer:
    """Builds data, model, method and optimiser from a Config and runs the loop."""

    def __init__(
        self, cfg: Config, dist_info: DistInfo | None = None, device: torch.device | None = None
    ) -> None:
        if dist_info is None or device is None:
            dist_info, device = init_distributed(cfg.train.device)
        self.cfg, self.dist, self.device = cfg, dist_info, device
        self.out_dir = Path(cfg.train.out_dir)
        self.autocast_dtype, use_scaler = resolve_precision(cfg.train.precision, device)
        # Every rank builds the same initial weights (teacher included); the random streams
        # of augmentation and sampling then differ per rank.
        configure_determinism(cfg.train.seed, cfg.train.deterministic)

        self._build_data()
        model = create_model(cfg.model, cfg.data.num_classes).to(device)
        if device.type == "cuda" and cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if dist_info.enabled and device.type == "cuda" and cfg.model.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.method = create_method(cfg.method.name, model, cfg).to(device)
        self.method.setup(self.steps_per_epoch)
        if self.method.uses_unlabeled and self.unlabeled_set is None:
            raise ValueError(
                f"method {cfg.method.name!r} learns from unlabelled images: set "
                "data.unlabeled_split to a split file of unlabelled images"
            )
        forward: nn.Module = model
        if dist_info.enabled:
            forward = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.method.find_unused_parameters,
            )
        if cfg.train.compile:
            forward = torch.compile(forward)  # type: ignore[assignment]
        self.method.set_student_forward(forward)
        self.student_forward = forward
        torch.manual_seed(cfg.train.seed + dist_info.rank)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.optim.poly_power)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.step = 0
        self.best: EvalResult | None = None
        self.best_step = -1
        self.history: list[dict[str, float]] = []
        self.writer = None

    # ---- construction --------------------------------------------------------------------------
    def _build_data(self) -> None:
        cfg = self.cfg
        self.labeled_set = build_dataset(cfg.data, "labeled", train_transform(cfg.data))
        needs_unlabeled = cfg.method.name != "supervised" and bool(cfg.data.unlabeled_split)
        self.unlabeled_set = (
            build_dataset(cfg.data, "unlabeled", train_transform(cfg.data))
            if needs_unlabeled
            else None
        )
        self.val_set = build_dataset(cfg.data, "val", eval_transform(cfg.data))
        epoch_set = self.labeled_set
        if cfg.data.epoch_over == "unlabeled" and cfg.data.unlabeled_split:
            epoch_set = self.unlabeled_set or build_dataset(cfg.data, "unlabeled", None)
        self.steps_per_epoch = steps_per_epoch(len(epoch_set), cfg.train.batch_size)
        self.total_steps = cfg.train.iterations or max(
            1, int(round(cfg.train.epochs * self.steps_per_epoch))
        )
        self.micro_batch, self.accum_steps = split_batch_sizes(
            cfg.train.batch_size, self.dist.world_size, cfg.train.max_device_batch
        )

    def _train_loader(self, dataset, start_step: int, salt: int):
        cfg = self.cfg
        sampler = GlobalBatchSampler(
            len(dataset),
            cfg.train.batch_size,
            self.accum_steps,
            self.dist.rank,
            self.dist.world_size,
            self.steps_per_epoch,
            cfg.train.seed + salt,
            start_step,
        )
        return build_train_loader(
            dataset,
            sampler,
            cfg.data.workers,
            cfg.data.pin_memory and self.device.type == "cuda",
            cfg.data.persistent_workers,
            cfg.data.prefetch_factor,
        )

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        moved = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                value = value.to(self.device, non_blocking=True)
                if key == "image" and self.device.type == "cuda" and self.cfg.train.channels_last:
                    value = value.contiguous(memory_format=torch.channels_last)
            moved[key] = value
        return moved

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs to continue exactly."""
        return {
            "format": TRAINING_FORMAT,
            "version": __version__,
            "config": to_dict(self.cfg),
            "step": self.step,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "best_miou": self.best.miou if self.best else None,
            "best": self.best.to_dict() if self.best else None,
            "best_step": self.best_step,
            "history": self.history,
            "world_size": self.dist.world_size,
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``step_<n>.pt`` (rank 0 only) and drop the oldest beyond keep_last."""
        if not self.dist.is_main:
            return None
        folder = checkpoint_dir(self.out_dir)
        path = atomic_save(self.state_dict(), folder / f"step_{self.step:07d}.pt")
        prune_checkpoints(folder, self.cfg.train.keep_last)
        return path

    def resume(self, path: str | Path) -> None:
        """Restore model, teacher, bank, optimiser, schedule, scaler, step and RNG states."""
        data = load_file(path, map_location=self.device)
        if data.get("format") != TRAINING_FORMAT:
            raise CheckpointError(
                f"{path}: a model file, not a training checkpoint; "
                "resume needs a checkpoints/step_*.pt file"
            )
        changes = recipe_changes(data.get("config") or {}, to_dict(self.cfg))
        if changes:
            raise CheckpointError(
                f"{path} was written by a different recipe ({'; '.join(changes)}); "
                f"train into a new train.out_dir, or delete {Path(path).parent} to start over"
            )
        load_state_strict(self.method, data["method"], path, "method")
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        self.scaler.load_state_dict(data["scaler"])
        self.step = int(data["step"])
        self.history = list(data.get("history") or [])
        self.best_step = int(data.get("best_step", -1))
        if data.get("best"):
            self.best = EvalResult(**data["best"])
        if data.get("world_size", 1) == self.dist.world_size:
            set_rng_state(data["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    def _find_resume(self) -> Path | None:
        choice = self.cfg.train.resume
        if choice in ("", "none", "never"):
            return None
        if choice == "auto":
            return latest_checkpoint(checkpoint_dir(self.out_dir))
        return Path(choice)

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, desc: str = "eval") -> dict[str, EvalResult]:
        """Evaluate each reported head on the validation set (all ranks take part)."""
        loader = build_eval_loader(
            self.val_set,
            self.dist.rank,
            self.dist.world_size,
            workers=min(self.cfg.data.workers, 2),
        )
        heads = ["linear"]
        if self.cfg.eval.prototype_head and "prototype" in self.method.heads:
            heads.append("prototype")
        if not self.cfg.method.linear_head and "prototype" in self.method.heads:
            heads = ["prototype"]
        results = {}
        for head in heads:
            model = self.method.inference_model(head)
            # Evaluating must not change training's random stream (loader start-up draws).
            with torch.random.fork_rng(devices=[]), self._autocast():
                results[head] = evaluate(
                    model,
                    loader,
                    self.cfg.data.num_classes,
                    self.cfg.eval,
                    self.device,
                    self.cfg.data.ignore_index,
                    progress=self.cfg.train.progress and self.dist.is_main,
                    desc=f"{desc} ({head})",
                )
        return results

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- the loop ------------------------------------------------------------------------------
    def _warmup_context(self) -> WarmupContext:
        loader = None
        if self.dist.is_main:
            init_set = build_dataset(self.cfg.data, "labeled", eval_transform(self.cfg.data))
            loader = build_eval_loader(init_set, workers=min(self.cfg.data.workers, 2))
        return WarmupContext(loader, self.device, self.cfg.train.seed)

    def _grad_norm(self) -> float:
        norms = [
            p.grad.detach().float().norm()
            for p in self.method.model.parameters()
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
        last = latest_checkpoint(checkpoint_dir(self.out_dir))
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"step {self.step}: non-finite {what}; training stopped and {kept}. Lower optim.lr, "
            "check the data, or set train.on_nonfinite=skip to skip such steps"
        )

    def fit(self, max_steps: int | None = None) -> TrainResult:
        """Train to ``total_steps`` (resuming if asked), evaluate, and write the model files.

        ``max_steps`` stops early at that step with a checkpoint and no evaluation (for
        time-limited jobs); a later ``fit`` resumes from it and ends exactly as one run would.
        """
        cfg, is_main = self.cfg, self.dist.is_main
        if is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        resume_from = self._find_resume()
        if resume_from is not None:
            self.resume(resume_from)
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            log.info(
                "training %s for %d steps (%d per epoch), total batch %d = %d process(es) "
                "x %d micro-batch x %d accumulation",
                cfg.method.name,
                self.total_steps,
                self.steps_per_epoch,
                cfg.train.batch_size,
                self.dist.world_size,
                self.micro_batch,
                self.accum_steps,
            )
        # Starting a DataLoader iterator draws from torch's global generator; isolating it
        # keeps the method's random stream identical between a resumed and a straight run.
        with torch.random.fork_rng(devices=[]):
            labeled_iter = iter(self._train_loader(self.labeled_set, self.step, salt=0))
            unlabeled_iter = (
                iter(self._train_loader(self.unlabeled_set, self.step, salt=1))
                if self.unlabeled_set is not None and self.method.uses_unlabeled
                else None
            )
        progress = None
        if is_main and cfg.train.progress:
            from tqdm.auto import tqdm

            progress = tqdm(
                total=self.total_steps, initial=self.step, desc=cfg.method.name, dynamic_ncols=True
            )
        self.method.train()
        started = time.perf_counter()
        running: dict[str, float] = {}
        running_n = 0
        stop_at = min(self.total_steps, max_steps or self.total_steps)
        while self.step < stop_at:
            if self.step >= self.method.warmup_steps and self.method.needs_warmup_hook():
                self.method.on_warmup_end(self._warmup_context())
                self.method.train()
            logs = self._train_step(labeled_iter, unlabeled_iter)
            self.step += 1
            for k, v in logs.items():
                running[k] = running.get(k, 0.0) + v
            running_n += 1
            if progress is not None:
                progress.update(1)
            if is_main and (self.step % cfg.train.log_every == 0 or self.step == self.total_steps):
                means = {k: v / running_n for k, v in running.items()}
                means["lr"] = self.optimizer.param_groups[0]["lr"]
                for k, v in means.items():
                    self.writer.add_scalar(f"train/{k}", v, self.step)
                if progress is not None:
                    progress.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{means['lr']:.2e}")
                self.history.append({"step": self.step, **means})
                running, running_n = {}, 0
            if (
                cfg.train.eval_every
                and self.step % cfg.train.eval_every == 0
                and self.step < self.total_steps
            ):
                self._periodic_eval()
            if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                self.save_checkpoint()
        if progress is not None:
            progress.close()
        seconds = time.perf_counter() - started
        if self.step < self.total_steps:
            self.save_checkpoint()
            if is_main:
                self.writer.close()
            return TrainResult(self.out_dir, self.step, seconds=seconds, history=self.history)
        final = self.evaluate("final")
        self._track_best(final)
        result = TrainResult(
            self.out_dir, self.step, final, self.best, self.best_step, seconds, self.history
        )
        self.save_checkpoint()
        if is_main:
            self._write_outputs(final)
        return result

    def _train_step(self, labeled_iter, unlabeled_iter) -> dict[str, float]:
        totals: dict[str, float] = {}
        ddp = self.student_forward
        for micro in range(self.accum_steps):
            labeled = self._to_device(next(labeled_iter))
            unlabeled = (
                self._to_device(next(unlabeled_iter)) if unlabeled_iter is not None else None
            )
            sync = micro == self.accum_steps - 1 or not isinstance(ddp, DistributedDataParallel)
            context = contextlib.nullcontext() if sync else ddp.no_sync()
            with context:
                with self._autocast():
                    out = self.method.training_step(labeled, unlabeled, self.step)
                loss = out["loss"] / self.accum_steps
                self.scaler.scale(loss).backward()
            for k, v in out.items():
                value = float(v.detach()) if torch.is_tensor(v) else float(v)
                totals[k] = totals.get(k, 0.0) + value / self.accum_steps
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

    def _track_best(self, results: dict[str, EvalResult]) -> None:
        head = next(iter(results))
        current = results[head]
        if self.best is None or current.miou > self.best.miou:
            self.best, self.best_step = current, self.step
            if self.dist.is_main:
                atomic_save(model_payload(self.cfg, self.method), self.out_dir / "best.pt")

    def _periodic_eval(self) -> None:
        results = self.evaluate(f"eval@{self.step}")
        self._track_best(results)
        if self.dist.is_main:
            for head, res in results.items():
                self.writer.add_scalar(f"val/miou_{head}", res.miou, self.step)
            self.history.append(
                {"step": self.step, **{f"val_miou_{h}": r.miou for h, r in results.items()}}
            )
        self.method.train()

    def _write_outputs(self, final: dict[str, EvalResult]) -> None:
        names = self.cfg.data.class_names
        for head, res in final.items():
            self.writer.add_scalar(f"val/miou_{head}", res.miou, self.step)
            save_result(
                res,
                self.out_dir / f"eval_final_{head}.json",
                names,
                {"step": self.step, "head": head, "mode": self.cfg.eval.mode},
            )
            log.info("final (%s head) at step %d:\n%s", head, self.step, format_table(res, names))
        if self.best is not None:
            save_result(self.best, self.out_dir / "eval_best.json", names, {"step": self.best_step})
        atomic_save(model_payload(self.cfg, self.method), self.out_dir / "model.pt")
        history = json.dumps(self.history).encode()
        atomic_write(self.out_dir / "history.json", lambda handle: handle.write(history))
        self.writer.flush()
        self.writer.close()
