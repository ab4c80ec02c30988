r"""Fine-tune a compressed model towards its dense original, and gradual compression.

:func:`finetune` is knowledge distillation of a compressed model (the *student*, whose
:class:`~.modules.DoubleSparseLinear` / :class:`~.modules.SparseLinear` / ... layers train with
their sparsity patterns fixed, :func:`~.modules.set_trainable`) towards the dense model it came
from (the *teacher*) on unlabelled data, usually the calibration data:

- ``mode="end_to_end"``: the student's output (by default ``logits`` if the model returns
  them, else ``last_hidden_state``, else the first output) is pulled towards the teacher's;
- ``mode="layerwise"``: every repeated block of the student (:func:`~.compress.find_blocks`) is
  pulled towards the output of the teacher's block *given the teacher's block input*, so each
  block learns to reproduce its dense counterpart independently (the loss is the mean over
  blocks); only parameters inside the blocks receive gradients.

Losses (``loss=``), computed in float32 over the real tokens only (a batch's ``attention_mask``
drops padded positions when the compared tensor is ``(batch, tokens, ...)``):

- ``"mse"``: normalised mean squared error ``sum (s - t)^2 / sum t^2`` (0 = exact, 1 = as far as
  predicting zeros), scale-free so that blocks of different scale weigh alike and the default
  learning rate does not depend on the size of the hidden states;
- ``"cosine"``: mean over tokens of ``1 - cos(s, t)`` along the last axis;
- ``"kl"``: mean over tokens of ``KL(softmax t || softmax s)`` (logits of a language model).

An optional ``task_loss(outputs, batch)`` (a labelled objective) is added with ``task_weight``;
with ``teacher=None`` it is the only loss.

Held-out evaluation (``eval_data``) is always the end-to-end distillation loss, in both modes,
so the two modes are compared on the same number; it runs before the first step, every
``eval_every`` steps and after the last. ``patience`` stops after that many evaluations without
an improvement of at least ``min_delta``; ``restore_best`` (default) puts back the trainable values
of the best evaluation. The report (:class:`FinetuneReport`) has the curves.

Conventions (what an engineer who fine-tunes pruned models expects): the student and teacher
train/eval modes and ``config.use_cache`` are restored afterwards, the requires-grad flags of
every parameter too; the compressed layers are frozen back into inference buffers
(``keep_trainable=False``), ready for :func:`~.io.save_compressed`; the run is reproducible for a
``seed`` (batch order from a seeded generator, the global torch RNG forked so the caller's is
untouched); batches go to the student's device; the teacher runs under ``no_grad`` in eval mode
and its outputs are cached once per batch (``cache_teacher``); the student trains in eval mode
(no dropout) unless ``dropout=True`` -- the target is the dense model's deterministic output.
The two factors of a DSF layer are rebalanced first (:func:`balance_factors`: same product, same
patterns, equal scales; DSF's own factors differ in scale by two to three orders of magnitude,
which makes Adam's uniform step size useless). Defaults are sized for a CPU: AdamW,
``lr=1e-4``, 10% linear warm-up then cosine decay, gradient clipping at 1.0.

:func:`compress_gradually` compresses in stages (``schedule=[0.7, 0.5, 0.3]``) with fine-tuning
between them. Between stages every compressed layer is replaced by a dense layer holding its
current product (:func:`densify`), which is then compressed again at the next density: this is a
**re-factorisation of the fine-tuned product**, not a warm start of the factorisation from the
fine-tuned factors (the DSF alternation's own warm-start state lives in its scaled, possibly
transposed problem and is not part of the public fit API).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import iter_batches, run_batch
from .compress import _block_hidden, _resolve_blocks, compress_model
from .modules import _FactorModule, replace_module, set_trainable

__all__ = [
    "FinetuneReport",
    "GradualReport",
    "balance_factors",
    "compress_gradually",
    "densify",
    "distillation_loss",
    "finetune",
    "model_output",
]

_MODES = ("end_to_end", "layerwise")
_LOSSES = ("mse", "cosine", "kl")


# ---------------------------------------------------------------------- losses
def model_output(outputs: Any) -> torch.Tensor:
    """The tensor a model's outputs are compared by: ``logits``, else ``last_hidden_state``, else ``[0]``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    for attr in ("logits", "last_hidden_state"):
        value = getattr(outputs, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(outputs, Mapping):
        for key in ("logits", "last_hidden_state"):
            if isinstance(outputs.get(key), torch.Tensor):
                return outputs[key]
    if isinstance(outputs, tuple | list) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"cannot find an output tensor in a model output of type {type(outputs).__name__}; "
                    "pass output=callable(outputs, batch) -> tensor")


