"""How ``sparsefact compress`` scores a compressed model against the dense one.

Two evaluations, chosen by ``--eval``:

``"embedding"`` (:class:`EmbeddingEvaluation`, the default)
    Sentence embeddings (masked mean pooling + L2 norm) of the held-out sentences: mean and
    minimum cosine similarity of compressed and dense embeddings, and the fraction of sentences
    whose nearest other held-out sentence is unchanged. For encoders (MiniLM, BERT).
``"perplexity"`` (:class:`PerplexityEvaluation`)
    Sliding-window perplexity (:func:`~sparsefact.nn_adapters.perplexity.perplexity`, the
    SparseGPT/DSF papers' evaluation) of a causal LM on a held-out text, and its increase over
    the dense model's. For decoders (LLaMA, GPT-2, ...).

Each evaluation is built once from the dense model (its reference embeddings or perplexity are
computed then) and called on every compressed model; it returns a flat dict of scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["EVALUATIONS", "EmbeddingEvaluation", "PerplexityEvaluation", "make_evaluation"]


class EmbeddingEvaluation:
    """Held-out sentence-embedding agreement with the dense model.

    Parameters
    ----------
    dense : nn.Module
        The uncompressed model.
    held_out_batches : sequence of dict
        Tokenised held-out sentences (``input_ids``, ``attention_mask``).
    """

    name = "embedding"
    #: the table's score columns: (header, result key, format)
    columns = (("mean cosine", "mean_cosine", ".4f"), ("min cosine", "min_cosine", ".4f"),
               ("NN agreement", "nn_agreement", ".3f"))

    def __init__(self, dense: nn.Module, held_out_batches: Sequence[dict[str, Any]]) -> None:
        from .data import embed

        self._batches = list(held_out_batches)
        self._reference = embed(dense, self._batches)

    def dense_scores(self) -> dict[str, float]:
        """Scores of the dense model itself (none: the agreement with itself is 1)."""
        return {}

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from .data import embed, embedding_agreement

        return embedding_agreement(self._reference, embed(model, self._batches))

    @staticmethod
    def describe(scores: dict[str, float]) -> str:
        return f"cosine {scores['mean_cosine']:.4f}, NN agreement {scores['nn_agreement']:.3f}"

    @staticmethod
    def legend() -> list[str]:
        return [
            "cosine: compressed vs dense sentence embedding (mean pooling + L2 norm) of each held-out "
            "sentence;",
            "NN agreement: fraction of held-out sentences whose nearest other held-out sentence is "
            "unchanged;",
        ]


class PerplexityEvaluation:
    """Sliding-window perplexity of a causal LM on a held-out text, and its increase over the dense.

    Parameters
    ----------
    dense : nn.Module
        The uncompressed causal LM (``input_ids`` to logits).
    tokenizer : tokenizer
        Encodes ``text`` (:func:`~sparsefact.nn_adapters.perplexity.encode_text`).
    text : str or sequence of str
        The held-out text (a list is joined by a blank line).
    window, stride : int, optional
        As in :func:`~sparsefact.nn_adapters.perplexity.perplexity` (default: the model's
        context, at most 2048, and half of it).
    """

    name = "perplexity"
    columns = (("perplexity", "perplexity", ".4f"), ("increase", "perplexity_increase", "+.4f"))

    def __init__(
        self,
        dense: nn.Module,
        tokenizer: Any,
        text: str | Sequence[str],
        *,
        window: int | None = None,
        stride: int | None = None,
    ) -> None:
        from .perplexity import encode_text, perplexity

        self._ids = encode_text(tokenizer, text)
        self._window, self._stride = window, stride
        self._perplexity = perplexity
        self.dense_result = perplexity(dense, self._ids, window=window, stride=stride)

    def dense_scores(self) -> dict[str, float]:
        """The dense model's perplexity and the evaluation's windows and scored tokens."""
        r = self.dense_result
        return {"perplexity": r.perplexity, "n_tokens": r.n_tokens, "window": r.window, "stride": r.stride}

    def __call__(self, model: nn.Module) -> dict[str, float]:
        result = self._perplexity(model, self._ids, window=self._window, stride=self._stride)
        return {"perplexity": result.perplexity,
                "perplexity_increase": result.perplexity - self.dense_result.perplexity}

    @staticmethod
    def describe(scores: dict[str, float]) -> str:
        return f"perplexity {scores['perplexity']:.4f} ({scores['perplexity_increase']:+.4f})"

    def legend(self) -> list[str]:
        r = self.dense_result
        return [
            f"perplexity: held-out text, {r.n_tokens} tokens scored in windows of {r.window} every "
            f"{r.stride} tokens; dense model {r.perplexity:.4f}; increase = compressed - dense;",
        ]


EVALUATIONS = ("embedding", "perplexity")


def make_evaluation(
    kind: str,
    dense: nn.Module,
    tokenizer: Any,
    *,
    held_out_batches: Sequence[dict[str, Any]] = (),
    text: str | Sequence[str] | None = None,
    window: int | None = None,
    stride: int | None = None,
) -> EmbeddingEvaluation | PerplexityEvaluation:
    """The evaluation named ``kind`` (one of :data:`EVALUATIONS`), built on the dense model.

    Raises
    ------
    ValueError
        For an unknown ``kind``, or ``"perplexity"`` without a text.
    """
    if kind == "embedding":
        return EmbeddingEvaluation(dense, held_out_batches)
    if kind == "perplexity":
        if text is None or (not isinstance(text, str) and not any(text)) or text == "":
            raise ValueError("eval='perplexity' needs a held-out text (eval files or held-out lines)")
        return PerplexityEvaluation(dense, tokenizer, text, window=window, stride=stride)
    raise ValueError(f"eval must be one of {EVALUATIONS}, got {kind!r}")
