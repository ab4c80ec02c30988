"""A small, slow-enough, deterministic compression job for the kill-and-resume test.

``python tests/resume_job.py CHECKPOINT_DIR OUTPUT_FILE`` compresses a fixed 6-layer MLP by
DSF layer by layer (each layer calibrated on the compressed layers before it) with a
checkpoint directory, then saves the compressed model to OUTPUT_FILE.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def model() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(96, 96), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def data() -> list[torch.Tensor]:
    return list(torch.randn(384, 96, generator=torch.Generator().manual_seed(1)).split(128))


def main(checkpoint_dir: str, output: str) -> None:
    from sparsefact.nn_adapters import compress_model, save_compressed

    torch.set_num_threads(1)
    compressed, _ = compress_model(
        model(), data(), "dsf", 0.5, layers=nn.Linear, progress=False, threads=1,
        checkpoint_dir=checkpoint_dir, max_iter=40, tol=0,
    )
    save_compressed(compressed, output)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
