"""The runs of the network experiment (needs torch): train, prune, compress, fine-tune, measure.

:func:`execute` is called by :func:`sparsefact.experiments.networks.run_networks`, which holds
the settings, the outputs and the command line and imports this module (and torch) only when
a run starts, so that ``sparsefact networks --help`` and the other commands need no torch.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .data import ImageData, load_data
from .models import build_model, layer_table, parameter_count
from .names import model_spec
from .networks import (
    _CNN_STRUCTURED,
    PAI_METHODS,
    POST_METHODS,
    STRUCTURED_METHODS,
    NetworkSettings,
    _fmt_density,
    _not_run,
    _row,
    _wants_dense_ft,
    expected_rows,
)
from .training import evaluate, freeze, make_trainable, sparse_inference_model, threads, time_inference, train

__all__ = ["execute"]


def _positions(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """Positions (output rows per example) each weight layer is applied at, from one forward pass."""
    from .models import _weight_layers

    counts: dict[str, float] = {}
    handles = []

    def hook(name: str, conv: bool) -> Callable:
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            per = out.shape[-1] * out.shape[-2] if conv else out.numel() // out.shape[-1]
            counts[name] = counts.get(name, 0.0) + per / example.shape[0]
        return fn

    for name, module in _weight_layers(model):
        conv = hasattr(module, "kernel_size") and not hasattr(module, "in_features")
        handles.append(module.register_forward_hook(hook(name, conv)))
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(example)
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return counts


def _measure(model: nn.Module, data: ImageData, settings: NetworkSettings) -> dict[str, Any]:
    """Accuracy, per-layer kept fractions, density, parameters, MACs, inference time of a finished model."""
    model.eval()
    layers = layer_table(model)
    positions = _positions(model, data.x_test[:1])
    for row in layers:
        row["positions"] = positions.get(row["name"], 0.0)
    pruned = [r for r in layers if not r["structured"]]
    kept = sum(r["kept"] for r in pruned)
    total = sum(r["numel"] for r in pruned)
    collapsed = [r["name"] for r in pruned if r["kept"] == 0]
    macs = sum(r["kept"] * r["positions"] for r in layers)
    batch = data.x_test[: settings.time_batch]
    fastest, median = time_inference(model, batch, repeats=settings.time_repeats)
    kept_all = sum(r["kept"] for r in layers)
    numel_all = sum(r["numel"] for r in layers)
    return {
        "accuracy": evaluate(model, data.x_test, data.y_test),
        "density": kept / total if total else None,
        "density_all": kept_all / numel_all if numel_all else None,
        "weights_kept": kept,
        "weights_total": total,
        "params": parameter_count(model),
        "macs": macs,
        "inference_ms": 1000.0 * fastest,
        "inference_ms_median": 1000.0 * median,
        "layer_collapse": bool(collapsed),
        "collapsed_layers": collapsed,
        "layers": layers,
    }


# ---------------------------------------------------------------------- the runs
@dataclass
class _Context:
    data: ImageData
    settings: NetworkSettings
    log: Callable[[str], None]
    on_row: Callable[[dict[str, Any]], None]
    total: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        i = len(self.rows)
        target = _fmt_density(row["target_density"]) if row["target_density"] is not None else "fixed"
        if row["status"] == "ok":
            oneshot = row.get("accuracy_oneshot")
            extra = "" if oneshot is None else f" (one-shot {oneshot:.4f})"
            collapse = ", LAYER COLLAPSE" if row.get("layer_collapse") else ""
            dens = row["density_all"] if row["stage"] == "structured" else row["density"]
            self.log(f"[{i}/{self.total}] {row['model']} {row['method']} {target}: accuracy "
                     f"{row['accuracy']:.4f}{extra}, density {dens:.4g}, {row['params']} params, "
                     f"{row['inference_ms']:.2f} ms/batch{collapse} ({row['seconds']['total']:.1f} s)")
        else:
            self.log(f"[{i}/{self.total}] {row['model']} {row['method']} {target}: {row['status']}: "
                     f"{row['reason']}")
        self.on_row(row)

    def build(self, model_name: str, **kw: Any) -> nn.Module:
        s = self.settings
        return build_model(model_name, self.data.image_shape, self.data.n_classes, width=s.width,
                           depth=s.depth, channels=s.channels, hidden=s.hidden, seed=s.seed, **kw)

    def fit(self, model: nn.Module, epochs: int, lr: float) -> dict[str, Any]:
        s = self.settings
        return train(model, self.data.x_train, self.data.y_train, epochs=epochs, batch_size=s.batch_size,
                     lr=lr, seed=s.seed)


def _pai_loader(data: ImageData, per_class: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``per_class`` training examples of every class (the first ones), as batches of at most 256."""
    idx = torch.cat([torch.nonzero(data.y_train == c).flatten()[:per_class] for c in range(data.n_classes)])
    idx = idx.sort().values
    return [(data.x_train[idx[i:i + 256]], data.y_train[idx[i:i + 256]]) for i in range(0, len(idx), 256)]


