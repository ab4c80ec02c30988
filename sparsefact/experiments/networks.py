"""The network experiment: pruning at initialisation, post-training compression and structured layers.

Reproduces the pruning-at-initialisation study (a 6-layer ReLU MLP and a VGG-style CNN, each
with a dense and with a butterfly classification head, at densities ``10^-k`` for
``k in {0.05, 0.1, 0.2, 0.5, 1, 2}``; top-1 accuracy, parameters kept, FLOPs, inference
time, layer collapse) and adds what the study did not have: post-training DSF and its peers
at the same densities, and networks made of butterfly / Monarch layers.

For every model (:data:`~sparsefact.experiments.models.MODEL_NAMES`):

* ``dense``: the model trained for ``epochs`` epochs — the reference, and the starting point of
  the post-training methods.
* **Pruning at initialisation** (``random``, ``magnitude``, ``snip``, ``grasp``, ``synflow``):
  the freshly initialised model (the same initial weights as ``dense``) is pruned by
  :func:`~sparsefact.nn_adapters.prune_init.prune_at_init` (global scope, SynFlow with
  ``synflow_rounds`` rounds of the exponential schedule, the others one shot; SNIP/GraSP on
  ``pai_per_class`` training examples per class), then trained for ``epochs`` epochs with the
  masks applied. Every ``nn.Linear`` and ``nn.Conv2d`` is pruned, the output layer included; a
  butterfly head layer is structured already and is not pruned.
* **Post-training** (``dsf``, ``sparsegpt``, ``wanda``, ``post-magnitude``): the trained dense
  model is compressed one-shot by :func:`~sparsefact.nn_adapters.compress_model` (layer by
  layer, sequential calibration on ``calib_size`` training images, every ``nn.Linear`` and
  ``nn.Conv2d`` at the same density — the output layer too), evaluated (``accuracy_oneshot``),
  then fine-tuned for ``finetune_epochs`` epochs with the masks fixed (for DSF both factors
  are trained, see :mod:`~sparsefact.experiments.training`). A method that cannot reach a
  density on some layer (DSF below its minimum density) is recorded as ``not run`` with the
  reason, never replaced by something else.
* **Structured networks** (``butterfly``, ``monarch``): the MLP with every layer but the output
  layer a ``ButterflyLinear`` (one fixed density) or a ``MonarchLinear`` (block count chosen
  from each target density by :func:`~sparsefact.structured.monarch_blocks_for_density` for
  the ``width x width`` layers), trained from scratch. Convolutions have no such form here,
  so for the CNN these rows are ``not run``.

Every finished network is measured in its inference form: pruned layers as
:class:`~sparsefact.nn_adapters.SparseLinear` / ``SparseConv2d``, DSF layers as
``DoubleSparseLinear`` / ``DoubleSparseConv2d`` (``layout="auto"``: CSR for factors of density
``<= 0.05`` with at least 65 536 entries, dense otherwise). A row reports top-1 test accuracy,
the kept fraction over the pruned layers (``density``) and per layer, stored parameters
(kept weights, biases, BatchNorm and structured parameters), multiply-accumulates per example
(kept weights times the positions each layer is applied at), CPU inference time per batch
(median), and layer collapse (a layer keeping no weight).

:func:`run_networks` runs it and returns a dict; :func:`write_outputs` writes ``results.json``,
``results.md`` and the figures; :func:`add_arguments` / :func:`run_from_args` are the command
line (``sparsefact networks``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .names import DATASETS, MODEL_NAMES, model_spec

__all__ = [
    "DENSITIES",
    "METHODS",
    "PAI_METHODS",
    "POST_METHODS",
    "QUICK",
    "STRUCTURED_METHODS",
    "STUDY_EXPONENTS",
    "NetworkSettings",
    "add_arguments",
    "expected_rows",
    "run_from_args",
    "run_networks",
    "write_outputs",
]

#: Pruning-at-initialisation scorers (prune, then train).
PAI_METHODS = ("random", "magnitude", "snip", "grasp", "synflow")
#: Post-training methods: name here -> registry name of ``compress_model``.
POST_METHODS = {"dsf": "dsf", "sparsegpt": "sparsegpt", "wanda": "wanda", "post-magnitude": "magnitude"}
#: Whole networks of structured layers (trained from scratch).
STRUCTURED_METHODS = ("butterfly", "monarch")
METHODS = (*PAI_METHODS, *POST_METHODS, *STRUCTURED_METHODS)
#: The study's compression exponents ``k`` (density ``10^-k``).
STUDY_EXPONENTS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
DENSITIES = tuple(10.0 ** -k for k in STUDY_EXPONENTS)

_LABELS = {
    "dense": "dense", "dense-ft": "dense + fine-tuning (no pruning)", "random": "random (PaI)",
    "magnitude": "magnitude (PaI)", "snip": "SNIP (PaI)",
    "grasp": "GraSP (PaI)", "synflow": "SynFlow (PaI)", "dsf": "DSF (post)", "sparsegpt": "SparseGPT (post)",
    "wanda": "Wanda (post)", "post-magnitude": "magnitude (post)", "butterfly": "butterfly net",
    "monarch": "Monarch net",
}
_CNN_STRUCTURED = ("convolutions have no butterfly/Monarch layer in sparsefact; the CNN with a butterfly "
                   "head layer is the model cnn-butterfly")


@dataclass
class NetworkSettings:
    """Everything that defines a run (defaults: the full experiment; :data:`QUICK` overrides).

    Attributes
    ----------
    dataset : {"auto", "fashion-mnist", "digits"}
    models : model names (:data:`~sparsefact.experiments.models.MODEL_NAMES`)
    methods : method names (:data:`METHODS`); ``dense`` always runs
    densities : kept fractions, default ``10^-k`` for the study's ``k``
    epochs : training epochs of every network trained from scratch (dense, PaI, structured)
    finetune_epochs : fine-tuning epochs after post-training compression (0: none)
    train_size, test_size : examples used (a fixed random subset; ``None``: all)
    batch_size, lr, finetune_lr : Adam training
    calib_size : training images used as calibration data of the post-training methods
    pai_per_class : training examples per class given to SNIP and GraSP
    synflow_rounds : SynFlow's iterative rounds (the study: 100)
    width, depth : the MLP
    channels, hidden : the CNN's stages and head width
    dsf_max_iter : DSF outer iterations
    time_batch, time_repeats : inference timing (images per batch, median of repeats)
    seed : initialisation, data subset and batch order
    threads : torch (and DSF's Numba/BLAS) threads, ``None``: leave as is
    """

    dataset: str = "auto"
    models: tuple[str, ...] = MODEL_NAMES
    methods: tuple[str, ...] = METHODS
    densities: tuple[float, ...] = DENSITIES
    epochs: int = 3
    finetune_epochs: int = 1
    train_size: int | None = 8000
    test_size: int | None = 5000
    batch_size: int = 128
    lr: float = 3e-3
    finetune_lr: float = 1e-3
    calib_size: int = 512
    pai_per_class: int = 10
    synflow_rounds: int = 100
    width: int = 100
    depth: int = 6
    channels: tuple[tuple[int, ...], ...] = ((8,), (16,), (32,))
    hidden: int = 64
    dsf_max_iter: int = 40
    time_batch: int = 256
    time_repeats: int = 10
    seed: int = 0
    threads: int | None = 1
    quick: bool = False

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        self.methods = tuple(self.methods)
        self.densities = tuple(float(d) for d in self.densities)
        self.channels = tuple(tuple(int(c) for c in stage) for stage in self.channels)
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        for m in self.models:
            model_spec(m)
        unknown = [m for m in self.methods if m not in METHODS and m != "dense"]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        self.methods = tuple(m for m in self.methods if m != "dense")
        if not self.models:
            raise ValueError("no models selected")
        for d in self.densities:
            if not 0.0 < d <= 1.0:
                raise ValueError(f"densities must be in (0, 1], got {d}")
        for name in ("epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("batch_size", "calib_size", "pai_per_class", "synflow_rounds", "width", "depth",
                     "hidden", "time_batch", "time_repeats", "dsf_max_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = [list(s) for s in self.channels]
        return d


#: The reduced run of ``--quick`` (and of the test suite): digits, two tiny models (one of each
#: architecture, one of each head), two densities, one epoch, a few methods of each kind.
QUICK: dict[str, Any] = {
    "dataset": "digits",
    "models": ("mlp", "cnn-butterfly"),
    "batch_size": 64,
    "methods": ("synflow", "snip", "dsf", "wanda", "butterfly", "monarch"),
    "densities": (10.0 ** -0.5, 10.0 ** -1),
    "epochs": 1,
    "finetune_epochs": 1,
    "train_size": None,
    "calib_size": 256,
    "width": 32,
    "test_size": None,
    "channels": ((4,), (8,)),
    "hidden": 16,
    "dsf_max_iter": 10,
    "time_batch": 64,
    "time_repeats": 3,
}


# ---------------------------------------------------------------------- helpers
def _fmt_density(d: float | None) -> str:
    """``10^-k (value)`` when ``d`` is a power of ten of a short exponent, else the value."""
    if d is None:
        return "—"
    k = -math.log10(d)
    if abs(k * 100 - round(k * 100)) < 1e-6 and k > 0:
        return f"10^-{round(k, 2):g} ({d:.3g})"
    return f"{d:.3g}"


def _row(model_name: str, method: str, stage: str, target: float | None, **fields: Any) -> dict[str, Any]:
    arch, head = model_spec(model_name)
    row = {"model": model_name, "arch": arch, "head": head, "method": method, "label": _LABELS[method],
           "stage": stage, "target_density": target, "status": "ok", "reason": ""}
    row.update(fields)
    return row


def _not_run(model_name: str, method: str, stage: str, target: float | None, reason: str) -> dict[str, Any]:
    return _row(model_name, method, stage, target, status="not run", reason=reason)


def _wants_dense_ft(settings: NetworkSettings) -> bool:
    return settings.finetune_epochs > 0 and any(m in POST_METHODS for m in settings.methods)


def expected_rows(settings: NetworkSettings) -> list[tuple[str, str, float | None]]:
    """``(model, method, target density)`` of every row a run with ``settings`` produces, in order.

    One ``dense`` row per model, followed (when post-training methods are fine-tuned) by a
    ``dense-ft`` row: the dense model trained for the fine-tuning epochs more, unpruned, i.e.
    the training budget of the post-training rows without compression; one row per (PaI or
    post-training method, density); for the first selected model of each architecture, one
    ``butterfly`` row (target ``None``: its density is fixed by the structure) and one
    ``monarch`` row per density.
    """
    rows: list[tuple[str, str, float | None]] = []
    seen_arch: set[str] = set()
    for model in settings.models:
        rows.append((model, "dense", 1.0))
        if _wants_dense_ft(settings):
            rows.append((model, "dense-ft", 1.0))
        for method in settings.methods:
            if method in PAI_METHODS or method in POST_METHODS:
                rows.extend((model, method, d) for d in settings.densities)
        arch, _ = model_spec(model)
        if arch in seen_arch:
            continue
        seen_arch.add(arch)
        if "butterfly" in settings.methods:
            rows.append((model, "butterfly", None))
        if "monarch" in settings.methods:
            rows.extend((model, "monarch", d) for d in settings.densities)
    return rows


def run_networks(
    output_dir: str | Path | None = None,
    *,
    quick: bool = False,
    verbose: bool = True,
    figures: bool = True,
    log: Callable[[str], None] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Run the network experiment and return its results (and write them if ``output_dir``).

    Parameters
    ----------
    output_dir : path, optional
        Where ``results.json``, ``results.md`` and the figures go (``results.json`` is rewritten
        after every row, so a stopped run leaves its finished rows).
    quick : bool
        Start from :data:`QUICK` (digits, tiny models, two densities, one epoch, few methods);
        explicit ``settings`` still override it.
    verbose : bool
        Print one line per run (to ``log``, default ``print``).
    figures : bool
        Also draw the figures (needs matplotlib).
    **settings
        Fields of :class:`NetworkSettings` (``dataset``, ``models``, ``methods``, ``densities``,
        ``epochs``, ``finetune_epochs``, ``seed``, ``threads``, ...).

    Returns
    -------
    dict
        ``{"settings", "dataset", "rows", "seconds", "environment", "complete", "files"}``;
        ``rows`` follow :func:`expected_rows` (``status`` ``"ok"``, ``"not run"`` or ``"failed"``).
    """
    unknown = set(settings) - {f.name for f in dataclasses.fields(NetworkSettings)}
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    base = dict(QUICK) if quick else {}
    base.update({k: v for k, v in settings.items() if v is not None})
    cfg = NetworkSettings(quick=quick, **{k: v for k, v in base.items() if k != "quick"})
    say = (log or print) if verbose else (lambda _msg: None)
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "settings": cfg.to_dict(),
        "environment": {"python": platform.python_version(), "machine": platform.machine(),
                        "threads": cfg.threads},
        "rows": [],
        "complete": False,
        "files": {},
    }
    out = None if output_dir is None else Path(output_dir)

    def on_row(row: dict[str, Any]) -> None:
        result["seconds"] = time.perf_counter() - t_start
        if out is not None:
            _write_json(result, out)

    from .runs import execute

    execute(cfg, say, on_row, result)
    result["seconds"] = time.perf_counter() - t_start
    result["complete"] = True
    if out is not None:
        result["files"] = write_outputs(result, out, figures=figures)
    rows = result["rows"]
    say(f"done in {result['seconds']:.0f} s: {sum(r['status'] == 'ok' for r in rows)} runs, "
        f"{sum(r['status'] == 'not run' for r in rows)} not run, "
        f"{sum(r['status'] == 'failed' for r in rows)} failed")
    return result


