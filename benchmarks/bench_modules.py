"""Forward latency and bytes of the sparse-factor torch modules on the CPU.

Part 1 (``layers``): for a 1536x384 and a 384x1536 layer at total densities 0.2, 0.3, 0.5 and
batch 1 / 16 / 256, the median forward time of

- ``nn.Linear`` (dense reference),
- ``DoubleSparseLinear`` with ``layout="csr"`` and ``layout="dense"`` (factors from a real
  ``DoubleSparseFactorization`` fit, ``max_iter=2`` without finalisation: latency depends on the
  factor shapes and densities, not on how well they fit),
- ``SparseLinear`` (magnitude pruning at the same density) with both layouts,

plus the bytes ``save_compressed`` writes for each compressed form vs the dense layer.

Part 2 (``crossover``): one factor product ``W @ z`` (W of shape 1536x384, 384x384, 384x1536)
at densities 0.01-0.5, CSR vs dense; this is the measurement behind ``layout="auto"``.

Part 3 (``kernel``): the small-batch sparse kernel (:mod:`sparsefact.backends.spmv`, used by the
modules' forward for at most ``KERNEL_MAX_ROWS`` input rows) against ``nn.Linear`` and the
modules' torch path (dense layout), MiniLM shapes 1536x384, 384x1536, 384x384, densities 0.2 /
0.3 / 0.5, batch 1 / 4 / 16, one torch thread; ratios to ``nn.Linear`` from the same round-robin
run, and the bandwidth achieved (bytes of packed factor data read per forward / time) against a
256 MB ``numpy.copyto``; at batch 1 also with the weights read from memory (``cold_time_us``:
each variant cycled over deep copies holding ``COLD_BYTES``, the token-by-token decoding case in
a model larger than the cache). Also the fixed cost of a forward through the kernel (an 8x8 layer), the
``KERNEL_MAX_FILL`` sweep (dense-layout DSF at fill 0.4-0.9), and (part 4, ``model``) the MiniLM
encoder's latency for one sentence, dense vs DSF 0.5 (kernel on / off) vs magnitude 0.5.

torch runs with 2 threads; each timing is the median of short samples taken round-robin over
the variants (see ``time_us``; the JSON also keeps the minimum sample). Usage::

    python benchmarks/bench_modules.py [--repeats 21] [--json benchmarks/results/bench_modules.json]
        [--parts layers,crossover,kernel,model]

A run of some of the parts keeps the other parts' results in the JSON file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from sparsefact import DoubleSparseFactorization, MagnitudePruning
from sparsefact.nn_adapters import DoubleSparseLinear, SparseLinear, save_compressed
from sparsefact.nn_adapters.modules import KERNEL_MAX_ROWS

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks.*")
warnings.filterwarnings("ignore", message=".*did not converge.*")

SHAPES = [(1536, 384), (384, 1536)]
DENSITIES = [0.2, 0.3, 0.5]
BATCHES = [1, 16, 256]
SWEEP_SHAPES = [(1536, 384), (384, 384), (384, 1536)]
SWEEP_DENSITIES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
KERNEL_SHAPES = [(1536, 384), (384, 1536), (384, 384)]
KERNEL_BATCHES = [1, 4, 16]
FILL_SWEEP = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def time_us(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median and min microseconds per call of each function in ``fns``.

    A sample is one call (or, for calls under 20 µs, enough calls to last 20 µs), and samples
    of the functions are taken round-robin, so load from other jobs on a shared machine hits all
    of them alike and short samples mostly fall between preemptions. ``repeats`` sets the sample
    count per function: ``10 * repeats`` (at least), capped at ~0.3 s per function. The median
    is the reported number; the min is kept in the JSON too (see ``loadavg`` in the JSON).
    """
    inner, n_samples = {}, {}
    for key, fn in fns.items():
        fn()
        fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        inner[key] = max(1, int(20e-6 / once))
        n_samples[key] = int(min(10 * repeats, max(repeats, 0.3 / (once * inner[key]))))
    samples: dict = {key: [] for key in fns}
    for i in range(max(n_samples.values())):
        for key, fn in fns.items():
            if i >= n_samples[key]:
                continue
            start = time.perf_counter()
            for _ in range(inner[key]):
                fn()
            samples[key].append((time.perf_counter() - start) / inner[key])
    med = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
    best = {k: min(v) * 1e6 for k, v in samples.items()}
    return med, best