def _run_dense(ctx: _Context, model_name: str) -> tuple[nn.Module, dict[str, Any]]:
    t0 = time.perf_counter()
    model = ctx.build(model_name)
    fit = ctx.fit(model, ctx.settings.epochs, ctx.settings.lr)
    metrics = _measure(model, ctx.data, ctx.settings)
    row = _row(model_name, "dense", "dense", 1.0, **metrics, train_loss=fit["loss"],
               seconds={"train": fit["seconds"], "total": time.perf_counter() - t0})
    ctx.add(row)
    return model, row


def _run_dense_ft(ctx: _Context, model_name: str, dense: nn.Module) -> None:
    """The control of the post-training rows: the trained dense model, fine-tuned as they are, unpruned."""
    s = ctx.settings
    t0 = time.perf_counter()
    model = copy.deepcopy(dense)
    fit = ctx.fit(model, s.finetune_epochs, s.finetune_lr)
    metrics = _measure(model, ctx.data, s)
    ctx.add(_row(model_name, "dense-ft", "dense", 1.0, **metrics, finetune_loss=fit["loss"],
                 seconds={"finetune": fit["seconds"], "total": time.perf_counter() - t0}))


def _run_pai(ctx: _Context, model_name: str, method: str, density: float, dense_row: dict[str, Any]) -> None:
    from ..nn_adapters.prune_init import prune_at_init

    s = ctx.settings
    t0 = time.perf_counter()
    model = ctx.build(model_name)
    rounds = s.synflow_rounds if method == "synflow" else 1
    loader = _pai_loader(ctx.data, s.pai_per_class)
    report = prune_at_init(model, loader, method, density, scope="global", rounds=rounds, seed=s.seed)
    t_prune = time.perf_counter() - t0
    fit = ctx.fit(model, s.epochs, s.lr)
    sparse_inference_model(model)
    metrics = _measure(model, ctx.data, s)
    totals = report.totals()
    ctx.add(_row(model_name, method, "pai", density, **metrics, accuracy_dense=dense_row["accuracy"],
                 rounds=rounds, pai_collapsed_layers=totals["collapsed_layers"],
                 flops_fraction_at_init=totals["flops_fraction"], train_loss=fit["loss"],
                 seconds={"prune": t_prune, "train": fit["seconds"], "total": time.perf_counter() - t0}))


def _run_post(ctx: _Context, model_name: str, method: str, density: float, dense: nn.Module,
              dense_row: dict[str, Any]) -> None:
    from ..nn_adapters import compress_model

    s = ctx.settings
    t0 = time.perf_counter()
    model = copy.deepcopy(dense)
    calib = [ctx.data.x_train[i:i + 256] for i in range(0, min(s.calib_size, len(ctx.data.y_train)), 256)]
    params = {"max_iter": s.dsf_max_iter} if method == "dsf" else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, report = compress_model(model, calib, POST_METHODS[method], density,
                                       layers=(nn.Linear, nn.Conv2d), blocks=False, sequential=True,
                                       progress=False, on_error="raise", threads=s.threads,
                                       measure_error=False, **params)
    except ValueError as exc:
        ctx.add(_not_run(model_name, method, "post", density, str(exc)))
        return
    finally:
        # compress_model(threads=n) hands the OpenMP pool back at its own idea of the previous
        # count (2 on this machine), which undoes torch.set_num_threads: set it again.
        if s.threads is not None:
            torch.set_num_threads(s.threads)
    t_compress = time.perf_counter() - t0
    model.eval()
    oneshot = evaluate(model, ctx.data.x_test, ctx.data.y_test)
    fit: dict[str, Any] = {"seconds": 0.0, "loss": []}
    if s.finetune_epochs > 0:
        make_trainable(model)
        fit = ctx.fit(model, s.finetune_epochs, s.finetune_lr)
        freeze(model)
    metrics = _measure(model, ctx.data, s)
    errs = [r["calibrated_err"] for r in report if r.get("calibrated_err") is not None]
    ctx.add(_row(model_name, method, "post", density, **metrics, accuracy_oneshot=oneshot,
                 accuracy_dense=dense_row["accuracy"], finetuned=s.finetune_epochs > 0,
                 mean_calibrated_err=sum(errs) / len(errs) if errs else None,
                 err_metric=report[0].get("err_metric", "gram") if len(report) else None,
                 finetune_loss=fit["loss"],
                 seconds={"compress": t_compress, "finetune": fit["seconds"],
                          "total": time.perf_counter() - t0}))


