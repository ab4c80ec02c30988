"""The network experiment of issue 13 §4 with its full settings (``sparsefact networks``).

A thin wrapper around :func:`sparsefact.experiments.networks.run_networks`: Fashion-MNIST from the
Debian package ``dataset-fashion-mnist`` (scikit-learn's digits when it is missing; the output says
which ran), the four models (6-layer MLP and VGG-style CNN, each with a dense and a butterfly head),
the densities ``10^-k`` for ``k in {0.05, 0.1, 0.2, 0.5, 1, 2}``, the five pruning-at-initialisation
scorers, post-training DSF / SparseGPT / Wanda / magnitude with fine-tuning, and the butterfly /
Monarch networks. Results go to ``benchmarks/results/networks/`` (``results.json``, ``results.md``,
``accuracy_vs_density.png``, ``layer_density.png``); ``docs/networks.md`` reads them.

The default settings (``NetworkSettings``) were sized to finish within an hour on 2 busy shared
cores with one torch thread. Any option of ``sparsefact networks`` can be passed through, e.g.::

    nice python benchmarks/bench_networks.py
    python benchmarks/bench_networks.py --quick --output-dir /tmp/networks-quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sparsefact.experiments.networks import add_arguments, run_from_args

RESULTS = Path(__file__).resolve().parent / "results" / "networks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(output_dir=RESULTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    status = run_from_args(args)
    print(f"bench_networks: {time.perf_counter() - start:.0f} s wall clock, exit status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