#: Each variant is cycled over copies holding at least this many bytes of weights (> 2x the L3
#: cache of the machines we run on), so that every call reads its weights from memory.
COLD_BYTES = 96 << 20


def cold_time_us(fns: dict, sizes: dict, samples: int) -> dict:
    """Median microseconds per call when each call reads its weights from memory, not the cache.

    The batch-1 forward of token-by-token decoding in a model larger than the cache: every layer's
    weights were evicted by the other layers' since it last ran. ``fns[key]`` is a callable that
    makes a fresh copy of the variant (``() -> module``); ``sizes[key]`` its bytes of weight data.
    Each variant is copied until the copies hold :data:`COLD_BYTES`, and a sample runs every copy
    once, in turn (the code and the interpreter stay hot, only the weights are cold).
    """
    copies = {key: [make() for _ in range(max(2, -(-COLD_BYTES // max(sizes[key], 1))))]
              for key, make in fns.items()}
    for calls in copies.values():  # warm the code, pack the kernels' factors
        for call in calls:
            call()
    times: dict = {key: [] for key in fns}
    for _ in range(samples):
        for key, calls in copies.items():
            start = time.perf_counter()
            for call in calls:
                call()
            times[key].append((time.perf_counter() - start) / len(calls))
    return {key: statistics.median(v) * 1e6 for key, v in times.items()}


def _copy_makers(modules: dict, x: torch.Tensor) -> dict:
    """``{key: () -> (() -> forward of a fresh deep copy of the module on x)}``."""
    def maker(module: nn.Module):
        def make():
            clone = copy.deepcopy(module)
            return lambda: clone(x)
        return make
    return {key: maker(module) for key, module in modules.items()}


def _weight_bytes(module: nn.Module) -> int:
    """Bytes of the tensors a forward of ``module`` reads (parameters and buffers)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def file_bytes(module: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.safetensors")
        save_compressed(nn.Sequential(module), path)
        return os.path.getsize(path)


def fit_all(shapes: list = SHAPES, densities: list = DENSITIES) -> dict:
    """All DSF and magnitude-pruning fits, done before any timing.

    Fitting changes the BLAS/OpenMP thread settings (Numba, threadpoolctl), so the thread count
    for timing is set only afterwards.
    """
    fits = {}
    rng = np.random.default_rng(0)
    for out_f, in_f in shapes:
        W = rng.standard_normal((out_f, in_f)).astype(np.float32)
        b = rng.standard_normal(out_f).astype(np.float32)
        for density in densities:
            dsf = DoubleSparseFactorization(density, max_iter=2, finalize=False, random_state=0).fit(W)
            fits[(out_f, in_f, density)] = (W, b, dsf, MagnitudePruning(density).fit(W))
    return fits


def dense_linear(W: np.ndarray, b: np.ndarray) -> nn.Linear:
    """The ``nn.Linear`` with weight ``W`` (out x in) and bias ``b``: the dense reference."""
    dense = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        dense.weight.copy_(torch.from_numpy(W))
        dense.bias.copy_(torch.from_numpy(b))
    return dense


def bench_layers(fits: dict, repeats: int) -> list[dict]:
    rows = []
    for out_f, in_f in SHAPES:
        W, b = fits[(out_f, in_f, DENSITIES[0])][:2]
        dense = dense_linear(W, b)
        dense_file = file_bytes(dense)
        for density in DENSITIES:
            _, _, dsf, mp = fits[(out_f, in_f, density)]
            mods = {
                "dsf_csr": DoubleSparseLinear.from_estimator(dsf, b, layout="csr"),
                "dsf_dense": DoubleSparseLinear.from_estimator(dsf, b, layout="dense"),
                "sparse_csr": SparseLinear.from_estimator(mp, b, layout="csr"),
                "sparse_dense": SparseLinear.from_estimator(mp, b, layout="dense"),
            }
            auto = DoubleSparseLinear.from_estimator(dsf, b)
            sizes = {
                "dense_file": dense_file,
                "dsf_file": file_bytes(mods["dsf_dense"]),
                "sparse_file": file_bytes(mods["sparse_dense"]),
                "dsf_compressed_bytes": mods["dsf_dense"].compressed_bytes,
                "dense_bytes": mods["dsf_dense"].dense_bytes,
            }
            for batch in BATCHES:
                x = torch.randn(batch, in_f)
                fns = {"linear": lambda x=x, dense=dense: dense(x)}
                fns.update({key: (lambda x=x, mod=mod: mod(x)) for key, mod in mods.items()})
                with torch.inference_mode():
                    times, best = time_us(fns, repeats)
                row = {
                    "shape": f"{out_f}x{in_f}", "density": density, "batch": batch,
                    "A_density": dsf.A_.nnz / np.prod(dsf.A_.shape),
                    "B_density": dsf.B_.nnz / np.prod(dsf.B_.shape),
                    "auto_layouts": dict(auto.layouts),
                    "us": times, "min_us": best, **sizes,
                }
                rows.append(row)
                print(f"  {row['shape']} d={density} N={batch}: "
                      + " ".join(f"{k}={v:.0f}" for k, v in times.items()), flush=True)
    return rows


def bench_crossover(repeats: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for r, c in SWEEP_SHAPES:
        for density in SWEEP_DENSITIES:
            W = torch.randn(r, c, generator=gen) * (torch.rand(r, c, generator=gen) < density)
            Wc = W.to_sparse_csr()
            for batch in BATCHES:
                z = torch.randn(c, batch, generator=gen)
                with torch.inference_mode():
                    med, best = time_us({"dense": lambda W=W, z=z: W @ z,
                                         "csr": lambda Wc=Wc, z=z: Wc @ z}, repeats)
                td, tc, td_min, tc_min = med["dense"], med["csr"], best["dense"], best["csr"]
                rows.append({"shape": f"{r}x{c}", "density": density, "batch": batch,
                             "dense_us": td, "csr_us": tc, "csr_over_dense": tc / td,
                             "dense_min_us": td_min, "csr_min_us": tc_min,
                             "csr_over_dense_min": tc_min / td_min})
            print(f"  sweep {r}x{c} d={density}: "
                  + " ".join(f"N={x['batch']}:{x['csr_over_dense']:.2f}" for x in rows[-len(BATCHES):]),
                  flush=True)
    return rows


def copy_bandwidth(mbytes: int = 256, repeats: int = 5) -> dict:
    """The machine's memory bandwidth: best of ``repeats`` ``numpy.copyto`` of ``mbytes`` MB."""
    src = np.ones(mbytes * 2**20 // 8)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return {"bytes": int(src.nbytes), "seconds": best, "copy_GBps": src.nbytes / best / 1e9,
            "read_plus_write_GBps": 2 * src.nbytes / best / 1e9}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _torch_path(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` that never takes the kernel (shares the buffers)."""
    clone = copy.copy(module)
    clone.__dict__ = dict(module.__dict__)
    clone.kernel = False
    return clone


def bench_kernel(fits: dict, repeats: int) -> dict:
    """Part 3: the kernel path against nn.Linear and the torch path (see the module docstring)."""
    rows = []
    for out_f, in_f in KERNEL_SHAPES:
        W, b = fits[(out_f, in_f, DENSITIES[0])][:2]
        dense = dense_linear(W, b)
        for density in DENSITIES:
            _, _, dsf, mp = fits[(out_f, in_f, density)]
            dsf_mod = DoubleSparseLinear.from_estimator(dsf, b, layout="dense")
            sp_mod = SparseLinear.from_estimator(mp, b, layout="dense")
            mods = {"dsf_kernel": dsf_mod, "dsf_torch": _torch_path(dsf_mod),
                    "sparse_kernel": sp_mod, "sparse_torch": _torch_path(sp_mod)}
            for batch in KERNEL_BATCHES:
                x = torch.randn(batch, in_f)
                with torch.inference_mode():
                    auto = {key: mods[key]._kernel_chain(x) is not None
                            for key in ("dsf_kernel", "sparse_kernel")}
                    for key in ("dsf_kernel", "sparse_kernel"):
                        mods[key].kernel = True  # time the kernel also where "auto" would not take it
                        assert (mods[key]._kernel_chain(x) is not None) == (batch <= KERNEL_MAX_ROWS), key
                        torch.testing.assert_close(mods[key](x), mods[key.replace("kernel", "torch")](x),
                                                   rtol=1e-4, atol=1e-4)
                    fns = {"linear": lambda x=x, dense=dense: dense(x)}
                    fns.update({key: (lambda x=x, mod=mod: mod(x)) for key, mod in mods.items()})
                    times, best = time_us(fns, repeats)
                    for key in ("dsf_kernel", "sparse_kernel"):
                        mods[key].kernel = "auto"
                cold = None
                if batch == 1:  # weights from memory; the kernels read their packed factors
                    packed = {"dsf_kernel": dsf_mod._kernel_state[1][0].nbytes,
                              "sparse_kernel": sp_mod._kernel_state[1][0].nbytes}
                    sizes = {"linear": int(W.nbytes + b.nbytes),
                             **{key: packed.get(key, _weight_bytes(mod)) for key, mod in mods.items()}}
                    for key in packed:
                        mods[key].kernel = True
                    with torch.no_grad():  # not inference mode: copies must keep version counters
                        cold = cold_time_us(_copy_makers({"linear": dense, **mods}, x), sizes,
                                            max(5, repeats // 4))
                    for key in packed:
                        mods[key].kernel = "auto"
                chain_bytes = {"dsf": dsf_mod._kernel_state[1][0].nbytes,
                               "sparse": sp_mod._kernel_state[1][0].nbytes}
                row = {
                    "shape": f"{out_f}x{in_f}", "density": density, "batch": batch,
                    "A_density": dsf.A_.nnz / np.prod(dsf.A_.shape),
                    "B_density": dsf.B_.nnz / np.prod(dsf.B_.shape),
                    "kernel_fill": {"dsf": dsf_mod._kernel_state[1][3], "sparse": sp_mod._kernel_state[1][3]},
                    "auto_takes_kernel": auto, "us": times, "min_us": best,
                    "ratio_to_linear": {k: times[k] / times["linear"] for k in mods},
                    "cold_us": cold,
                    "cold_ratio_to_linear": (None if cold is None
                                             else {k: cold[k] / cold["linear"] for k in mods}),
                    "kernel_bytes": chain_bytes, "linear_bytes": int(W.nbytes + b.nbytes),
                    "GBps": {"linear": (W.nbytes + b.nbytes) / times["linear"] / 1e3,
                             "dsf_kernel": chain_bytes["dsf"] / times["dsf_kernel"] / 1e3,
                             "sparse_kernel": chain_bytes["sparse"] / times["sparse_kernel"] / 1e3},
                }
                rows.append(row)
                print(f"  {row['shape']} d={density} N={batch}: "
                      + " ".join(f"{k}={v:.0f}" for k, v in times.items())
                      + "  ratios " + " ".join(f"{k}={v:.2f}" for k, v in row["ratio_to_linear"].items()),
                      flush=True)
    return {"rows": rows, "overhead": bench_overhead(repeats), "fill_sweep": bench_fill(repeats)}


def bench_overhead(repeats: int) -> dict:
    """Fixed cost of a forward: an 8x8 layer, kernel path vs torch path vs nn.Linear (µs)."""
    W = torch.eye(8) * 2
    mod = SparseLinear.from_weight(W, torch.zeros(8), layout="csr")
    dense = nn.Linear(8, 8)
    x = torch.randn(1, 8)
    ref = _torch_path(mod)
    with torch.inference_mode():
        mod(x)
        chain = mod._kernel_chain(x)
        xn = x.numpy()
        times, _ = time_us({"linear": lambda: dense(x), "kernel_forward": lambda: mod(x),
                            "torch_forward": lambda: ref(x),
                            "kernel_checks": lambda: mod._kernel_chain(x),
                            "numba_call": lambda: chain(xn)}, repeats)
    return times


def bench_fill(repeats: int) -> list[dict]:
    """Kernel vs torch path of a dense-layout DoubleSparseLinear 1536x384 (k=384) by fill."""
    rows = []
    gen = torch.Generator().manual_seed(1)
    for fill in FILL_SWEEP:
        A = torch.randn(1536, 384, generator=gen) * (torch.rand(1536, 384, generator=gen) < fill)
        B = torch.randn(384, 384, generator=gen) * (torch.rand(384, 384, generator=gen) < fill)
        mod = DoubleSparseLinear.from_factors(A, B, torch.zeros(1536), layout="dense")
        mod.kernel = True
        ref = _torch_path(mod)
        for batch in (1, KERNEL_MAX_ROWS):
            x = torch.randn(batch, 384)
            with torch.inference_mode():
                fns = {"kernel": lambda x=x, mod=mod: mod(x), "torch": lambda x=x, ref=ref: ref(x)}
                times, _ = time_us(fns, repeats)
            rows.append({"fill": mod._kernel_state[1][3], "batch": batch, "us": times,
                         "kernel_over_torch": times["kernel"] / times["torch"]})
            print(f"  fill {fill} N={batch}: kernel/torch {rows[-1]['kernel_over_torch']:.2f}", flush=True)
    return rows


def bench_model(repeats: int) -> dict:
    """Part 4: MiniLM encoder latency for one sentence (batch 1), dense vs compressed at 0.5."""
    from sparsefact.nn_adapters import compress_model
    from sparsefact.nn_adapters.data import calibration_and_heldout, load_text_model, tokenize_batches

    model, tokenizer = load_text_model()
    calib, held = calibration_and_heldout(64, 8)
    batches = tokenize_batches(tokenizer, calib, batch_size=32, max_length=64)
    by_length = sorted(held, key=len)
    sentences = {"short": by_length[0], "typical": by_length[len(held) // 2], "long": by_length[-1]}
    dense = copy.deepcopy(model)
    dsf, _ = compress_model(copy.deepcopy(model), batches, "dsf", 0.5, max_iter=2, finalize_iter=1,
                            progress=False)
    mag, _ = compress_model(copy.deepcopy(model), batches, "magnitude", 0.5, progress=False)
    dsf_torch = copy.deepcopy(dsf)
    for mod in dsf_torch.modules():
        if hasattr(mod, "kernel"):
            mod.kernel = False
    out = {"compression": {"dsf": "compress_model(..., 'dsf', 0.5, max_iter=2, finalize_iter=1)",
                           "magnitude": "compress_model(..., 'magnitude', 0.5)"}, "sentences": {}}
    for name, sentence in sentences.items():
        inputs = dict(tokenizer([sentence], return_tensors="pt"))
        with torch.inference_mode():
            ref = dsf_torch(**inputs).last_hidden_state
            torch.testing.assert_close(dsf(**inputs).last_hidden_state, ref, rtol=1e-4, atol=1e-4)
            variants = (("dense", dense), ("dsf_kernel", dsf), ("dsf_torch", dsf_torch),
                        ("magnitude_kernel", mag))
            fns = {key: (lambda m=m, inputs=inputs: m(**inputs)) for key, m in variants}
            times, best = time_us(fns, max(3, repeats // 3))
        tokens = int(inputs["input_ids"].shape[1])
        out["sentences"][name] = {"tokens": tokens, "text": sentence, "us": times, "min_us": best,
                                  "ratio_to_dense": {k: v / times["dense"] for k, v in times.items()}}
        print(f"  MiniLM {name} ({tokens} tokens): "
              + " ".join(f"{k}={v / 1e3:.2f}ms" for k, v in times.items()), flush=True)
    return out


def markdown(layers: list[dict], sweep: list[dict]) -> str:
    out = ["Forward µs, median (min) of the samples; files in KiB as written by save_compressed", "",
           "| layer | density | batch | nn.Linear µs | DSF csr µs | DSF dense µs | Sparse csr µs "
           "| Sparse dense µs | file dense KiB | file DSF KiB | file sparse KiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in layers:
        cells = [f"{r['us'][k]:.0f} ({r['min_us'][k]:.0f})"
                 for k in ("linear", "dsf_csr", "dsf_dense", "sparse_csr", "sparse_dense")]
        out.append(
            f"| {r['shape']} | {r['density']} | {r['batch']} | " + " | ".join(cells) + " | "
            f"{r['dense_file'] / 1024:.0f} | {r['dsf_file'] / 1024:.0f} | {r['sparse_file'] / 1024:.0f} |"
        )
    out += ["", "CSR / dense time for one factor product `W @ z`, medians (mins); below 1: CSR faster", "",
            "| W | density | N=" + " | N=".join(str(b) for b in BATCHES) + " |",
            "|---|---|" + "---|" * len(BATCHES)]
    keyed = {(r["shape"], r["density"], r["batch"]): r for r in sweep}
    for r, c in SWEEP_SHAPES:
        for d in SWEEP_DENSITIES:
            cells = [f"{keyed[(f'{r}x{c}', d, b)]['csr_over_dense']:.2f} "
                     f"({keyed[(f'{r}x{c}', d, b)]['csr_over_dense_min']:.2f})" for b in BATCHES]
            out.append(f"| {r}x{c} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def kernel_markdown(kernel: dict, bandwidth: dict) -> str:
    out = ["Kernel path (batch <= KERNEL_MAX_ROWS) vs nn.Linear, 1 torch thread: µs (ratio to nn.Linear); "
           f"packed-factor GB/s (machine copy: {bandwidth['copy_GBps']:.1f} GB/s)", "",
           "| layer | density | batch | nn.Linear µs | DSF kernel | DSF torch | Sparse kernel | Sparse torch "
           "| GB/s linear / DSF / sparse |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in kernel["rows"]:
        cells = [f"{r['us'][k]:.0f} ({r['ratio_to_linear'][k]:.2f})"
                 for k in ("dsf_kernel", "dsf_torch", "sparse_kernel", "sparse_torch")]
        g = r["GBps"]
        out.append(f"| {r['shape']} | {r['density']} | {r['batch']} | {r['us']['linear']:.0f} | "
                   + " | ".join(cells)
                   + f" | {g['linear']:.1f} / {g['dsf_kernel']:.1f} / {g['sparse_kernel']:.1f} |")
    cold_rows = [r for r in kernel["rows"] if r.get("cold_us")]
    if cold_rows:
        out += ["", "Batch 1 with the weights read from memory (each variant cycled over copies holding "
                f"{COLD_BYTES >> 20} MB, as in decoding with a model larger than the cache): "
                "µs (ratio to nn.Linear); GB/s of weight data", "",
                "| layer | density | nn.Linear µs | DSF kernel | DSF torch | Sparse kernel | Sparse torch "
                "| GB/s linear / DSF / sparse |", "|---|---|---|---|---|---|---|---|"]
        for r in cold_rows:
            c, ratio = r["cold_us"], r["cold_ratio_to_linear"]
            keys = ("dsf_kernel", "dsf_torch", "sparse_kernel", "sparse_torch")
            cells = [f"{c[k]:.0f} ({ratio[k]:.2f})" for k in keys]
            rates = (r["linear_bytes"] / c["linear"] / 1e3, r["kernel_bytes"]["dsf"] / c["dsf_kernel"] / 1e3,
                     r["kernel_bytes"]["sparse"] / c["sparse_kernel"] / 1e3)
            out.append(f"| {r['shape']} | {r['density']} | {c['linear']:.0f} | " + " | ".join(cells)
                       + " | " + " / ".join(f"{v:.1f}" for v in rates) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="layers,crossover,kernel,model")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_modules.json"))
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.exists() else {}
    if parts & {"layers", "crossover"}:
        print("fitting ...", flush=True)
        fits = fit_all()
        with threadpool_limits(limits=args.threads):
            torch.set_num_threads(args.threads)
            print(f"layers (torch threads: {torch.get_num_threads()}):", flush=True)
            layers = bench_layers(fits, args.repeats) if "layers" in parts else result.get("layers", [])
            print("crossover:", flush=True)
            sweep = bench_crossover(args.repeats) if "crossover" in parts else result.get("crossover", [])
        table = markdown(layers, sweep)
        print()
        print(table)
        result.update({
            "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
            "machine": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "loadavg": os.getloadavg(), "layers": layers, "crossover": sweep, "markdown": table,
        })
    if parts & {"kernel", "model"}:
        fits = fit_all(KERNEL_SHAPES) if "kernel" in parts else {}
        load_before = os.getloadavg()
        with threadpool_limits(limits=1):
            torch.set_num_threads(1)
            bandwidth = copy_bandwidth()
            print(f"memory copy: {bandwidth['copy_GBps']:.1f} GB/s", flush=True)
            if "kernel" in parts:
                print("kernel (torch threads: 1):", flush=True)
                kernel = bench_kernel(fits, args.repeats)
                kernel.update({"threads": 1, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                               "bandwidth": bandwidth, "KERNEL_MAX_ROWS": KERNEL_MAX_ROWS})
                kernel["markdown"] = kernel_markdown(kernel, bandwidth)
                print()
                print(kernel["markdown"])
                result["kernel"] = kernel
            if "model" in parts:
                print("MiniLM (torch threads: 1):", flush=True)
                model_load = os.getloadavg()
                result["model_batch1"] = {**bench_model(args.repeats), "threads": 1,
                                          "loadavg_before": model_load, "loadavg_after": os.getloadavg()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
