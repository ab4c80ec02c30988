"""How tests/data/nn_v1_model.safetensors and nn_v1_model_reference.npz were made.

Run once with the code of commit f701d7b (format_version 1, before the module classes owned
their configs), from a checkout of that commit::

    PYTHONPATH=<checkout> python tests/data/nn_v1_make.py

tests/test_nn_io.py::test_format_version_1_file_still_loads checks that the current code loads
the file into the same model (outputs, factors, layouts). Do not regenerate it with newer code:
its purpose is to be an old file.
"""

import numpy as np
import torch
from torch import nn

from sparsefact.nn_adapters.io import save_compressed
from sparsefact.nn_adapters.modules import (
    DoubleSparseConv2d,
    DoubleSparseLinear,
    SparseLinear,
    replace_module,
)


def v1_dense_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16, bias=False), nn.Unflatten(1, (1, 4, 4)),
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 3, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(12, 5),
    )


def sparse(rng, shape, density):
    M = rng.standard_normal(shape).astype(np.float32)
    M[rng.random(shape) >= density] = 0
    return M


def main(out: str = "tests/data") -> None:
    rng = np.random.default_rng(1234)
    model = v1_dense_model()
    with torch.no_grad():
        model[5].running_mean.uniform_(-1, 1)
        model[5].running_var.uniform_(0.5, 2)
        model[5].num_batches_tracked.fill_(3)
    # (the random draws in this order: A, B, bias of "2", then "4", "7", "9")
    A, B = sparse(rng, (16, 8), .4), sparse(rng, (8, 16), .4)
    replace_module(model, "2", DoubleSparseLinear.from_factors(A, B, None, layout="csr"))
    A, B, bias = sparse(rng, (6, 4), .5), sparse(rng, (4, 9), .5), rng.standard_normal(6).astype(np.float32)
    replace_module(model, "4", DoubleSparseConv2d.from_factors(A, B, bias, kernel_size=3, padding=1,
                                                              layout="dense"))
    A, B, bias = sparse(rng, (3, 5), .5), sparse(rng, (5, 54), .3), rng.standard_normal(3).astype(np.float32)
    replace_module(model, "7", DoubleSparseConv2d.from_factors(A, B, bias, kernel_size=3, stride=2, padding=1,
                                                              layout="csr"))
    W, bias = sparse(rng, (5, 12), .3), rng.standard_normal(5).astype(np.float32)
    replace_module(model, "9", SparseLinear.from_weight(W, bias, layout="csr"))
    model.eval()
    save_compressed(model, f"{out}/nn_v1_model.safetensors")
    x = torch.from_numpy(rng.standard_normal((4, 12)).astype(np.float32))
    with torch.no_grad():
        y = model(x)
    extra = {f"{n}.{f}": m.factor(f).numpy() for n, m in model.named_children() if hasattr(m, "_factor_names")
             for f in m._factor_names}
    np.savez(f"{out}/nn_v1_model_reference.npz", x=x.numpy(), y=y.numpy(), **extra)


if __name__ == "__main__":  # never on import (pytest --doctest-modules imports this file)
    main()