# ---------------------------------------------------------------------- outputs
def _write_json(result: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    tmp.replace(path)
    return path


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if row["status"] == "not run":
        return "not run"
    if row["status"] != "ok":
        return "failed"
    text = f"{100 * row['accuracy']:.1f}"
    if row.get("accuracy_oneshot") is not None and row.get("finetuned"):
        text += f" ({100 * row['accuracy_oneshot']:.1f})"
    if row.get("layer_collapse"):
        text += " †"
    return text


def format_markdown(result: dict[str, Any]) -> str:
    """The results as markdown: per model, an accuracy table (methods x densities) and the details."""
    s = result["settings"]
    rows = result["rows"]
    ds = result.get("dataset", {})
    lines = [
        "# Network experiment: pruning at initialisation vs post-training DSF and peers",
        "",
        f"Data: {ds.get('description', '?')}." + (f" **{ds['note']}.**" if ds.get("note") else ""),
        f"Settings: {s['epochs']} training epoch(s) (Adam, lr {s['lr']:g}, batch {s['batch_size']}), "
        f"post-training fine-tuning {s['finetune_epochs']} epoch(s) (lr {s['finetune_lr']:g}), "
        f"calibration {s['calib_size']} images, SynFlow {s['synflow_rounds']} rounds, "
        f"seed {s['seed']}, {s['threads']} thread(s)" + (", **quick run**" if s.get("quick") else "") + ".",
        f"Run time: {result.get('seconds', 0.0):.0f} s"
        + ("" if result.get("complete") else " (incomplete)") + ".",
        "",
        "Cells: top-1 test accuracy (%); post-training methods: after fine-tuning, one-shot in parentheses; "
        "† = layer collapse (some layer keeps no weight); *not run* = the method cannot reach that density "
        "(reason below). Density: kept fraction of the weights of the pruned layers (every nn.Linear and "
        "nn.Conv2d, the output layer included; a butterfly head layer is never pruned); for the "
        "structured networks, parameters over the dense weights of all their layers.",
    ]
    notes: dict[str, str] = {}
    for model in s["models"]:
        mrows = [r for r in rows if r["model"] == model]
        if not mrows:
            continue
        dense = next((r for r in mrows if r["method"] == "dense"), None)
        lines += ["", f"## {model}", ""]
        if dense is not None and dense["status"] == "ok":
            lines.append(f"Dense: {100 * dense['accuracy']:.2f} % with {dense['params']:,} parameters, "
                         f"{dense['macs']:,.0f} MACs per image, {dense['inference_ms']:.2f} ms per batch of "
                         f"{s['time_batch']}.")
            ft = next((r for r in mrows if r["method"] == "dense-ft" and r["status"] == "ok"), None)
            if ft is not None:
                lines.append(f"Dense + {s['finetune_epochs']} fine-tuning epoch(s), unpruned (the training "
                             f"budget of the post-training rows): {100 * ft['accuracy']:.2f} %.")
            lines.append("")
        header = "| method | " + " | ".join(_fmt_density(d) for d in s["densities"]) + " |"
        lines += [header, "|---|" + "---:|" * len(s["densities"])]
        methods = [m for m in s["methods"] if m in PAI_METHODS or m in POST_METHODS or m == "monarch"]
        for method in methods:
            by_d = {r["target_density"]: r for r in mrows if r["method"] == method}
            if not by_d:
                continue
            cells = " | ".join(_cell(by_d.get(d)) for d in s["densities"])
            lines.append(f"| {_LABELS[method]} | {cells} |")
            for r in by_d.values():
                if r["status"] != "ok" and r["reason"]:
                    notes.setdefault(r["reason"], f"{model} {method} {_fmt_density(r['target_density'])}")
        for r in mrows:
            if r["method"] == "butterfly":
                lines.append(f"\nButterfly network: {_cell(r)}"
                             + (f" at density {r['density_all']:.4f} ({r['params']:,} parameters)"
                                if r["status"] == "ok" else f": {r['reason']}"))
        lines += ["", "<details><summary>details</summary>", "",
                  "| method | target | density | params | MACs / image | ms / batch | collapse | seconds |",
                  "|---|---:|---:|---:|---:|---:|---|---:|"]
        for r in mrows:
            if r["status"] != "ok":
                continue
            dens = r["density_all"] if r["stage"] == "structured" else r["density"]
            lines.append(
                f"| {r['label']} | {_fmt_density(r['target_density'])} | {dens:.4f} | "
                f"{r['params']:,} | {r['macs']:,.0f} | {r['inference_ms']:.2f} | "
                f"{', '.join(r['collapsed_layers']) if r['layer_collapse'] else ''} | "
                f"{r['seconds']['total']:.1f} |")
        lines += ["", "</details>"]
    if notes:
        lines += ["", "## Not run / failed", ""]
        for reason, where in notes.items():
            lines.append(f"- {where} (and the same reason elsewhere): {reason}")
    return "\n".join(lines) + "\n"


#: One colour and marker per method, the same in every panel and figure.
_COLORS = dict(zip(METHODS, ("#7f7f7f", "#bcbd22", "#ff7f0e", "#9467bd", "#1f77b4", "#2ca02c", "#d62728",
                             "#e377c2", "#8c564b", "#17becf", "#000000"), strict=True))
_MARKERS = dict(zip(METHODS, "os^vDPXh*<>", strict=True))


def _plot_accuracy(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    models = [m for m in s["models"] if any(r["model"] == m for r in result["rows"])]
    arch_rows = {}
    for r in result["rows"]:
        if r["stage"] == "structured" and r["status"] == "ok":
            arch_rows.setdefault(r["arch"], []).append(r)
    ncols = min(2, len(models))
    nrows = -(-len(models) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.3 * nrows), squeeze=False)
    styles = {m: ("-" if m in PAI_METHODS else "--") for m in METHODS}
    for ax, model in zip(axes.flat, models, strict=False):
        mrows = [r for r in result["rows"] if r["model"] == model and r["status"] == "ok"]
        dense = next((r for r in mrows if r["method"] == "dense"), None)
        for method in s["methods"]:
            if method in STRUCTURED_METHODS:
                continue
            pts = sorted((r["density"], r["accuracy"]) for r in mrows if r["method"] == method)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], styles[method],
                        marker=_MARKERS[method], color=_COLORS[method], label=_LABELS[method], ms=4)
        for r in arch_rows.get(model_spec(model)[0], []):
            ax.plot([r["density_all"]], [100 * r["accuracy"]], _MARKERS[r["method"]],
                    color=_COLORS[r["method"]], ms=7, label=_LABELS[r["method"]])
        if dense is not None:
            ax.axhline(100 * dense["accuracy"], color="grey", lw=1, ls=":", label="dense")
        ft = next((r for r in mrows if r["method"] == "dense-ft"), None)
        if ft is not None:
            ax.axhline(100 * ft["accuracy"], color="grey", lw=1, ls="--", label="dense + fine-tuning")
        ax.set_xscale("log")
        ax.set_xlabel("kept fraction of the pruned layers' weights")
        ax.set_ylabel("top-1 test accuracy (%)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=False))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="best")
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.suptitle(f"Accuracy vs density ({result.get('dataset', {}).get('name', '?')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_layers(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    models = [m for m in s["models"] if any(r["model"] == m for r in result["rows"])]
    dens = sorted(s["densities"])[:2]
    fig, axes = plt.subplots(len(models), len(dens), figsize=(6.2 * len(dens), 3.6 * len(models)),
                             squeeze=False)
    for i, model in enumerate(models):
        for j, d in enumerate(dens):
            ax = axes[i, j]
            names: list[str] = []
            for r in result["rows"]:
                if r["model"] != model or r["status"] != "ok" or r["target_density"] != d:
                    continue
                layers = r["layers"]
                names = [lay["name"] for lay in layers]
                y = [max(lay["kept_fraction"], 1e-5) for lay in layers]
                ax.plot(range(len(y)), y, "-" if r["stage"] == "pai" else "--", marker=_MARKERS[r["method"]],
                        color=_COLORS[r["method"]], ms=4, label=_LABELS[r["method"]])
            ax.axhline(d, color="grey", lw=1, ls=":")
            ax.set_yscale("log")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([n.split(".")[-1] for n in names], rotation=45, fontsize=7)
            ax.set_ylabel("kept fraction")
            ax.set_title(f"{model}, target {_fmt_density(d)}", fontsize=9)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=6)
    fig.suptitle("Per-layer kept fraction (1e-5 = collapsed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], output_dir: str | Path, *, figures: bool = True) -> dict[str, str]:
    """Write ``results.json``, ``results.md`` and (``figures``) ``accuracy_vs_density.png`` and
    ``layer_density.png`` into ``output_dir``; return ``{kind: path}``."""
    out = Path(output_dir)
    files = {"json": str(out / "results.json"), "markdown": str(out / "results.md")}
    if figures:
        files["accuracy_figure"] = str(out / "accuracy_vs_density.png")
        files["layer_figure"] = str(out / "layer_density.png")
    result["files"] = files
    _write_json(result, out)
    (out / "results.md").write_text(format_markdown(result))
    if figures:
        _plot_accuracy(result, out / "accuracy_vs_density.png")
        _plot_layers(result, out / "layer_density.png")
    return files


# ---------------------------------------------------------------------- command line
def _density_value(text: str) -> float:
    """``0.1``, ``1e-2`` or ``10^-0.5``."""
    text = text.strip()
    m = re.fullmatch(r"10\^(-?[0-9.]+)", text)
    try:
        value = 10.0 ** float(m.group(1)) if m else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a density: {text!r} (e.g. 0.1, 1e-2 or 10^-0.5)") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text!r}")
    return value


def _list_of(choices: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or text!r}; choose from "
                                             f"{', '.join(choices)}")
        return items
    return parse


