"""Capture calibration Grams of a torch model's layers with forward hooks.

Each target layer ``y = W x`` gets a float64 Gram ``G = X^T X`` of its inputs ``X``
(one row per token, or per output position of a convolution) -- or, with
``statistic="diag"``, only its diagonal -- accumulated while
calibration batches stream through the model; :meth:`ActivationCapture.calibrations`
returns them as :class:`sparsefact.Calibration` objects, ready for
``estimator.fit(W, calibration=...)``.

Supported layers and their ``W``:

* ``nn.Linear``: ``W = weight`` (out x in); rows of ``X`` are the input's last axis.
* ``nn.Conv2d`` (``groups=1``): ``W = weight.flatten(1)`` (out x in*kh*kw); ``X`` is the
  im2col unfolding of the input (``torch.nn.functional.unfold`` with the layer's
  kernel size, dilation, padding and stride, after the layer's own padding mode), so
  the columns of ``X`` are in ``weight.flatten(1)`` order (channel, then kernel row,
  then kernel column).
* transformers' ``Conv1D`` (GPT-2 style, weight stored in x out): ``W = weight.T``.

Padding tokens: when an attention mask is active, rows of ``X`` belonging to padded
positions are left out. The mask reaches the hooks through a context variable:
:func:`token_mask` (``with token_mask(batch["attention_mask"]): model(**batch)``) sets
it, and :meth:`ActivationCapture.run` sets it automatically for every dict batch that
has an ``"attention_mask"`` entry. A hook applies the current mask (shape
``(batch, tokens)``, nonzero = real token) when the leading axes of the layer's input
equal the mask's shape, i.e. the input is ``(batch, tokens, features)``; inputs of
another shape (convolutions, layers that see pooled vectors) are taken whole.

Speed: the Gram is a GEMM per batch. Inputs in float32 (or float16/bfloat16) are multiplied
in float32 -- about twice the float64 rate -- in chunks of :data:`GRAM_CHUNK_ROWS` rows (after
an exact power-of-two scaling of batches of extreme magnitude, so that neither overflow nor
underflow can happen), and every chunk's product is added to the float64 accumulator. The
relative rounding of a chunk's product is typically ``sqrt(GRAM_CHUNK_ROWS) * 2**-24`` (~5e-6),
far below the sampling noise of any calibration set. Float64 inputs keep the float64 product (bit for bit as
before). :attr:`ActivationCapture.seconds` gives the time spent in each layer's hook
(unfolding, masking and accumulation); ``compress_model`` reports it per layer
(``capture_seconds``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf

from ..calibration import Calibration

__all__ = [
    "GRAM_CHUNK_ROWS",
    "ActivationCapture",
    "HEAD_PATTERN",
    "capture_calibrations",
    "is_supported_layer",
    "iter_batches",
    "layer_matrix",
    "run_batch",
    "select_layers",
    "token_mask",
]

#: Names of output heads, skipped by the default layer selection (matched with
#: ``re.search`` against the full dotted name).
HEAD_PATTERN = (
    r"(^|\.)(lm_head|classifier|head|heads|score|qa_outputs|embed_out|output_projection|pooler)(\.|$)"
)

#: Rows per float32 product when a low-precision batch's Gram is accumulated (see the module docstring).
GRAM_CHUNK_ROWS = 8192
_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)

_CURRENT_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "sparsefact_token_mask", default=None
)


@contextlib.contextmanager
def token_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Make ``mask`` (``(batch, tokens)``, nonzero = real token) the current token mask.

    Forward hooks of an :class:`ActivationCapture` drop the rows of padded tokens while
    the context is active. ``None`` clears the mask.
    """
    token = _CURRENT_MASK.set(None if mask is None else mask.detach().to(torch.bool))
    try:
        yield
    finally:
        _CURRENT_MASK.reset(token)


def _is_hf_conv1d(module: nn.Module) -> bool:
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and getattr(module, "weight", None) is not None
    )


def is_supported_layer(module: nn.Module) -> bool:
    """Whether :class:`ActivationCapture` can capture (and ``compress_model`` replace) ``module``."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return _is_hf_conv1d(module)


def layer_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the matrix ``W`` (out x in) that its calibration Gram matches."""
    weight = module.weight.detach()
    if isinstance(module, nn.Linear):
        return weight
    if isinstance(module, nn.Conv2d):
        return weight.flatten(1)
    if _is_hf_conv1d(module):
        return weight.T
    raise TypeError(f"unsupported layer type {type(module).__name__}")