def _run_structured(ctx: _Context, model_name: str, method: str, dense_row: dict[str, Any]) -> None:
    from ..structured import monarch_blocks_for_density

    s = ctx.settings
    arch, _ = model_spec(model_name)
    targets: list[float | None] = [None] if method == "butterfly" else list(s.densities)
    if arch != "mlp":
        for d in targets:
            ctx.add(_not_run(model_name, method, "structured", d, _CNN_STRUCTURED))
        return
    done: dict[int, dict[str, Any]] = {}
    for d in targets:
        n_blocks = None
        if method == "monarch":
            try:
                n_blocks = monarch_blocks_for_density(d, s.width, s.width)
            except ValueError as exc:
                ctx.add(_not_run(model_name, method, "structured", d, str(exc)))
                continue
            if n_blocks in done:
                prev = done[n_blocks]
                row = {**copy.deepcopy(prev), "target_density": d,
                       "reason": f"same network as target density {prev['target_density']:.4g} "
                                 f"(both give {n_blocks} blocks); not trained again"}
                row["seconds"] = {"total": 0.0}
                ctx.add(row)
                continue
        t0 = time.perf_counter()
        model = ctx.build(model_name, structured=method, n_blocks=n_blocks)
        fit = ctx.fit(model, s.epochs, s.lr)
        metrics = _measure(model, ctx.data, s)
        structure = {"n_blocks": n_blocks} if method == "monarch" else {
            "block_size": int(model.head.fc.block_size)}
        row = _row(model_name, method, "structured", d, **metrics, accuracy_dense=dense_row["accuracy"],
                   structured_density=sum(r["kept"] for r in metrics["layers"] if r["structured"])
                   / max(1, sum(r["numel"] for r in metrics["layers"] if r["structured"])),
                   train_loss=fit["loss"],
                   seconds={"train": fit["seconds"], "total": time.perf_counter() - t0}, **structure)
        ctx.add(row)
        if n_blocks is not None:
            done[n_blocks] = row


def _safe(ctx: _Context, model_name: str, method: str, stage: str, target: float | None,
          fn: Callable[[], None]) -> None:
    """Run ``fn``; an unexpected exception becomes a ``failed`` row (the rest of the run goes on)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported in the row, the experiment continues
        ctx.add(_row(model_name, method, stage, target, status="failed",
                     reason=f"{type(exc).__name__}: {exc}"))


def execute(cfg: NetworkSettings, say: Callable[[str], None], on_row: Callable[[dict[str, Any]], None],
            result: dict[str, Any]) -> None:
    """Run every row of ``cfg`` (in :func:`~.networks.expected_rows` order) into ``result["rows"]``.

    Fills ``result["dataset"]`` and ``result["environment"]["torch"]``; calls ``on_row`` after
    every row. torch (and DSF's Numba/BLAS pools) run with ``cfg.threads`` threads.
    """
    result["environment"]["torch"] = torch.__version__
    with threads(cfg.threads):
        _execute(cfg, say, on_row, result)


def _execute(cfg: NetworkSettings, say: Callable[[str], None], on_row: Callable[[dict[str, Any]], None],
             result: dict[str, Any]) -> None:
    data = load_data(cfg.dataset).subset(cfg.train_size, cfg.test_size, seed=cfg.seed)
    result["dataset"] = {"name": data.name, "description": data.describe(), "note": data.note,
                         "train": len(data.y_train), "test": len(data.y_test)}
    say(f"network experiment on {data.describe()}" + (f" -- {data.note}" if data.note else ""))
    plan = expected_rows(cfg)
    ctx = _Context(data, cfg, say, on_row, total=len(plan), rows=result["rows"])
    seen_arch: set[str] = set()
    for model_name in cfg.models:
        try:
            dense, dense_row = _run_dense(ctx, model_name)
        except Exception as exc:  # noqa: BLE001
            ctx.add(_row(model_name, "dense", "dense", 1.0, status="failed",
                         reason=f"{type(exc).__name__}: {exc}"))
            dense, dense_row = None, {"accuracy": None}
        if _wants_dense_ft(cfg):
            if dense is None:
                ctx.add(_not_run(model_name, "dense-ft", "dense", 1.0, "the dense model failed"))
            else:
                _safe(ctx, model_name, "dense-ft", "dense", 1.0,
                      lambda n=model_name, net=dense: _run_dense_ft(ctx, n, net))
        for method in cfg.methods:
            for d in cfg.densities:
                if method in PAI_METHODS:
                    _safe(ctx, model_name, method, "pai", d,
                          lambda n=model_name, m=method, d=d, r=dense_row: _run_pai(ctx, n, m, d, r))
                elif method in POST_METHODS:
                    if dense is None:
                        ctx.add(_not_run(model_name, method, "post", d, "the dense model failed"))
                        continue
                    _safe(ctx, model_name, method, "post", d,
                          lambda n=model_name, m=method, d=d, net=dense, r=dense_row:
                          _run_post(ctx, n, m, d, net, r))
        arch, _ = model_spec(model_name)
        if arch not in seen_arch:
            seen_arch.add(arch)
            for method in STRUCTURED_METHODS:
                if method in cfg.methods:
                    n_before = len(ctx.rows)
                    try:
                        _run_structured(ctx, model_name, method, dense_row)
                    except Exception as exc:  # noqa: BLE001
                        targets = [None] if method == "butterfly" else list(cfg.densities)
                        for d in targets[len(ctx.rows) - n_before:]:
                            ctx.add(_row(model_name, method, "structured", d, status="failed",
                                         reason=f"{type(exc).__name__}: {exc}"))
