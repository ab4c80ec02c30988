"""Peak memory of compress_model with and without offload, on a sharded decoder with random weights.

A LLaMA-style decoder (``LlamaConfig``, random weights, hidden size 1024, MLP size 2816: 49 MiB
per block in float32; by default 6 and 12 blocks, 357 and 651 MiB in all) is saved with
``save_pretrained(max_shard_size="100MB")``.
Each run is a fresh subprocess that reports its peak resident set right after compression:
``VmHWM`` from ``/proc/self/status``, the high-water mark of RSS (file-backed pages of
memory-mapped weights included), reset by ``exec``; ``ru_maxrss`` is recorded too, but Linux
carries it over ``fork`` + ``exec``, so it can show the parent's size:

* ``floor``: imports and a model built on ``meta`` -- what every run pays before any weight;
* ``in-memory``: ``AutoModelForCausalLM.from_pretrained(src)`` then ``compress_model``;
* ``offload``: the model built on ``meta``, ``compress_model(..., offload=BlockOffloader(src, out))``.

Both compress with the same method (default Wanda, ``measure_error=False``: the calibration
statistic is the Gram diagonal, so the weights dominate the memory), density and calibration
token batches; each run then digests its compressed model (the offloaded one assembled with
``load_offloaded``, after the peak was read) and the digests must be equal. Prints a table and
writes ``benchmarks/results/bench_offload.json``.

Usage::

    python benchmarks/bench_offload.py                                   # 6 and 12 blocks (minutes)
    python benchmarks/bench_offload.py --layers 2,4 --hidden 256 --intermediate 688   # quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MIB = 1024 * 1024


def _config(args, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads, vocab_size=args.vocab,
                       max_position_embeddings=max(256, args.tokens), tie_word_embeddings=False)


def _peak() -> dict[str, float]:
    hwm = None
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return {"vmhwm_mib": hwm, "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _batches(args):
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, args.vocab, (1, args.tokens), generator=g)}
            for _ in range(args.batches)]


def _digest(model) -> str:
    import torch

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.to_dense() if value.layout != torch.strided else value
        h.update(key.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def child(args) -> dict:
    """One measured run (in its own process)."""
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    from sparsefact.nn_adapters.compress import compress_model
    from sparsefact.nn_adapters.offload import BlockOffloader, load_offloaded

    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    src, out = Path(args.src), Path(args.out)
    config = AutoConfig.from_pretrained(src)
    data = _batches(args)
    kwargs = {"progress": False, "threads": 1, "measure_error": args.measure_error}
    t0 = time.perf_counter()
    if args.child == "floor":
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
        return {"mode": "floor", **_peak(), "seconds": time.perf_counter() - t0, "digest": None}
    if args.child == "in-memory":
        model = AutoModelForCausalLM.from_pretrained(src)
        model, report = compress_model(model, data, args.method, args.density, **kwargs)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        _, report = compress_model(model, data, args.method, args.density,
                                   offload=BlockOffloader(src, out, overwrite=True), **kwargs)
    seconds = time.perf_counter() - t0
    peak = _peak()  # before anything else is built
    if args.child == "offload":
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config)
        model = load_offloaded(shell, out)
    return {"mode": args.child, **peak, "seconds": seconds, "digest": _digest(model),
            "layers": len(report), "density": report.summary()["density"]}


def _sizes(src: Path) -> dict[str, float]:
    from sparsefact.nn_adapters.offload import ShardedCheckpoint

    ck = ShardedCheckpoint(src)
    blocks: dict[str, int] = {}
    rest = 0
    for key in ck:
        n = 4
        for s in ck.shape(key):
            n *= s
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:
            blocks[parts[2]] = blocks.get(parts[2], 0) + n
        else:
            rest += n
    return {"model_mib": (sum(blocks.values()) + rest) / MIB, "block_mib": max(blocks.values()) / MIB,
            "outside_blocks_mib": rest / MIB, "blocks": len(blocks), "shards": len(ck.files)}


def _run(mode: str, args, layers: int, src: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--src", str(src), "--out", str(out),
           "--layers", str(layers)]
    for name in ("hidden", "intermediate", "heads", "vocab", "tokens", "batches", "method", "density",
                 "threads"):
        cmd += [f"--{name}", str(getattr(args, name))]
    if args.measure_error:
        cmd.append("--measure-error")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"{mode} run failed ({done.returncode})")
    line = next(ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("RESULT "))
    run = json.loads(line[len("RESULT "):])
    run["process_seconds"] = time.perf_counter() - t0
    return run


def _source(args, layers: int, src: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(args, layers))
    model.save_pretrained(src, max_shard_size=args.shard)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", default="6,12", help="block counts, comma-separated (one model each)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--method", default="wanda")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--measure-error", action="store_true",
                   help="capture full Grams (default: only what the method needs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default="100MB")
    p.add_argument("--workdir", default=None, help="folder for the sources and outputs (default: temporary)")
    p.add_argument("--child", choices=["save", "floor", "in-memory", "offload"], help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.layers = int(args.layers)
        if args.child == "save":
            _source(args, args.layers, Path(args.src))
            print("RESULT {}")
            return
        print("RESULT " + json.dumps(child(args)))
        return

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_offload-"))
    work.mkdir(parents=True, exist_ok=True)
    models = []
    floor = None
    try:
        for layers in (int(n) for n in args.layers.split(",")):
            src, out = work / f"src-{layers}", work / f"out-{layers}"
            if not (src / "config.json").exists():  # in a subprocess: ru_maxrss survives fork + exec
                _run("save", args, layers, src, out)
            if floor is None:
                floor = _run("floor", args, layers, src, out)
            runs = {mode: _run(mode, args, layers, src, out) for mode in ("in-memory", "offload")}
            out_mib = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / MIB
            same = runs["in-memory"]["digest"] == runs["offload"]["digest"]
            models.append({"layers": layers, "sizes": {**_sizes(src), "offload_output_mib": out_mib},
                           "runs": runs, "identical": same})
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    first = models[0]["sizes"]
    print(f"LLaMA-style decoder, random float32 weights, blocks of {first['block_mib']:.1f} MiB, "
          f"{first['outside_blocks_mib']:.1f} MiB outside the blocks, shards of {args.shard}; "
          f"{args.method} density {args.density}, {args.batches} x {args.tokens} calibration tokens")
    print(f"floor (imports + a meta model, no weights): {floor['vmhwm_mib']:.0f} MiB")
    print(f"{'blocks':>6} {'model MiB':>10} {'in-memory peak':>15} {'offload peak':>13} {'saved':>7} "
          f"{'in-mem s':>9} {'offload s':>10} {'identical':>10}")
    for m in models:
        a, b = m["runs"]["in-memory"], m["runs"]["offload"]
        print(f"{m['layers']:>6} {m['sizes']['model_mib']:>10.0f} {a['vmhwm_mib']:>15.0f} "
              f"{b['vmhwm_mib']:>13.0f} {a['vmhwm_mib'] - b['vmhwm_mib']:>7.0f} {a['seconds']:>9.1f} "
              f"{b['seconds']:>10.1f} {m['identical']!s:>10}")
    result = {
        "benchmark": "bench_offload",
        "command": "python benchmarks/bench_offload.py " + " ".join(sys.argv[1:]),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "config": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "vocab",
                                                 "tokens", "batches", "method", "density", "measure_error",
                                                 "shard")},
        "peak_rss": "vmhwm_mib: VmHWM of the run's process, MiB, read right after compress_model returned "
                    "(ru_maxrss_mib is kept for reference: Linux carries it over fork + exec)",
        "floor": floor,
        "models": models,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_offload.json").write_text(json.dumps(result, indent=2) + "\n")
    if not all(m["identical"] for m in models):
        raise SystemExit("an offloaded run's compressed weights differ from the in-memory run's")


if __name__ == "__main__":
    main()
