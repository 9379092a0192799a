"""The authors' side of every parity check: their own step code, run from a local clone.

Nothing of the sources is copied into protoseg; each driver imports or reads the user's
clone at run time (``--source``):

- UniMatch (``fixmatch.py``, ``unimatch.py``) and CPS (TorchSemiSeg's
  ``exp.voc/voc8.res50v3+.CPS+CutMix/train.py``) train in an inline loop of a script, so the
  driver *executes the loop body extracted at run time from the user's file*:
  ``loop_body`` parses the file with ``ast``, finds the training ``for`` loop, and compiles
  an assignment of the loop's own target (the source's unpacking of a loader item) followed
  by the body's statements up to and including the optimiser step, with the file's line
  numbers (a traceback names the source line). It runs in a namespace holding what the
  script defines before the loop: the model, optimiser(s), criteria and config values
  (read from the clone's own config files where it has them), and stubs for the loaders,
  engine, LR policy and logger that the body touches.
- U2PL's step is the function ``train`` of ``train_semi.py``: the driver imports the
  module and calls ``train`` for one iteration with one-batch loaders, a constant LR
  scheduler and its ``cfg`` global set from the clone's ``experiments/pascal/1464/ours/
  config.yaml`` (sizes overridden for the tiny network).

On a CPU: ``Tensor.cuda`` and ``Module.cuda`` return their object, and a one-process gloo
group stands in for NCCL (``all_reduce``, ``barrier``, ``all_gather_object`` then act on one
process). Modules a source imports without using in the step (``tensorboardX``) are
stubbed when absent.

Random draws: the source's loaders would draw the strong views, CutMix boxes and masks; here
the batch arrives already drawn. Draws inside the step are fixed as follows: U2PL's
``np.random.uniform`` (apply CutMix or not) returns 0 (apply) and its
``generate_cutout_mask`` returns the stored boxes; its contrastive loss runs right after
``torch.manual_seed(<stored seed>)``. UniMatch's channel dropout is the wrapped network's
(stored masks, see ``UniMatchNet``). CPS's step draws nothing.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import socket
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ---- running CUDA-only code on a CPU --------------------------------------------------


@contextlib.contextmanager
def cpu_only() -> Iterator[None]:
    """``.cuda()`` on tensors and modules returns the object itself while this is active."""
    tensor_cuda, module_cuda = torch.Tensor.cuda, nn.Module.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = tensor_cuda  # type: ignore[method-assign]
        nn.Module.cuda = module_cuda  # type: ignore[method-assign]


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def process_group(rank: int = 0, world_size: int = 1, port: int | None = None) -> Iterator[None]:
    """A gloo process group (one process by default) for the sources' collective calls."""
    if dist.is_initialized():
        yield
        return
    port = port or free_port()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _unavailable(module: str) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for a stubbed module."""

    def lookup(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{module}.{attr} is not installed (stubbed for the parity check)")

        return missing

    return lookup


@contextlib.contextmanager
def importable(source: Path, stubs: tuple[str, ...] = ()) -> Iterator[None]:
    """``source`` first on sys.path, and empty modules for ``stubs`` that are not installed."""
    sys.path.insert(0, str(source))
    added = []
    for name in stubs:
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            # Any name imported from it is a placeholder that fails only when called.
            setattr(stub, "__getattr__", _unavailable(name))  # noqa: B010 (a module hook)
            sys.modules[name] = stub
            added.append(name)
    try:
        yield
    finally:
        sys.path.remove(str(source))
        for name in added:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def patched(*patches: tuple[Any, str, Any]) -> Iterator[None]:
    """Set ``obj.attr = value`` for each patch, and restore the old values afterwards."""
    absent = object()
    saved = [(obj, attr, getattr(obj, attr, absent)) for obj, attr, _ in patches]
    try:
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, old in reversed(saved):
            if old is absent:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


# ---- executing the body of a script's training loop -------------------------------------


def loop_body(path: Path, target_name: str, stop: str, item: str = "__loader_item__") -> Any:
    """The compiled body of the ``for`` loop of ``path`` whose target binds ``target_name``.

    The code first assigns the namespace's ``item`` to the loop's own target (so the
    source unpacks a loader item itself), then runs the body's statements up to and
    including the first one whose source text is ``stop`` (e.g. ``optimizer.step()``).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.For):
            continue
        names = {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
        if target_name not in names:
            continue
        body: list[ast.stmt] = [
            ast.Assign(targets=[node.target], value=ast.Name(id=item, ctx=ast.Load()))
        ]
        for stmt in node.body:
            body.append(stmt)
            if ast.unparse(stmt).strip() == stop:
                break
        else:
            raise ValueError(f"{path}: the loop over {target_name!r} has no statement {stop!r}")
        ast.copy_location(body[0], node)
        module = ast.Module(body=body, type_ignores=[])
        ast.fix_missing_locations(module)
        return compile(module, str(path), "exec")
    raise ValueError(f"{path}: no for loop binds {target_name!r} (is --source the right clone?)")


class _Recorder:
    """Wraps a loss callable and keeps what it returned, in call order."""

    def __init__(self, fn: Callable[..., Any], pick: Callable[[Any], Tensor] = lambda r: r):
        self.fn, self.pick = fn, pick
        self.values: list[Tensor] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.fn(*args, **kwargs)
        self.values.append(self.pick(result).detach().clone())
        return result


# ---- the networks, wrapped to each source's calling convention -------------------------


class UniMatchNet(nn.Module):
    """protoseg's network as UniMatch calls its model: ``model(x)`` gives the logits and
    ``model(x, True)`` the clean and the feature-perturbed logits; the perturbation is
    ``drop`` (the stored channel masks)."""

    def __init__(self, network: nn.Module, drop: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.inner, self.drop = network, drop

    def forward(self, x: Tensor, need_fp: bool = False) -> Any:
        if need_fp:
            out = self.inner(x, perturb=self.drop)
            return out["logits"], out["perturbed_logits"]
        return self.inner(x)["logits"]


class U2PLNet(nn.Module):
    """protoseg's network plus representation head as U2PL calls its model: a dict with
    ``pred`` (the classifier's stride-4 logits, before the upsampling protoseg's network
    does) and ``rep``."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.inner = student
        self._logits: list[Tensor] = []
        classifier: nn.Module = student.network.classifier  # type: ignore[assignment,union-attr]
        classifier.register_forward_hook(lambda mod, args, out: self._logits.append(out))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self._logits.clear()
        out = self.inner(x)
        return {"pred": self._logits[-1], "rep": out["rep"]}


class CPSNet(nn.Module):
    """protoseg's network pair as TorchSemiSeg's CPS ``Network``: ``model(x, step=1|2)``
    gives branch 1's or 2's (features, logits) in train mode, branch 1's logits in eval."""

    def __init__(self, pair: nn.Module) -> None:
        super().__init__()
        self.inner = pair

    def forward(self, data: Tensor, step: int = 1) -> Any:
        pair: Any = self.inner
        branch = pair.left if (step == 1 or not self.training) else pair.right
        out = branch(data)
        return (out["features"], out["logits"]) if self.training else out["logits"]


def grads_of(wrapper: nn.Module) -> dict[str, Tensor]:
    """Gradients by the wrapped module's own parameter names (``inner.`` dropped)."""
    return {
        n.removeprefix("inner."): (
            p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        )
        for n, p in wrapper.named_parameters()
    }


def state_of(wrapper: nn.Module, prefix: str) -> dict[str, Tensor]:
    """The wrapped module's state dict under ``prefix`` (protoseg's method state names)."""
    return {
        prefix + k.removeprefix("inner."): v.detach().clone()
        for k, v in wrapper.state_dict().items()
    }


def sgd(params: Any, settings: dict[str, float]) -> torch.optim.SGD:
    """The check's SGD over ``params`` (a list of tensors or of parameter groups)."""
    return torch.optim.SGD(params, **settings)  # type: ignore[arg-type]


# ---- UniMatch: fixmatch.py and unimatch.py ----------------------------------------------


def unimatch_loop(
    source: Path,
    script: str,
    network: nn.Module,
    drop: Callable[[Tensor], Tensor],
    item: tuple[Any, ...],
    conf_thresh: float,
    optimizer_settings: dict[str, float],
) -> dict[str, Any]:
    """One iteration of the loop of UniMatch's ``script`` (``fixmatch.py``/``unimatch.py``).

    ``item`` is what ``enumerate(zip(trainloader_l, trainloader_u, trainloader_u))`` yields:
    ``(i, (labelled batch, unlabelled batch, mixing batch))`` in the loaders' layout.
    Returns the loss terms, the gradients and the network's state after the step.
    """
    import yaml

    cfg = yaml.safe_load((source / "configs" / "pascal.yaml").read_text())
    cfg["conf_thresh"] = conf_thresh
    model = UniMatchNet(network, drop)
    model.train()
    optimizer = sgd(model.parameters(), optimizer_settings)
    criterion_l = nn.CrossEntropyLoss(**cfg["criterion"]["kwargs"])
    criterion_u = nn.CrossEntropyLoss(reduction="none")
    code = loop_body(source / script, "img_x", "optimizer.step()")
    namespace: dict[str, Any] = {
        "__loader_item__": item,
        "torch": torch,
        "nn": nn,
        "F": F,
        "model": model,
        "optimizer": optimizer,
        "criterion_l": criterion_l,
        "criterion_u": criterion_u,
        "cfg": cfg,
    }
    with cpu_only(), process_group():
        exec(code, namespace)
    terms = {"loss": namespace["loss"], "loss_x": namespace["loss_x"]}
    if script == "fixmatch.py":
        terms["loss_s"] = namespace["loss_u_s"]
    else:
        terms["loss_s"] = (namespace["loss_u_s1"] + namespace["loss_u_s2"]) / 2.0
        terms["loss_w_fp"] = namespace["loss_u_w_fp"]
    return {
        "terms": {k: v.detach().float() for k, v in terms.items()},
        "grads": grads_of(model),
        "state": state_of(model, "student."),
    }


# ---- U2PL: train_semi.py's train() ------------------------------------------------------


# Modules train_semi.py imports (for loaders, logging and evaluation) that its train() step
# never calls; stubbed when not installed.
U2PL_UNUSED_MODULES = ("tensorboardX", "cv2", "skimage", "skimage.measure")


class _Loader:
    """A one-batch loader as ``train`` uses it: ``len``, ``sampler.set_epoch`` and an
    iterator with the old ``.next()``."""

    def __init__(self, batch: tuple[Tensor, ...]) -> None:
        self.batch = batch
        self.sampler = types.SimpleNamespace(set_epoch=lambda epoch: None)

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> _OldIterator:
        return _OldIterator([self.batch])


class _OldIterator:
    """An iterator that also has the ``.next()`` of old PyTorch loader iterators."""

    def __init__(self, items: list[Any]) -> None:
        self.items = iter(items)

    def __iter__(self) -> _OldIterator:
        return self

    def __next__(self) -> Any:
        return next(self.items)

    def next(self) -> Any:
        return next(self.items)


class _MeterLog:
    """Stands in for U2PL's AverageMeter and keeps every value it is given, per meter."""

    created: list[_MeterLog] = []

    def __init__(self, length: int = 0) -> None:
        self.values: list[float] = []
        self.val = self.avg = 0.0
        _MeterLog.created.append(self)

    def update(self, value: Any) -> None:
        self.values.append(float(value))


def u2pl_config(source: Path, num_classes: int, epochs: int, low_rank: int) -> dict[str, Any]:
    """The clone's VOC config (experiments/pascal/1464/ours) with the check's sizes."""
    import yaml

    cfg = yaml.safe_load((source / "experiments/pascal/1464/ours/config.yaml").read_text())
    cfg["net"]["num_classes"] = num_classes
    cfg["net"].pop("aux_loss", None)
    cfg["trainer"]["epochs"] = epochs
    cfg["trainer"]["contrastive"]["low_rank"] = low_rank
    return cfg


def u2pl_train(
    source: Path,
    student: nn.Module,
    teacher: nn.Module,
    batch: dict[str, Tensor],
    boxes: Tensor,
    contrast_seed: int,
    epoch: int,
    cfg: dict[str, Any],
    queue_sizes: list[int],
    optimizer_settings: dict[str, float],
) -> dict[str, Any]:
    """One iteration of U2PL's ``train`` (train_semi.py) at ``epoch``, with empty queues.

    ``student``/``teacher`` are protoseg's network-plus-representation-head modules;
    ``boxes`` (B, H, W) are the CutMix boxes (True: the partner's pixel). Call it inside
    ``process_group`` (several processes reproduce the release's division by world size).
    """
    with importable(source, stubs=U2PL_UNUSED_MODULES), cpu_only():
        train_semi = importlib.import_module("train_semi")
        augmentation = importlib.import_module("u2pl.dataset.augmentation")
        loss_helper = importlib.import_module("u2pl.utils.loss_helper")
        model, model_teacher = U2PLNet(student), U2PLNet(teacher)
        model.train()
        optimizer = sgd(model.parameters(), optimizer_settings)
        sup_loss_fn = _Recorder(loss_helper.get_criterion(cfg))
        unsup = _Recorder(train_semi.compute_unsupervised_loss)
        boxes_left = [(~b).long() for b in boxes]
        original_contrast = train_semi.compute_contra_memobank_loss

        def seeded_contrast(*args: Any, **kwargs: Any) -> Any:
            torch.manual_seed(contrast_seed)
            return original_contrast(*args, **kwargs)

        contrast = _Recorder(seeded_contrast, pick=lambda r: r[-1])
        memobank = [[torch.zeros(0, _rep_dim(student))] for _ in queue_sizes]
        queue_ptrlis = [torch.zeros(1, dtype=torch.long) for _ in queue_sizes]
        _MeterLog.created = []
        scheduler = types.SimpleNamespace(
            get_lr=lambda: [optimizer_settings["lr"]], step=lambda: None
        )
        with patched(
            (train_semi, "cfg", cfg),
            (train_semi, "prototype", None),
            (train_semi, "AverageMeter", _MeterLog),
            (train_semi, "compute_unsupervised_loss", unsup),
            (train_semi, "compute_contra_memobank_loss", contrast),
            (np.random, "uniform", lambda *args, **kwargs: 0.0),
            (augmentation, "generate_cutout_mask", lambda *args, **kwargs: boxes_left.pop(0)),
        ):
            train_semi.train(
                model,
                model_teacher,
                optimizer,
                scheduler,
                sup_loss_fn,
                _Loader((batch["image_l"], batch["mask_l"])),
                _Loader((batch["image_u"], batch["mask_l"])),
                epoch,
                types.SimpleNamespace(add_scalar=lambda *args: None),
                types.SimpleNamespace(info=lambda *args: None),
                memobank,
                queue_ptrlis,
                queue_sizes,
            )
    # The meters hold the all-reduced (summed over processes) values of the three terms.
    con = _MeterLog.created[2].values[-1]
    state = {**state_of(model, "student."), **state_of(model_teacher, "teacher.network.")}
    return {
        "terms": {
            "sup_loss": sup_loss_fn.values[-1].float(),
            "unsup_loss": unsup.values[-1].float(),
            # What the step trained: the all-reduced loss / world size (its value); its
            # gradient is the local loss's / world size.
            "contra_loss": torch.tensor(con / dist.get_world_size()),
            # The value of the loss it back-propagated (on N processes its contrastive
            # part counts fully in the value but 1/N in the gradient).
            "loss": sup_loss_fn.values[-1].float()
            + unsup.values[-1].float()
            + con / dist.get_world_size(),
        },
        "grads": grads_of(model),
        "state": state,
        "queues": [q[0].clone() for q in memobank],
        "contra_loss_local": contrast.values[-1].float(),
    }


def _rep_dim(student: nn.Module) -> int:
    """Channels of the representation head's output (its last conv's)."""
    convs = [m for m in student.representation.modules() if isinstance(m, nn.Conv2d)]  # type: ignore[union-attr]
    return int(convs[-1].out_channels)


# ---- CPS: TorchSemiSeg's exp.voc/voc8.res50v3+.CPS+CutMix/train.py ---------------------

CPS_SCRIPT = "exp.voc/voc8.res50v3+.CPS+CutMix/train.py"


def cps_loop(
    source: Path,
    pair: nn.Module,
    images_l: Tensor,
    masks_l: Tensor,
    images_u0: Tensor,
    images_u1: Tensor,
    mask_params: Tensor,
    cps_weight: float,
    optimizer_settings: dict[str, float],
) -> dict[str, Any]:
    """One iteration of the CPS+CutMix loop (``for idx in pbar``) of TorchSemiSeg.

    ``mask_params`` (B, 1, H, W) is the loader's CutMix mask (1: the pixel of
    ``images_u1``). Each branch gets its own SGD over (backbone, decoder) groups, as the
    release's ``optimizer_l`` / ``optimizer_r`` (the body sets the LR of two groups).
    """
    model = CPSNet(pair)
    model.train()

    def two_groups(network: nn.Module) -> list[dict[str, Any]]:
        backbone, decoder = network.param_groups()  # type: ignore[operator]
        return [{"params": backbone}, {"params": decoder}]

    optimizer_l = sgd(two_groups(pair.left), optimizer_settings)  # type: ignore[arg-type]
    optimizer_r = sgd(two_groups(pair.right), optimizer_settings)  # type: ignore[arg-type]
    batches = {
        "dataloader": {"data": images_l, "label": masks_l},
        "unsupervised_dataloader_0": {"data": images_u0, "mask_params": mask_params},
        "unsupervised_dataloader_1": {"data": images_u1},
    }
    namespace: dict[str, Any] = {
        "__loader_item__": 0,
        "torch": torch,
        "nn": nn,
        "F": F,
        "dist": dist,
        "time": __import__("time"),
        "model": model,
        "optimizer_l": optimizer_l,
        "optimizer_r": optimizer_r,
        "criterion": nn.CrossEntropyLoss(reduction="mean", ignore_index=255),
        "engine": types.SimpleNamespace(update_iteration=lambda *args: None, world_size=1),
        "config": types.SimpleNamespace(cps_weight=cps_weight, niters_per_epoch=1),
        "lr_policy": types.SimpleNamespace(get_lr=lambda idx: optimizer_settings["lr"]),
        "epoch": 0,
        **{name: types.SimpleNamespace(next=lambda b=batch: b) for name, batch in batches.items()},
    }
    code = loop_body(source / CPS_SCRIPT, "idx", "optimizer_r.step()")
    with cpu_only(), process_group():
        namespace["engine"].world_size = dist.get_world_size()
        exec(code, namespace)
    terms = {
        "loss_sup_both": namespace["loss_sup"] + namespace["loss_sup_r"],
        # Before cps_weight, as protoseg logs it (the total carries the weight).
        "cps_loss": namespace["cps_loss"] / cps_weight,
        "loss": namespace["loss"],
    }
    return {
        "terms": {k: v.detach().float() for k, v in terms.items()},
        "grads": grads_of(model),
        "state": state_of(model, "student."),
    }
