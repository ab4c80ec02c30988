"""How tests/data/nn_v2_model.safetensors and nn_v2_model_reference.npz were made.

Run once with the code of commit 001c268 (format_version 2: CSR or dense storage per factor,
SHA-256 checksums, before the bitmask storage of version 3), from an export of that commit::

    git archive 001c268 | tar -x -C /tmp/v2src
    PYTHONPATH=/tmp/v2src python tests/data/nn_v2_make.py

tests/test_nn_io_bitmask.py::test_format_version_2_file_still_loads checks that the current code
loads the file into the same model (factors, outputs, layouts). Do not regenerate it with newer
code: its purpose is to be an old file.
"""

import numpy as np
import torch
from torch import nn

from sparsefact.nn_adapters.io import save_compressed
from sparsefact.nn_adapters.modules import DoubleSparseLinear, SparseLinear, replace_module


def v2_dense_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 20, bias=False), nn.ReLU(), nn.Linear(20, 10),
        nn.LayerNorm(10), nn.Linear(10, 7).to(torch.bfloat16),
    )


def sparse(rng, shape, density):
    M = rng.standard_normal(shape).astype(np.float32)
    M[rng.random(shape) >= density] = 0
    return M


def main(out: str = "tests/data") -> None:
    rng = np.random.default_rng(2024)
    model = v2_dense_model()
    with torch.no_grad():
        model[5].weight.uniform_(0.5, 1.5)
    # "0": DSF, A at density .3 (CSR on disk), B at .9 (dense on disk)
    A, B = sparse(rng, (24, 9), .3), sparse(rng, (9, 12), .9)
    bias = rng.standard_normal(24).astype(np.float32)
    replace_module(model, "0", DoubleSparseLinear.from_factors(A, B, bias, layout="csr"))
    # "2": SparseLinear at density .5, no bias
    replace_module(model, "2", SparseLinear.from_weight(sparse(rng, (20, 24), .5), None, layout="dense"))
    # "4": DSF, both factors at .6 (A dense, B CSR on disk)
    A, B = sparse(rng, (10, 6), .6), sparse(rng, (6, 20), .6)
    bias = rng.standard_normal(10).astype(np.float32)
    replace_module(model, "4", DoubleSparseLinear.from_factors(A, B, bias, layout="dense"))
    # "6": a bfloat16 SparseLinear at density .4
    W, bias = sparse(rng, (7, 10), .4), rng.standard_normal(7).astype(np.float32)
    replace_module(model, "6", SparseLinear.from_weight(torch.from_numpy(W).to(torch.bfloat16),
                                                        torch.from_numpy(bias).to(torch.bfloat16),
                                                        layout="dense"))
    model.eval()
    save_compressed(model, f"{out}/nn_v2_model.safetensors")
    x = torch.from_numpy(rng.standard_normal((4, 12)).astype(np.float32))
    with torch.no_grad():
        h = model[:6](x)
        y = model[6](h.to(torch.bfloat16)).float()
    extra = {f"{n}.{f}": m.factor(f).float().numpy() for n, m in model.named_children()
             if hasattr(m, "_factor_names") for f in m._factor_names}
    np.savez(f"{out}/nn_v2_model_reference.npz", x=x.numpy(), y=y.numpy(), **extra)


if __name__ == "__main__":  # never on import (pytest --doctest-modules imports this file)
    main()
