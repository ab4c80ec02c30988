"""Calibration capture speed (issue 19, item 5): a layer's Gram at the float32 GEMM rate.

For convolutions whose im2col has ``C_in * kh * kw`` columns (default 1152, 2304 and 4608: 128,
256 and 512 channels, 3x3) and a batch of images, this times, side by side in one run:

* ``capture``: :class:`sparsefact.nn_adapters.ActivationCapture` on the conv (im2col, float32
  products in row chunks, float64 accumulation; the hook's time, ``ActivationCapture.seconds``);
* ``float64 product``: the previous arithmetic, ``X.double().T @ X.double()`` on the same im2col
  rows (no unfolding);
* ``float32 GEMM``: ``X.T @ X`` in float32 on the same rows -- the bound the capture should
  approach (it adds the unfolding, the scaling, and the float64 additions).

The table gives seconds per batch and the capture's fraction of the float32 GEMM bound. Usage::

    python benchmarks/bench_capture.py [--threads 2] [--json benchmarks/results/bench_capture.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as nnf

from sparsefact.nn_adapters.capture import ActivationCapture


def capture(conv: nn.Conv2d, x: torch.Tensor) -> float:
    """Seconds in the conv's capture hook for one batch (im2col + Gram accumulation)."""
    with ActivationCapture(nn.Sequential(conv)) as cap, torch.no_grad():
        cap.model(x)
    return cap.seconds["0"]


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--size", type=int, default=24, help="image height = width (default 24)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "bench_capture.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows_out = []
    print("| C_in*kh*kw | rows | capture s | float64 product s | float32 GEMM s | capture / float64 "
          "| bound / capture |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for channels in args.channels:
        conv = nn.Conv2d(channels, 64, 3, padding=1)
        x = torch.randn(args.batch, channels, args.size, args.size)
        cols = nnf.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, channels * 9).contiguous()

        capture(conv, x)  # warm-up
        capture_s = min(capture(conv, x) for _ in range(args.repeats))
        x64 = cols.double()
        float64_s = _best(lambda: x64.T @ x64, args.repeats)  # noqa: B023
        gemm_s = _best(lambda: cols.T @ cols, args.repeats)  # noqa: B023
        row = {"columns": channels * 9, "rows": int(cols.shape[0]), "capture_seconds": capture_s,
               "float64_product_seconds": float64_s, "float32_gemm_seconds": gemm_s,
               "speedup_vs_float64": float64_s / capture_s, "fraction_of_float32_bound": gemm_s / capture_s}
        rows_out.append(row)
        print(f"| {row['columns']} | {row['rows']} | {capture_s:.3f} | {float64_s:.3f} | {gemm_s:.3f} | "
              f"{row['speedup_vs_float64']:.2f}x faster | {row['fraction_of_float32_bound']:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "rows": rows_out, "threads": args.threads, "batch": args.batch, "size": args.size,
        "torch": torch.__version__, "platform": platform.platform(), "load_average": os.getloadavg(),
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