def _token_weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``(batch, tokens)`` float weights of real tokens when ``like`` is ``(batch, tokens, ...)``."""
    if mask is None or like.dim() < 3 or tuple(like.shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(device=like.device, dtype=torch.float32)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, loss: str = "mse",
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """The distillation loss between two output tensors (float32), over the real tokens of ``mask``.

    Parameters
    ----------
    student, teacher : tensor
        Same shape; the last axis holds the features (hidden size, or vocabulary for ``"kl"``).
    loss : {"mse", "cosine", "kl"}
        See the module docstring (``"mse"`` is the normalised squared error).
    mask : tensor, optional
        ``(batch, tokens)``, nonzero = real token; used when the outputs are ``(batch, tokens, ...)``.
    """
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} and teacher output "
                         f"{tuple(teacher.shape)} differ")
    s = student.float()
    t = teacher.detach().to(device=s.device, dtype=torch.float32)
    w = _token_weights(mask, s)
    if loss == "mse":
        err = (s - t).pow(2)
        ref = t.pow(2)
        if w is not None:
            shape = (*w.shape, *([1] * (s.dim() - 2)))
            err, ref = err * w.reshape(shape), ref * w.reshape(shape)
        return err.sum() / ref.sum().clamp_min(1e-12)
    if loss == "cosine":
        per = 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        per = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                         reduction="none").sum(-1)
    if w is not None:
        w = w.reshape(*w.shape, *([1] * (per.dim() - 2)))
        return (per * w).sum() / (w.sum() * (per[0, 0].numel())).clamp_min(1.0)
    return per.mean()


def _batch_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping) or hasattr(batch, "keys"):
        mask = batch.get("attention_mask") if hasattr(batch, "get") else None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
    return None


# ---------------------------------------------------------------------- report
@dataclass
class FinetuneReport:
    """What :func:`finetune` did.

    Attributes
    ----------
    mode, loss : str
    steps : int
        Optimiser steps run (fewer than ``max_steps`` after early stopping).
    max_steps : int
    train_loss : list of float
        The training objective of every step (distillation + weighted task loss; in layer-wise
        mode the mean block loss).
    eval_history : list of (step, loss)
        Held-out end-to-end distillation loss; step 0 is before training.
    best_step, best_eval : int and float, or None
        The best evaluation (None without ``eval_data``).
    stopped_early, restored_best : bool
    seconds : float
    trainable_parameters : int
        Trainable values (the masked factors count their whole dense tensor; ``trainable_nonzeros``
        counts the pattern).
    trainable_nonzeros : int
    """

    mode: str
    loss: str
    steps: int
    max_steps: int
    train_loss: list[float] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best_eval: float | None = None
    stopped_early: bool = False
    restored_best: bool = False
    seconds: float = 0.0
    trainable_parameters: int = 0
    trainable_nonzeros: int = 0

    @property
    def initial_eval(self) -> float | None:
        """The held-out loss before training."""
        return self.eval_history[0][1] if self.eval_history else None

    @property
    def final_eval(self) -> float | None:
        """The held-out loss of the returned model (the best one with ``restore_best``)."""
        if not self.eval_history:
            return None
        return self.best_eval if self.restored_best else self.eval_history[-1][1]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["eval_history"] = [list(e) for e in self.eval_history]
        out["initial_eval"], out["final_eval"] = self.initial_eval, self.final_eval
        return out


# ---------------------------------------------------------------------- parameters
def _select_trainable(model: nn.Module, train: Any) -> dict[str, bool]:
    """Make the chosen parameters trainable; return the previous requires-grad flags of the others."""
    set_trainable(model, True)
    factor_params = {id(p) for m in model.modules() if isinstance(m, _FactorModule) for p in m.parameters()}
    previous = {}
    for name, p in model.named_parameters():
        if id(p) in factor_params:
            continue
        previous[name] = p.requires_grad
        if train == "compressed":
            want = False
        elif train == "all":
            want = True
        else:
            want = bool(train(name, p))
        p.requires_grad_(want)
    return previous


def _restore_flags(model: nn.Module, previous: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        if name in previous:
            p.requires_grad_(previous[name])


def _snapshot(params: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params}


def _load_snapshot(params: list[tuple[str, nn.Parameter]], snap: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params:
            p.copy_(snap[n])


def _lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------- teacher signals
class _BlockRecorder:
    """Hooks on a model's blocks: each block's ``(args, kwargs)`` and hidden output of one forward pass."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks = list(blocks)
        self.inputs: list[tuple[tuple, dict] | None] = [None] * len(self.blocks)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.handles: list[Any] = []

    def __enter__(self) -> _BlockRecorder:
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post(i)))
        return self

    def _pre(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs[i] = (tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()})

        return hook

    def _post(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.outputs[i] = _block_hidden(output).detach()

        return hook

    def __exit__(self, *exc: Any) -> None:
        while self.handles:
            self.handles.pop().remove()


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(v.detach() for v in value)  # e.g. rotary (cos, sin)
    return value


def _to(value: Any, device: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")



def _trainable_nonzeros(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> int:
    """Entries that can change: a masked factor counts its pattern, any other parameter its size."""
    factor_values: dict[int, int] = {}
    for module in model.modules():
        parametrizations = getattr(module, "parametrizations", None)
        if not isinstance(module, _FactorModule) or parametrizations is None:
            continue
        for fname in module._factor_names:
            if fname in parametrizations:
                plist = parametrizations[fname]
                factor_values[id(plist.original)] = int(plist[0].mask.sum())
    return sum(factor_values.get(id(p), p.numel()) for _, p in named)


@torch.no_grad()
def balance_factors(model: nn.Module) -> int:
    """Rescale every two-factor module's ``A``, ``B`` so that column ``j`` of ``A`` and row ``j`` of ``B``
    have equal norms; the product ``A B`` and both sparsity patterns are unchanged.

    ``A B = (A D)(D^-1 B)`` with ``d_j = sqrt(||B_j,:|| / ||A_:,j||)``. DSF factors come out of the
    alternation very unbalanced -- on MiniLM at density 0.3 the median nonzero of ``A`` is about
    2.8 and of ``B`` about 0.008 in the query layers (4.4 and 0.0018 in the intermediate layers) --
    and an optimiser such as Adam, whose steps have the same size for every entry, then moves the
    small factor by a large relative amount and the large one hardly at all (measured: lr 1e-4
    without balancing raised the distillation loss from 0.11 to 0.19 in one step). Balanced
    factors make the step size mean the same thing in both. Returns the number of modules rescaled.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, _FactorModule) or module.trainable:
            continue
        if tuple(module._factor_names) != ("A", "B"):
            continue
        A, B = module.factor("A"), module.factor("B")
        if A.dim() != 2 or B.dim() != 2:
            continue
        a = A.double().norm(dim=0)
        b = B.double().reshape(B.shape[0], -1).norm(dim=1)
        ok = (a > 0) & (b > 0)
        d = torch.where(ok, torch.sqrt(b / torch.where(ok, a, 1.0)), torch.ones_like(a))
        module._set_factor("A", (A.double() * d[None, :]).to(A.dtype), module.layouts["A"])
        module._set_factor("B", (B.double() / d[:, None]).to(B.dtype), module.layouts["B"])
        count += 1
    return count


# ---------------------------------------------------------------------- finetune
def finetune(
    model: nn.Module,
    teacher: nn.Module | Sequence[torch.Tensor] | None,
    data: Any,
    *,
    steps: int = 100,
    lr: float = 1e-4,
    mode: str = "end_to_end",
    loss: str = "mse",
    eval_data: Any = None,
    eval_targets: Sequence[torch.Tensor] | None = None,
    eval_every: int | None = None,
    eval_metric: Callable[[nn.Module], float] | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    restore_best: bool = True,
    task_loss: Callable[[Any, Any], torch.Tensor] | None = None,
    task_weight: float = 1.0,
    output: Callable[[Any, Any], torch.Tensor] | None = None,
    train: str | Callable[[str, nn.Parameter], bool] = "compressed",
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    weight_decay: float = 0.0,
    warmup: float | int = 0.1,
    schedule: str = "cosine",
    grad_clip: float | None = 1.0,
    dropout: bool = False,
    cache_teacher: bool = True,
    blocks: Any = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    keep_trainable: bool = False,
    balance: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> FinetuneReport:
    """Distil a compressed ``model`` towards the dense ``teacher`` on ``data``, patterns fixed.

    Parameters
    ----------
    model : nn.Module
        The compressed student, modified in place (its compressed layers' nonzero values, biases
        and whatever ``train`` selects).
    teacher : nn.Module, sequence of tensors, or None
        The dense model (same architecture, or anything whose output matches the student's), or
        precomputed target outputs, one per batch of ``data`` (end-to-end only; ``eval_targets``
        then gives those of ``eval_data``), or ``None`` to train on ``task_loss`` alone.
    data : tensor, dict, or iterable of batches
        As for :func:`~.compress.compress_model` (a dict batch's ``attention_mask`` masks the
        loss); materialised as a list, cycled in a seeded random order, one batch per step.
    steps : int
        Optimiser steps (the budget).
    lr : float
        Peak learning rate of AdamW (with ``optimizer=None``).
    mode : {"end_to_end", "layerwise"}
        See the module docstring.
    loss : {"mse", "cosine", "kl"}
        See :func:`distillation_loss`.
    eval_data : batches, optional
        Held-out batches for the end-to-end distillation loss (the task loss when there is no
        teacher); evaluated before training, every ``eval_every`` steps (default ``steps // 10``)
        and at the end.
    eval_metric : callable, optional
        ``eval_metric(model) -> float`` (lower is better, e.g. ``1 - held-out embedding cosine``),
        evaluated instead of the distillation loss on ``eval_data`` (no grad, eval mode); with it
        ``eval_data`` may be omitted.
    patience : int, optional
        Stop after this many evaluations in a row without an improvement of ``min_delta``.
    restore_best : bool
        Put back the trainable values of the best evaluation at the end.
    task_loss : callable, optional
        ``task_loss(student_outputs, batch) -> scalar``, added with ``task_weight`` (end-to-end).
    output : callable, optional
        ``output(outputs, batch) -> tensor``: what is compared (default :func:`model_output`).
    train : {"compressed", "all"} or callable
        Parameters that train besides the compressed layers: none (default), every one, or
        those for which ``train(name, parameter)`` is true (e.g. LayerNorms).
    optimizer : callable, optional
        ``optimizer(parameters) -> torch.optim.Optimizer``, replacing AdamW.
    weight_decay : float
    warmup : float or int
        Linear warm-up: a fraction of ``steps`` (float < 1) or a number of steps.
    schedule : {"cosine", "constant"}
        Learning rate after warm-up.
    grad_clip : float or None
        Clip the gradient norm.
    dropout : bool
        Train the student in train mode (dropout on); default eval mode.
    cache_teacher : bool
        Run the teacher once per batch and keep its outputs (block inputs and outputs in
        layer-wise mode); else run it at every step.
    blocks : see :func:`~.compress.compress_model`
        The blocks of layer-wise mode (default: :func:`~.compress.find_blocks`); the teacher's
        blocks are the modules of the same names in the teacher.
    forward : callable, optional
        ``forward(model, batch)`` for unusual inputs.
    keep_trainable : bool
        Leave the compressed layers trainable (parameters) instead of freezing them back.
    balance : bool
        :func:`balance_factors` first (same products and patterns, factors of equal scale), so
        that the optimiser's step size means the same in both factors.
    progress : bool
        tqdm progress bar (stderr).
    seed : int
        Seeds the batch order and, in a forked RNG, dropout.

    Returns
    -------
    FinetuneReport

    Raises
    ------
    ValueError
        Bad arguments, nothing to train, no blocks in layer-wise mode, or no loss.
    """
    from tqdm.auto import tqdm

    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if train not in ("compressed", "all") and not callable(train):
        raise ValueError(f"train must be 'compressed', 'all' or a callable, got {train!r}")
    if teacher is None and task_loss is None:
        raise ValueError("nothing to learn: give a teacher, or a task_loss")
    targets = None
    if teacher is not None and not isinstance(teacher, nn.Module):
        targets = list(teacher)
        teacher = None
    if mode == "layerwise":
        if teacher is None:
            raise ValueError("mode='layerwise' needs the teacher model (its block inputs and outputs)")
        if task_loss is not None:
            raise ValueError("task_loss needs the full forward pass: use mode='end_to_end'")
    batches = list(iter_batches(data))
    if not batches:
        raise ValueError("data has no batches")
    if targets is not None and len(targets) != len(batches):
        raise ValueError(f"{len(targets)} targets for {len(batches)} batches")
    eval_batches = None if eval_data is None else (list(iter_batches(eval_data)) or None)
    if eval_metric is not None and eval_batches is None:
        eval_batches = []  # evaluation through the metric alone
    if eval_metric is None and eval_batches is not None and teacher is None and targets is not None:
        if eval_targets is None or len(list(eval_targets)) != len(eval_batches):
            raise ValueError("with precomputed targets, eval_data needs eval_targets (one per batch)")
        eval_targets = list(eval_targets)
    pick = output if output is not None else (lambda outputs, batch: model_output(outputs))
    device = _device_of(model)

    student_blocks = teacher_blocks = None
    if mode == "layerwise":
        # find_blocks looks for blocks of dense layers: search the (dense) teacher, unless the student's
        # blocks are given as modules or names
        on_teacher = blocks is None or isinstance(blocks, str)
        resolved = _resolve_blocks(teacher if on_teacher else model, blocks)
        if resolved is None:
            raise ValueError("mode='layerwise' found no repeated blocks in the model (pass blocks=...)")
        names = resolved[0]
        try:
            student_blocks = [model.get_submodule(n) for n in names]
            teacher_blocks = [teacher.get_submodule(n) for n in names]
        except AttributeError as exc:
            raise ValueError(f"layer-wise mode needs the same architecture in student and teacher: {exc}") \
                from exc

    n_eval_every = max(1, steps // 10) if eval_every is None else int(eval_every)
    warmup_steps = int(round(warmup * steps)) if isinstance(warmup, float) and warmup < 1 else int(warmup)
    models = [model] + ([teacher] if teacher is not None else [])
    modes = [m.training for m in models]
    caches = []
    for m in models:
        cfg = getattr(m, "config", None)
        caches.append((cfg, getattr(cfg, "use_cache", None)))
        if getattr(cfg, "use_cache", None):
            cfg.use_cache = False
    if balance:
        balance_factors(model)
    previous_flags = _select_trainable(model, train)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    report = FinetuneReport(mode=mode, loss=loss, steps=0, max_steps=steps,
                            trainable_parameters=sum(p.numel() for _, p in named),
                            trainable_nonzeros=_trainable_nonzeros(model, named))
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    start = time.perf_counter()
    try:
        if not named:
            raise ValueError("no trainable parameters: the model has no compressed layers and "
                             "train='compressed'")
        if teacher is not None:
            teacher.eval()
        cache: dict[tuple[str, int], Any] = {}

        def teacher_output(split: str, i: int, batch: Any) -> torch.Tensor:
            if split == "train" and targets is not None:
                return targets[i].to(device)
            if split == "eval" and teacher is None:
                return eval_targets[i].to(device)
            key = (split, i)
            if key in cache:
                return cache[key]
            with torch.no_grad():
                value = pick(run_batch(teacher, batch, forward=forward), batch).detach().to(device)
            if cache_teacher:
                cache[key] = value
            return value

        def teacher_blocks_io(i: int, batch: Any) -> list[tuple[tuple, dict, torch.Tensor]]:
            key = ("blocks", i)
            if key in cache:
                return cache[key]
            with torch.no_grad(), _BlockRecorder(teacher_blocks) as rec:
                run_batch(teacher, batch, forward=forward)
            if any(o is None for o in rec.outputs):
                raise ValueError("the teacher's forward pass did not run every block")
            value = [(_to(a, device), _to(k, device), o.to(device))
                     for (a, k), o in zip(rec.inputs, rec.outputs, strict=True)]
            if cache_teacher:
                cache[key] = value
            return value

        def objective(i: int, batch: Any) -> torch.Tensor:
            mask = _batch_mask(batch)
            if mode == "layerwise":
                total = None
                signals = teacher_blocks_io(i, batch)
                for block, (args, kwargs, target) in zip(student_blocks, signals, strict=True):
                    hidden = _block_hidden(block(*args, **kwargs))
                    term = distillation_loss(hidden, target, loss, mask)
                    total = term if total is None else total + term
                return total / len(student_blocks)
            outputs = run_batch(model, batch, forward=forward)
            value = None
            if teacher is not None or targets is not None:
                value = distillation_loss(pick(outputs, batch), teacher_output("train", i, batch), loss, mask)
            if task_loss is not None:
                term = task_weight * task_loss(outputs, batch)
                value = term if value is None else value + term
            return value

        @torch.no_grad()
        def evaluate() -> float:
            model.eval()
            if eval_metric is not None:
                value = float(eval_metric(model))
                model.train(dropout)
                return value
            values = []
            for j, batch in enumerate(eval_batches):
                outputs = run_batch(model, batch, forward=forward)
                if teacher is None and targets is None:
                    values.append(float(task_loss(outputs, batch)))
                else:
                    target = teacher_output("eval", j, batch)
                    values.append(float(distillation_loss(pick(outputs, batch), target, loss,
                                                          _batch_mask(batch))))
            model.train(dropout)
            return sum(values) / len(values)

        params = [p for _, p in named]
        opt = optimizer(params) if optimizer is not None else torch.optim.AdamW(
            params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: _lr_factor(s, steps, warmup_steps, schedule))
        gen = torch.Generator().manual_seed(int(seed))
        order: list[int] = []
        best_snapshot = None
        bad = 0

        def record_eval(step: int) -> bool:
            """Evaluate at ``step``; return True to stop early."""
            nonlocal best_snapshot, bad
            value = evaluate()
            report.eval_history.append((step, value))
            if report.best_eval is None or value < report.best_eval - min_delta:
                report.best_eval, report.best_step, bad = value, step, 0
                if restore_best:
                    best_snapshot = _snapshot(named)
            else:
                bad += 1
            return patience is not None and bad >= patience

        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(int(seed))
            model.train(dropout)
            evaluating = eval_batches is not None
            if evaluating:
                record_eval(0)
            bar = tqdm(total=steps, desc=f"finetune ({mode}, {loss})", disable=not progress)
            try:
                for step in range(1, steps + 1):
                    if not order:
                        order = torch.randperm(len(batches), generator=gen).tolist()
                    i = order.pop()
                    value = objective(i, batches[i])
                    opt.zero_grad(set_to_none=True)
                    value.backward()
                    if grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    opt.step()
                    sched.step()
                    report.train_loss.append(float(value.detach()))
                    report.steps = step
                    postfix = {"loss": f"{report.train_loss[-1]:.4g}"}
                    stop = False
                    if evaluating and (step % n_eval_every == 0 or step == steps):
                        stop = record_eval(step)
                        postfix["eval"] = f"{report.eval_history[-1][1]:.4g}"
                    bar.set_postfix(postfix)
                    bar.update(1)
                    if stop:
                        report.stopped_early = True
                        break
            finally:
                bar.close()
            if evaluating and report.eval_history[-1][0] != report.steps:
                record_eval(report.steps)
        if restore_best and best_snapshot is not None and report.best_step != report.steps:
            _load_snapshot(named, best_snapshot)
            report.restored_best = True
    finally:
        report.seconds = time.perf_counter() - start
        _restore_flags(model, previous_flags)
        if not keep_trainable:
            set_trainable(model, False)
        for m, was in zip(models, modes, strict=True):
            m.train(was)
        for cfg, use_cache in caches:
            if use_cache:
                cfg.use_cache = use_cache
    return report


# ---------------------------------------------------------------------- gradual compression
def _dense_like(module: _FactorModule, template: nn.Module | None) -> nn.Module:
    """A dense layer computing ``module``'s current product: a copy of ``template`` or a new layer."""
    with torch.no_grad():
        W = module.to_dense().detach()
        bias = None if module.bias is None else module.bias.detach()
        if template is None:
            if W.dim() == 4:
                layer = nn.Conv2d(W.shape[1], W.shape[0], tuple(W.shape[2:]), stride=module.stride,
                                  padding=module.padding, dilation=module.dilation, bias=bias is not None)
            else:
                layer = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
            layer = layer.to(device=W.device, dtype=W.dtype)
        else:
            layer = copy.deepcopy(template).to(device=W.device, dtype=W.dtype)
        from .capture import _is_hf_conv1d

        target = W.T if _is_hf_conv1d(layer) else W.reshape(layer.weight.shape)
        if tuple(target.shape) != tuple(layer.weight.shape):
            raise ValueError(f"the product {tuple(W.shape)} does not fit the dense layer "
                             f"{tuple(layer.weight.shape)}")
        layer.weight.copy_(target)
        if (layer.bias is None) != (bias is None):
            raise ValueError("the compressed layer and its dense template disagree on the bias")
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def densify(model: nn.Module, reference: nn.Module | Mapping[str, nn.Module] | None = None) -> list[str]:
    """Replace every compressed module of ``model`` by a dense layer holding its current product.

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    reference : nn.Module or {name: layer}, optional
        Where to take each dense layer's type from (a copy of the reference's layer of the same
        name gets the product as its weight: ``nn.Linear``, transformers ``Conv1D`` -- weight
        stored transposed -- or ``nn.Conv2d``). Default: a new ``nn.Linear`` / ``nn.Conv2d``.

    Returns
    -------
    list of str
        The names of the replaced modules.
    """
    names = [n for n, m in model.named_modules() if n and isinstance(m, _FactorModule)]
    replaced = []
    for name in names:
        module = model.get_submodule(name)
        if module.trainable:
            module.set_trainable(False)
        template = None
        if isinstance(reference, nn.Module):
            try:
                template = reference.get_submodule(name)
            except AttributeError:
                template = None
        elif isinstance(reference, Mapping):
            template = reference.get(name)
        replace_module(model, name, _dense_like(module, template))
        replaced.append(name)
    return replaced


@dataclass
class GradualReport:
    """What :func:`compress_gradually` did, stage by stage.

    Attributes
    ----------
    schedule : list of float
    stages : list of dict
        Per stage: ``density`` (target), ``compression`` (the
        :class:`~.compress.CompressionReport` summary), ``finetune``
        (:meth:`FinetuneReport.to_dict`), ``seconds``.
    compression : list of CompressionReport
    finetune : list of FinetuneReport
    seconds : float
    """

    schedule: list[float]
    stages: list[dict[str, Any]] = field(default_factory=list)
    compression: list[Any] = field(default_factory=list)
    finetune: list[FinetuneReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total_finetune_steps(self) -> int:
        return sum(r.steps for r in self.finetune)

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": list(self.schedule), "stages": list(self.stages), "seconds": self.seconds,
                "total_finetune_steps": self.total_finetune_steps}


def _warm_start_factors(model: nn.Module, method: Any) -> dict[str, dict[str, Any]]:
    """``{layer: {"init_factors": (A, B)}}`` of the model's DSF linear layers (float64 NumPy), for
    a DSF ``method``; empty for other methods (they have no factors to start from)."""
    from ..estimators import DoubleSparseFactorization
    from ..methods import spec_for
    from .modules import DoubleSparseLinear

    if not issubclass(spec_for(method).estimator, DoubleSparseFactorization):
        return {}
    out = {}
    for name, module in model.named_modules():
        if type(module) is DoubleSparseLinear:
            factors = tuple(module.factor(f).detach().double().cpu().numpy() for f in module._factor_names)
            out[name] = {"init_factors": factors}
    return out


def compress_gradually(
    model: nn.Module,
    data: Any,
    schedule: Sequence[float] = (0.7, 0.5, 0.3),
    finetune_steps: int | Sequence[int] = 100,
    method: Any = "dsf",
    *,
    teacher: nn.Module | None = None,
    eval_data: Any = None,
    finetune_kwargs: Mapping[str, Any] | None = None,
    compress_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    seed: int = 0,
    warm_start: bool = True,
    **params: Any,
) -> tuple[nn.Module, GradualReport]:
    """Compress in stages of decreasing density, fine-tuning after each; return ``(model, report)``.

    Stage ``i`` compresses every target layer to ``schedule[i]`` with :func:`~.compress.compress_model`
    (calibrated on ``data`` through the model as it is then) and fine-tunes the result towards the
    dense teacher for ``finetune_steps[i]`` steps (:func:`finetune`). Before stage ``i > 0`` the
    compressed layers become dense layers holding their fine-tuned products (:func:`densify`,
    with the layer types of the original model), which are then compressed again. With
    ``warm_start=True`` (default) a DSF layer's new factorisation starts from its fine-tuned
    factors (``DoubleSparseFactorization(init_factors=(A, B))``: their values and supports,
    re-selected within the new budget); otherwise (and for other methods) it starts from scratch.

    Parameters
    ----------
    model : nn.Module
        The dense model, modified in place.
    data : batches
        Calibration and fine-tuning data.
    schedule : sequence of float
        Target densities, one per stage.
    finetune_steps : int or sequence of int
        Fine-tuning steps per stage (an int: the same for every stage).
    method : str or estimator
        As for :func:`~.compress.compress_model`.
    teacher : nn.Module, optional
        The dense model to distil towards (default: a copy of ``model`` taken before the first stage).
    eval_data : batches, optional
        Held-out batches for :func:`finetune`'s evaluation.
    finetune_kwargs, compress_kwargs : mappings, optional
        Passed to :func:`finetune` (``lr``, ``mode``, ``loss``, ...) and to
        :func:`~.compress.compress_model` (``layers``, ``blocks``, ``sequential``, ...; ``layers``
        applies to the first stage, later stages compress the same layers).
    progress : bool
    seed : int
        Stage ``i`` fine-tunes with seed ``seed + i``.
    warm_start : bool
        Start each later stage's DSF fits from the fine-tuned factors (see above).
    **params
        Estimator parameters (e.g. ``max_iter=8``).
    """
    schedule = [float(d) for d in schedule]
    if not schedule:
        raise ValueError("schedule is empty")
    steps = [int(finetune_steps)] * len(schedule) if isinstance(finetune_steps, int) else [int(s) for s in
                                                                                            finetune_steps]
    if len(steps) != len(schedule):
        raise ValueError(f"finetune_steps has {len(steps)} entries for {len(schedule)} stages")
    compress_kwargs = dict(compress_kwargs or {})
    compress_kwargs.setdefault("progress", progress)
    finetune_kwargs = dict(finetune_kwargs or {})
    finetune_kwargs.setdefault("progress", progress)
    if any(isinstance(m, _FactorModule) for m in model.modules()):
        raise ValueError("compress_gradually starts from a dense model; this one has compressed layers "
                         "(densify() it first)")
    if teacher is None:
        teacher = copy.deepcopy(model)
    from .capture import is_supported_layer

    templates = {n: m for n, m in model.named_modules() if n and is_supported_layer(m)}
    report = GradualReport(schedule=schedule)
    start = time.perf_counter()
    wanted: set[str] | None = None
    for i, (density, n_steps) in enumerate(zip(schedule, steps, strict=True)):
        t0 = time.perf_counter()
        kwargs = dict(compress_kwargs)
        if i > 0:
            if warm_start:
                kwargs["layer_params"] = _warm_start_factors(model, method)
            densify(model, templates)
            kwargs["layers"] = lambda name, module, _w=frozenset(wanted): name in _w
        model, comp = compress_model(model, data, method, density, **kwargs, **params)
        if wanted is None:
            wanted = {row["name"] for row in comp}
        ft = finetune(model, teacher, data, steps=n_steps, eval_data=eval_data, seed=seed + i,
                      **finetune_kwargs)
        report.compression.append(comp)
        report.finetune.append(ft)
        report.stages.append({"density": density, "compression": comp.summary(), "finetune": ft.to_dict(),
                              "seconds": time.perf_counter() - t0})
    report.seconds = time.perf_counter() - start
    return model, report