def _densities(text: str) -> tuple[float, ...]:
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one density")
    return tuple(_density_value(t) for t in items)


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _pos_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``sparsefact networks`` to ``parser`` (returned)."""
    parser.add_argument("--quick", action="store_true",
                        help="reduced run: digits, two tiny models, 2 densities, 1 epoch, a few methods")
    parser.add_argument("--dataset", choices=list(DATASETS), default=None,
                        help="auto (default): Fashion-MNIST from the Debian package if installed, else "
                        "scikit-learn's digits; --quick defaults to digits")
    parser.add_argument("--models", type=_list_of(MODEL_NAMES, "model"), default=None, metavar="M1,M2",
                        help=f"models (default all: {','.join(MODEL_NAMES)})")
    parser.add_argument("--methods", type=_list_of((*METHODS, "dense"), "method"), default=None,
                        metavar="M1,M2",
                        help=f"methods (default all: {','.join(METHODS)}; dense always runs)")
    parser.add_argument("--densities", type=_densities, default=None, metavar="D1,D2",
                        help="kept fractions, e.g. 0.1,10^-2 (default 10^-k for k in 0.05,0.1,0.2,0.5,1,2)")
    parser.add_argument("--epochs", type=_nonneg_int, default=None,
                        help=f"training epochs (default {NetworkSettings.epochs}; --quick 1)")
    parser.add_argument("--finetune-epochs", type=_nonneg_int, default=None,
                        help=f"fine-tuning epochs after post-training compression, masks fixed "
                        f"(default {NetworkSettings.finetune_epochs}; 0: none)")
    parser.add_argument("--train-size", type=_pos_int, default=None,
                        help=f"training images used (default {NetworkSettings.train_size}; --quick: all)")
    parser.add_argument("--test-size", type=_pos_int, default=None, help="test images used (default all)")
    parser.add_argument("--output-dir", type=Path, default=Path("sparsefact-networks-out"),
                        help="where results.json, results.md and the figures go "
                        "(default sparsefact-networks-out)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    parser.add_argument("--threads", type=_pos_int, default=None,
                        help="torch / Numba / BLAS threads (default 1: most predictable on a busy machine)")
    parser.add_argument("--no-figures", dest="figures", action="store_false", help="skip the figures")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``sparsefact networks`` from parsed arguments; 0 when every run finished or was
    documented as not runnable, 1 when some run failed, 2 for bad settings."""
    settings = {
        "dataset": args.dataset, "models": args.models, "methods": args.methods, "densities": args.densities,
        "epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "train_size": args.train_size,
        "test_size": args.test_size, "seed": args.seed, "threads": args.threads,
    }
    try:
        result = run_networks(args.output_dir, quick=args.quick, verbose=not getattr(args, "quiet", False),
                              figures=getattr(args, "figures", True), **settings)
    except (ValueError, FileNotFoundError) as exc:
        print(f"sparsefact networks: error: {exc}")
        return 2
    ds = result["dataset"]
    print(f"dataset: {ds['name']}" + (f" ({ds['note']})" if ds["note"] else ""))
    for kind, path in result["files"].items():
        print(f"{kind}: {path}")
    return 1 if any(r["status"] == "failed" for r in result["rows"]) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sparsefact.experiments.networks``: the same options as ``sparsefact networks``."""
    parser = argparse.ArgumentParser(prog="sparsefact networks", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
