"""Experiments that train and compress whole networks (needs torch).

- :mod:`.networks`: the network experiment — pruning at initialisation (random, magnitude, SNIP,
  GraSP, SynFlow) vs post-training DSF, SparseGPT, Wanda and magnitude pruning vs butterfly /
  Monarch networks, on Fashion-MNIST (or scikit-learn's digits); ``sparsefact networks``.
- :mod:`.data`: the data sets (idx files of the Debian package ``dataset-fashion-mnist``, no download).
- :mod:`.models`: the 6-layer MLP and the VGG-style CNN, with a dense or a butterfly head.
- :mod:`.training`: deterministic CPU training, evaluation, timing, fine-tuning under fixed masks.
"""

from __future__ import annotations

__all__ = ["run_networks"]


def run_networks(*args, **kwargs):  # noqa: ANN002, ANN003 - forwards to networks.run_networks
    """See :func:`sparsefact.experiments.networks.run_networks` (imported on first use)."""
    from .networks import run_networks as _run

    return _run(*args, **kwargs)
