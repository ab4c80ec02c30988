"""Perplexity of a causal language model on a text, with sliding windows.

:func:`perplexity` follows the evaluation of the SparseGPT and DSF papers and of the Hugging Face
perplexity guide: the text is tokenised once, windows of ``window`` tokens start every ``stride``
tokens, and in each window only the tokens not scored by an earlier window are scored, each
predicted from the window's tokens before it. With ``stride == window`` the windows are
disjoint segments (SparseGPT's evaluation on WikiText-2 with 2048-token segments); with
``stride < window`` every scored token beyond the first window has at least
``window - stride`` tokens of context. The first token of the text is never scored (nothing
predicts it), nor, with ``stride == window``, the first token of each segment; every other
token is scored exactly once, and the perplexity is
``exp(total negative log-likelihood / scored tokens)``, exact over tokens (the Hugging Face
guide's per-window averaging is an approximation of it).

:func:`perplexity_of_files` is the same over text files (joined by a blank line), the function
behind ``sparsefact compress --eval perplexity``.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["PerplexityResult", "encode_text", "perplexity", "perplexity_of_files"]


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity`` (``float(result)``), mean ``nll`` (nats per token), ``n_tokens`` scored,
    ``n_windows``, ``window``, ``stride``."""

    perplexity: float
    nll: float
    n_tokens: int
    n_windows: int
    window: int
    stride: int

    def __float__(self) -> float:
        return self.perplexity

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_text(tokenizer: Any, text: str | Sequence[str]) -> torch.Tensor:
    """Token ids (1-D long tensor) of ``text`` (a list of strings is joined by ``"\\n\\n"``).

    A Hugging Face tokenizer is called as ``tokenizer(text, return_tensors="pt")`` (with the
    special tokens it adds, as the perplexity guide does); an object with ``encode`` only is
    called as ``tokenizer.encode(text)``.
    """
    if not isinstance(text, str):
        text = "\n\n".join(text)
    if callable(tokenizer):
        out = tokenizer(text, return_tensors="pt")
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    elif hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
    else:
        raise TypeError(f"cannot tokenise with a {type(tokenizer).__name__}: expected a callable tokenizer "
                        "or one with encode()")
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _call(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    try:
        takes_ids = "input_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        takes_ids = False
    out = model(input_ids=ids) if takes_ids else model(ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected logits (a tensor or .logits)")


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first scored position within the window)`` of every window."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1) - begin
        if first < end - begin:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer_or_ids: Any,
    text_or_ids: Any = None,
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    device: Any = None,
) -> PerplexityResult:
    """Sliding-window perplexity of a causal LM (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        Maps ``input_ids`` (batch, tokens) to logits (batch, tokens, vocab), returned as a tensor,
        ``.logits`` (transformers) or the first element of a tuple. Run in eval mode (restored).
    tokenizer_or_ids : tokenizer, or token ids
        A tokenizer (then ``text_or_ids`` is the text, or a list of texts joined by a blank line),
        or the ids themselves (1-D, or ``(1, n)``), with ``text_or_ids`` omitted; ``None`` with ids
        in ``text_or_ids`` works too.
    text_or_ids : str, list of str, or ids
    window : int, optional
        Tokens per window (default: ``config.max_position_embeddings`` / ``n_positions`` of the
        model, at most 2048, else 1024).
    stride : int, optional
        Start of one window to the next, ``1 <= stride <= window`` (default ``window // 2``).
    batch_size : int
        Full-length windows evaluated together.
    device : torch device, optional
        Where the ids go (default: the model's).

    Returns
    -------
    PerplexityResult
    """
    if text_or_ids is None or tokenizer_or_ids is None:
        ids = tokenizer_or_ids if text_or_ids is None else text_or_ids
        ids = torch.as_tensor(ids, dtype=torch.long)
    elif isinstance(text_or_ids, str) or (isinstance(text_or_ids, Sequence) and text_or_ids
                                          and isinstance(text_or_ids[0], str)):
        ids = encode_text(tokenizer_or_ids, text_or_ids)
    else:
        ids = torch.as_tensor(text_or_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"expected one sequence of token ids, got shape {tuple(ids.shape)}")
    if window is None:
        config = getattr(model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        window = min(int(limit), 2048) if limit else 1024
    window = int(window)
    stride = window // 2 if stride is None else int(stride)
    if window < 2:
        raise ValueError(f"window must be at least 2, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if ids.numel() < 2:
        raise ValueError("the text has fewer than two tokens: nothing to score")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False
    total, count = 0.0, 0
    spans = _windows(int(ids.numel()), window, stride)
    try:
        i = 0
        while i < len(spans):
            length = spans[i][1] - spans[i][0]
            group = [spans[i]]
            while (len(group) < batch_size and i + len(group) < len(spans)
                   and spans[i + len(group)][1] - spans[i + len(group)][0] == length):
                group.append(spans[i + len(group)])
            batch = torch.stack([ids[b:e] for b, e, _ in group])
            logp = torch.log_softmax(_call(model, batch).double(), dim=-1)
            for row, (_, _, first) in enumerate(group):
                targets = batch[row, first:]
                scores = logp[row, first - 1: length - 1].gather(-1, targets[:, None])
                total -= float(scores.sum())
                count += int(targets.numel())
            i += len(group)
    finally:
        model.train(was_training)
        if use_cache:
            config.use_cache = use_cache
    nll = total / count
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, n_tokens=count, n_windows=len(spans),
                            window=window, stride=stride)


def perplexity_of_files(
    model: nn.Module,
    tokenizer: Any,
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
) -> PerplexityResult:
    """:func:`perplexity` of UTF-8 text files, joined in order by a blank line and tokenised once."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    texts = [Path(p).read_text(encoding="utf-8") for p in paths]
    return perplexity(model, tokenizer, texts, window=window, stride=stride, batch_size=batch_size)