def select_layers(
    model: nn.Module,
    layers: Any = None,
    *,
    prefix: str = "",
    skip_heads: bool = True,
) -> list[str]:
    """Names (as in ``model.named_modules()``) of the layers to capture or compress.

    Parameters
    ----------
    model : nn.Module
    layers : None, str, sequence of str, type, tuple of types, or callable
        ``None``: every supported layer (``nn.Linear``, ``nn.Conv2d`` with ``groups=1``,
        transformers ``Conv1D``) except output heads (:data:`HEAD_PATTERN`, e.g.
        ``lm_head``, ``classifier``, ``pooler``) when ``skip_heads``. Embeddings are
        never selected (they are not linear layers of inputs). A ``str``: a regular
        expression searched in each supported layer's name. A list of names: exactly
        those layers (``KeyError`` for a name that is not a supported layer). A type or
        tuple of types: supported layers of those types. A callable ``f(name, module)``:
        supported layers for which it returns true.
    prefix : str
        Prepended (with a dot) to the returned names, e.g. a block's path.
    skip_heads : bool
        Whether ``layers=None`` leaves out output heads.
    """
    candidates = [(name, mod) for name, mod in model.named_modules() if name and is_supported_layer(mod)]
    if layers is None:
        chosen = [n for n, _ in candidates if not (skip_heads and re.search(HEAD_PATTERN, n))]
    elif isinstance(layers, str):
        pattern = re.compile(layers)
        chosen = [n for n, _ in candidates if pattern.search(n) or pattern.search(_join(prefix, n))]
    elif isinstance(layers, type) or (
        isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)
    ):
        chosen = [n for n, m in candidates if isinstance(m, layers)]
    elif callable(layers):
        chosen = [n for n, m in candidates if layers(_join(prefix, n), m)]
    elif isinstance(layers, Sequence):
        known = {n for n, _ in candidates}
        chosen = []
        for raw in layers:
            name = raw[len(prefix) + 1 :] if prefix and raw.startswith(prefix + ".") else raw
            if name not in known:
                raise KeyError(
                    f"{raw!r} is not a supported layer of the model (Linear, Conv2d with groups=1, "
                    f"Conv1D); supported layers: {sorted(known)[:20]}"
                )
            chosen.append(name)
    else:
        raise TypeError(f"layers must be None, a regex, a list of names, types or a callable, got {layers!r}")
    return [_join(prefix, n) for n in chosen]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _conv_columns(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col of a Conv2d input: rows = output positions, columns in weight.flatten(1) order."""
    if x.dim() == 3:  # unbatched (C, H, W)
        x = x.unsqueeze(0)
    padding: Any = module.padding
    if module.padding_mode != "zeros":
        x = nnf.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    elif isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same" (stride 1): pad like F.conv2d does, possibly asymmetrically
            pads = []
            for d, k in zip(reversed(module.dilation), reversed(module.kernel_size), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = nnf.pad(x, pads)
            padding = 0
    cols = nnf.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _float32_gram(x: torch.Tensor) -> torch.Tensor | None:
    """``x^T x`` in float64 from float32 products (row chunks; power-of-two scaling if needed).

    A batch whose largest magnitude lies in ``[2**-40, 2**40]`` is multiplied as it is (a sum
    of ``GRAM_CHUNK_ROWS`` squares stays below ``2**93``, far from float32's ``2**128``); any
    other batch is first scaled by an exact power of two so that neither overflow nor underflow
    can happen. ``None`` when ``x`` holds a non-finite value (the caller then takes the float64
    path, which carries the inf/NaN into the Gram, where the fit's validation reports it).
    """
    x32 = x.to(torch.float32)
    amax = float(x32.abs().max())
    if not math.isfinite(amax):
        return None
    n = x32.shape[1]
    if amax == 0.0:
        return torch.zeros(n, n, dtype=torch.float64, device=x.device)
    exponent = 0 if 2.0**-40 <= amax <= 2.0**40 else math.frexp(amax)[1]
    scale = math.ldexp(1.0, -exponent)
    out = None
    for start in range(0, x32.shape[0], GRAM_CHUNK_ROWS):
        chunk = x32[start : start + GRAM_CHUNK_ROWS]
        if exponent:
            chunk = chunk * scale
        product = (chunk.T @ chunk).to(torch.float64)
        out = product if out is None else out.add_(product)
    return out if not exponent else out * math.ldexp(1.0, 2 * exponent)


class _GramAccumulator:
    """Float64 sum of ``x xᵀ`` (``statistic="gram"``) or of ``x²`` per feature (``"diag"``) over rows.

    Float32 / float16 / bfloat16 rows are multiplied in float32 (:func:`_float32_gram`); float64
    rows in float64.
    """

    __slots__ = ("gram", "n_tokens", "seconds", "statistic")

    def __init__(self, statistic: str = "gram") -> None:
        self.statistic = statistic
        self.gram: torch.Tensor | None = None
        self.n_tokens = 0
        self.seconds = 0.0

    def add(self, rows: torch.Tensor) -> None:
        if rows.shape[0] == 0:
            return
        rows = rows.detach()
        contribution = None
        if self.statistic == "diag":
            x64 = rows.to(torch.float64)
            contribution = (x64 * x64).sum(0)
        elif rows.dtype in _LOW_PRECISION:
            contribution = _float32_gram(rows)
        if contribution is None:
            x64 = rows.to(torch.float64)
            contribution = x64.T @ x64
        if self.gram is None:
            self.gram = contribution
        else:
            self.gram += contribution
        self.n_tokens += int(rows.shape[0])


def _real_token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The ``(rows, features)`` of a layer input ``x`` that belong to real (unpadded) tokens.

    ``mask`` is the batch's ``(batch, tokens)`` token mask (or None: every row). A
    ``(batch, tokens, features)`` input is masked directly; a ``(batch * tokens, features)``
    input -- decoders such as OPT flatten the tokens before their MLP -- by the row-major
    flattened mask. Any other shape is taken whole.
    """
    if mask is not None and x.dim() >= 2:
        mask = mask.to(x.device)
        if tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask]
        if x.dim() == 2 and mask.dim() == 2 and x.shape[0] == mask.numel() and mask.shape[1] > 1:
            return x[mask.reshape(-1)]
    return x.reshape(-1, x.shape[-1])


class ActivationCapture:
    """Forward hooks that accumulate a float64 input Gram (or only its diagonal) for each target layer.

    Use it as a context manager: the hooks are registered on entry and always removed
    on exit, also when the forward pass raises::

        with ActivationCapture(model, layers=r"encoder\\.layer\\.0\\.") as cap:
            cap.run(batches)               # or call the model yourself
        cals = cap.calibrations()          # {layer name: Calibration}

    Parameters
    ----------
    model : nn.Module
    layers : see :func:`select_layers`
        Which layers to hook (default: all supported layers except output heads).
    names : list of str, optional
        Exact layer names; overrides ``layers`` (used by ``compress_model``).
    statistic : {"gram", "diag"}, default="gram"
        Accumulate the full Gram ``X^T X`` (n x n float64 per layer), or only its diagonal
        (``sum_t X_tj^2``: n numbers per layer), enough for methods that use only the input
        norms (Wanda, magnitude pruning); :meth:`calibration` then returns a diagonal-only
        :class:`~sparsefact.Calibration` (``Calibration.from_diag``).

    Attributes
    ----------
    names : list of str
        The hooked layers.
    n_tokens : dict
        Rows accumulated per layer so far.
    """

    def __init__(self, model: nn.Module, layers: Any = None, *, names: Sequence[str] | None = None,
                 statistic: str = "gram") -> None:
        if statistic not in ("gram", "diag"):
            raise ValueError(f"statistic must be 'gram' or 'diag', got {statistic!r}")
        self.statistic = statistic
        self.model = model
        self.names = list(names) if names is not None else select_layers(model, layers)
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(f"no such modules in the model: {missing}")
        self._modules = {n: modules[n] for n in self.names}
        for name, module in self._modules.items():
            if not is_supported_layer(module):
                raise TypeError(f"{name}: unsupported layer type {type(module).__name__}")
        self._acc = {n: _GramAccumulator(statistic) for n in self.names}
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ hooks
    def _hook(self, name: str) -> Callable[..., None]:
        module = self._modules[name]
        acc = self._acc[name]

        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            start = time.perf_counter()
            x = args[0]
            if isinstance(module, nn.Conv2d):
                acc.add(_conv_columns(module, x))
            else:
                acc.add(_real_token_rows(x, _CURRENT_MASK.get()))
            acc.seconds += time.perf_counter() - start

        return hook

    def __enter__(self) -> ActivationCapture:
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def run(
        self, data: Any, *, device: Any = None, forward: Callable[[nn.Module, Any], Any] | None = None
    ) -> None:
        """Stream ``data`` through the model (no grad), each batch as :func:`run_batch` does."""
        for batch in iter_batches(data):
            run_batch(self.model, batch, device=device, forward=forward)

    @property
    def n_tokens(self) -> dict[str, int]:
        return {n: a.n_tokens for n, a in self._acc.items()}

    @property
    def seconds(self) -> dict[str, float]:
        """Wall seconds spent in each layer's hook (im2col, token mask, Gram accumulation)."""
        return {n: a.seconds for n, a in self._acc.items()}

    def _accumulated(self, name: str) -> torch.Tensor:
        value = self._acc[name].gram
        if value is None:
            raise ValueError(f"no activations reached layer {name!r}: was it called during the forward pass?")
        return value

    def gram(self, name: str) -> torch.Tensor:
        """The float64 Gram accumulated for layer ``name`` (a torch tensor, on the activations' device).

        Raises ``ValueError`` when only the diagonal was accumulated (``statistic="diag"``).
        """
        if self.statistic == "diag":
            raise ValueError(
                "this capture accumulated only the Gram's diagonal (statistic='diag'); use diag(), or "
                "ActivationCapture(..., statistic='gram') for the full Gram"
            )
        return self._accumulated(name)

    def diag(self, name: str) -> torch.Tensor:
        """The diagonal of layer ``name``'s Gram (float64, ``sum_t X_tj^2``), for either statistic."""
        value = self._accumulated(name)
        return value if self.statistic == "diag" else torch.diagonal(value)

    def calibration(self, name: str) -> Calibration:
        """Layer ``name``'s statistic as a :class:`~sparsefact.Calibration` (NumPy float64).

        The full Gram (``Calibration.from_gram``) or, with ``statistic="diag"``, a diagonal-only
        calibration (``Calibration.from_diag``).
        """
        n_tokens = self._acc[name].n_tokens
        if self.statistic == "diag":
            return Calibration.from_diag(self._accumulated(name).cpu().numpy(), n_samples=n_tokens)
        gram = self.gram(name)
        gram = 0.5 * (gram + gram.T)
        return Calibration.from_gram(gram.cpu().numpy(), n_samples=n_tokens, check_psd=False)  # X^T X: PSD

    def calibrations(self) -> dict[str, Calibration]:
        """``{layer name: Calibration}`` for every hooked layer."""
        return {n: self.calibration(n) for n in self.names}


def iter_batches(data: Any) -> Iterable[Any]:
    """The batches of ``data``: a tensor or a dict is one batch; anything else is iterated."""
    if isinstance(data, torch.Tensor | dict) or hasattr(data, "keys"):
        return [data]
    return data


def _to_device(value: Any, device: Any) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict) or hasattr(value, "keys"):
        return {k: _to_device(value[k], device) for k in value.keys()}  # noqa: SIM118
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def run_batch(
    model: nn.Module,
    batch: Any,
    *,
    device: Any = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> Any:
    """Call ``model`` on one calibration batch, with its attention mask as the token mask.

    A tensor is passed as the single input; a dict (e.g. a tokenizer's output) as
    keyword arguments, its ``"attention_mask"`` becoming the current :func:`token_mask`;
    a tuple or list as ``(inputs, *rest)`` of which only the inputs are used (a
    ``(x, y)`` pair of a supervised data loader). ``forward(model, batch)`` replaces
    the call when given. The batch is moved to ``device`` (default: the model's).
    """
    device = _model_device(model) if device is None else device
    batch = _to_device(batch, device)
    mask = None
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        mask = batch.get("attention_mask") if hasattr(batch, "get") else None
    with token_mask(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None):
        if forward is not None:
            return forward(model, batch)
        if isinstance(batch, torch.Tensor):
            return model(batch)
        if isinstance(batch, dict) or hasattr(batch, "keys"):
            return model(**batch)
        if isinstance(batch, list | tuple):
            return model(batch[0])
        raise TypeError(f"cannot feed a batch of type {type(batch).__name__} to the model")


def capture_calibrations(
    model: nn.Module, data: Any, layers: Any = None, **run_kwargs: Any
) -> dict[str, Calibration]:
    """One pass of ``data`` through ``model``; ``{layer name: Calibration}`` of the selected layers."""
    was_training = model.training
    model.eval()
    try:
        with ActivationCapture(model, layers) as cap:
            cap.run(data, **run_kwargs)
    finally:
        model.train(was_training)
    return cap.calibrations()
