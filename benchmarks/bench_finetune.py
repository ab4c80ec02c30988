"""Beyond one-shot (issue 17): perplexity of a small causal LM, and fine-tuning compressed MiniLM.

Parts (``--part``; each writes ``benchmarks/results/finetune/<part>.json``):

``lm``
    The character-level LLaMA of ``benchmarks/train_char_lm.py`` (trained once, cached in
    ``benchmarks/results/char_lm/``): held-out perplexity (``hamlet_gut.txt``, never seen in
    training; the first ``--eval-chars`` characters, windows of 256 with stride 128) of the dense
    model and of DSF / SparseGPT / Wanda / magnitude at densities 0.5 and 0.3, calibrated on
    ``--lm-calib`` windows of 256 characters drawn (seed 0) from the training text;
    ``--lm-finetune N`` adds N steps of end-to-end KL distillation on those windows per method.
``goal``
    MiniLM (all-MiniLM-L6-v2), the calibration / held-out Hamlet lines of ``make compress``
    (256 + 256): one-shot held-out embedding cosine of DSF / SparseGPT / Wanda at 0.5 and 0.3
    (``--minilm-methods``; ``dsf-quality`` is DSF's quality preset, registered here),
    then the same fine-tuning (``--steps``, ``--lr``, ``--target``, ``--loss``) on the
    calibration lines only, and the held-out cosine after it; CPU seconds of each fine-tuning.
``modes``
    End-to-end against layer-wise fine-tuning, the same steps from the same DSF model
    (``--modes-density``): held-out cosine and distillation loss every ``--eval-every`` steps.
``gradual``
    Gradual DSF (``schedule=[0.7, 0.5, 0.3]``, ``--steps / 3`` fine-tuning steps per stage, each
    later stage warm-started from the fine-tuned factors unless ``--no-warm-start``) against
    one-shot DSF at 0.3 + ``--steps`` fine-tuning steps.

Compressed MiniLM models are cached (``--cache``, default ``/tmp/sparsefact-bench-finetune``)
as ``save_compressed`` files keyed by method and density, so the parts share the one-shot fits.
Everything is seeded; absolute seconds depend on the machine's load (recorded).

Usage::

    nice -n 19 python benchmarks/bench_finetune.py --part lm
    nice -n 19 python benchmarks/bench_finetune.py --part goal --steps 150 --lr 3e-4
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "finetune"


def _register_benchmark_methods() -> None:
    """``dsf-quality``: DSF's quality preset as a registry entry (a parameter, no new code)."""
    from sparsefact import DoubleSparseFactorization
    from sparsefact.methods import available_methods, register_method

    if "dsf-quality" not in available_methods(kind=None):
        register_method("dsf-quality", DoubleSparseFactorization, params={"preset": "quality"},
                        description="benchmark entry: DSF with preset='quality'")


_register_benchmark_methods()


def _cpu() -> float:
    return time.process_time()


def _write(part: str, payload: dict[str, Any], threads: int) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "torch": torch.__version__, "platform": platform.platform(),
               "load_average": os.getloadavg(), "threads": threads}
    path = RESULTS / f"{part}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------- the causal LM
def lm_part(args: argparse.Namespace) -> dict[str, Any]:
    from train_char_lm import DEFAULT_OUT, TEST_PLAY, load_char_lm, play_text, training_text

    from sparsefact.nn_adapters import compress_model
    from sparsefact.nn_adapters.finetune import finetune
    from sparsefact.nn_adapters.perplexity import perplexity

    if not (DEFAULT_OUT / "model.safetensors").is_file():
        raise SystemExit(f"no trained model in {DEFAULT_OUT}: run benchmarks/train_char_lm.py first")
    dense, tok = load_char_lm(DEFAULT_OUT)
    text = training_text()
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(ids) - 257, (args.lm_calib,), generator=g).tolist()
    windows = torch.stack([ids[s: s + 256] for s in starts])
    calib = list(windows.split(16))
    test_ids = torch.tensor(tok.encode(play_text(TEST_PLAY)[: args.eval_chars]), dtype=torch.long)

    def ppl(model: Any) -> float:
        return float(perplexity(model, test_ids, window=256, stride=128, batch_size=16))

    t0 = time.perf_counter()
    base = ppl(dense)
    print(f"dense perplexity {base:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    rows = []
    for density in args.densities:
        for method in args.methods:
            start, cpu = time.perf_counter(), _cpu()
            model, report = compress_model(copy.deepcopy(dense), calib, method, density, progress=False)
            seconds = time.perf_counter() - start
            value = ppl(model)
            row = {"method": method, "density": density, "achieved_density": report.summary()["density"],
                   "perplexity": value, "increase": value - base, "compress_seconds": seconds,
                   "compress_cpu_seconds": _cpu() - cpu}
            if args.lm_finetune:
                cpu = _cpu()
                ft = finetune(model, dense, calib, steps=args.lm_finetune, lr=args.lm_lr, loss="kl",
                              progress=False)
                row["finetuned_perplexity"] = ppl(model)
                row["finetuned_increase"] = row["finetuned_perplexity"] - base
                row["finetune_cpu_seconds"] = _cpu() - cpu
                row["finetune_steps"] = ft.steps
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"part": "lm", "dense_perplexity": base, "rows": rows,
            "settings": {"eval_text": f"{TEST_PLAY}[:{args.eval_chars}]", "window": 256, "stride": 128,
                         "calibration": f"{args.lm_calib} windows of 256 characters of the training text",
                         "finetune_steps": args.lm_finetune, "finetune_lr": args.lm_lr,
                         "finetune_loss": "kl"}}


# ---------------------------------------------------------------------- MiniLM
class MiniLM:
    """The dense MiniLM, its tokenised calibration / held-out lines, and cached compressed copies."""

    def __init__(self, args: argparse.Namespace) -> None:
        from sparsefact.nn_adapters.data import calibration_and_heldout, embed, load_text_model
        from sparsefact.nn_adapters.data import tokenize_batches as tokenize

        self.args = args
        self.dense, self.tokenizer = load_text_model()
        calib, held_out = calibration_and_heldout(256, 256)
        self.calib = tokenize(self.tokenizer, calib, batch_size=args.batch_size)
        self.held_out = tokenize(self.tokenizer, held_out, batch_size=args.batch_size)
        self._embed = embed
        self.reference = embed(self.dense, self.held_out)
        self.cache = Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)

    def cosine(self, model: Any) -> float:
        from sparsefact.nn_adapters.data import embedding_agreement

        return embedding_agreement(self.reference, self._embed(model, self.held_out))["mean_cosine"]

    def compressed(self, method: str, density: float) -> tuple[Any, dict[str, Any]]:
        """One-shot compression (from the cache when there); ``(model, info)``."""
        from sparsefact.nn_adapters import compress_model, load_compressed, save_compressed
        from sparsefact.nn_adapters.data import load_text_model

        path = self.cache / f"minilm-{method}-{density:g}.safetensors"
        info_path = path.with_suffix(".json")
        if path.is_file() and info_path.is_file():
            model = load_compressed(lambda: load_text_model()[0], path).eval()
            return model, json.loads(info_path.read_text())
        start, cpu = time.perf_counter(), _cpu()
        model, report = compress_model(copy.deepcopy(self.dense), self.calib, method, density, progress=False)
        info = {"compress_seconds": time.perf_counter() - start, "compress_cpu_seconds": _cpu() - cpu,
                "achieved_density": report.summary()["density"]}
        save_compressed(model, path)
        info_path.write_text(json.dumps(info))
        return model.eval(), info

    def finetune(self, model: Any, steps: int, *, mode: str = "end_to_end", eval_every: int | None = None,
                 eval_metric: Any = None, progress: bool = False) -> Any:
        """Fine-tune on the calibration lines only (the held-out lines are evaluation only)."""
        from sparsefact.nn_adapters.finetune import finetune

        a = self.args
        return finetune(model, self.dense, self.calib, steps=steps, lr=a.lr, mode=mode, loss=a.loss,
                        output=pooled if a.target == "pooled" and mode == "end_to_end" else None,
                        train=_train_selector(a.train), eval_every=eval_every, eval_metric=eval_metric,
                        restore_best=False, warmup=a.warmup, progress=progress, seed=0)


def pooled(outputs: Any, batch: Any) -> torch.Tensor:
    """Sentence embeddings (masked mean, L2-normalised) of a MiniLM forward pass, with gradients."""
    hidden = outputs[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(mean, dim=-1)


def _train_selector(name: str) -> Any:
    if name == "norms":
        return lambda pname, p: "LayerNorm" in pname
    return name


def goal_part(args: argparse.Namespace) -> dict[str, Any]:
    env = MiniLM(args)
    rows = []
    for density in args.densities:
        for method in args.minilm_methods:
            model, info = env.compressed(method, density)
            one_shot = env.cosine(model)
            cpu, start = _cpu(), time.perf_counter()
            report = env.finetune(model, args.steps)
            row = {"method": method, "density": density, **info, "one_shot_cosine": one_shot,
                   "finetuned_cosine": env.cosine(model), "finetune_cpu_seconds": _cpu() - cpu,
                   "finetune_seconds": time.perf_counter() - start, "steps": report.steps,
                   "first_train_loss": report.train_loss[0], "last_train_loss": report.train_loss[-1]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"part": "goal", "rows": rows, "settings": _settings(args)}


def modes_part(args: argparse.Namespace) -> dict[str, Any]:
    env = MiniLM(args)
    out = {}
    for mode in ("end_to_end", "layerwise"):
        model, _ = env.compressed("dsf", args.modes_density)
        cpu = _cpu()
        report = env.finetune(model, args.steps, mode=mode, eval_every=args.eval_every,
                              eval_metric=lambda m: 1.0 - env.cosine(m))
        curve = [(step, 1.0 - value) for step, value in report.eval_history]
        out[mode] = {"cosine_by_step": curve, "cpu_seconds": _cpu() - cpu,
                     "train_loss_first_last": [report.train_loss[0], report.train_loss[-1]]}
        print(mode, json.dumps(out[mode]), flush=True)
    return {"part": "modes", "density": args.modes_density, "results": out, "settings": _settings(args),
            "note": "held-out embedding cosine, evaluated inside the one finetune call per mode "
                    "(restore_best=False: the curve's last point is the returned model)"}


def gradual_part(args: argparse.Namespace) -> dict[str, Any]:
    from sparsefact.nn_adapters.finetune import compress_gradually

    env = MiniLM(args)
    a = args
    one, _ = env.compressed("dsf", 0.3)
    one_shot = env.cosine(one)
    cpu = _cpu()
    env.finetune(one, a.steps)
    one_shot_ft = {"cosine": env.cosine(one), "cpu_seconds": _cpu() - cpu}
    per_stage = a.steps // 3
    cpu, start = _cpu(), time.perf_counter()
    model, report = compress_gradually(
        copy.deepcopy(env.dense), env.calib, schedule=[0.7, 0.5, 0.3], finetune_steps=per_stage,
        teacher=env.dense, progress=False, warm_start=a.warm_start,
        finetune_kwargs={"lr": a.lr, "loss": a.loss, "train": _train_selector(a.train), "warmup": a.warmup,
                         "output": pooled if a.target == "pooled" else None})
    gradual = {"cosine": env.cosine(model), "cpu_seconds": _cpu() - cpu, "warm_start": a.warm_start,
               "seconds": time.perf_counter() - start,
               "stages": [{"density": s["density"], "achieved": s["compression"]["density"],
                           "mean_calibrated_err": s["compression"]["mean_calibrated_err"]}
                          for s in report.stages],
               "total_steps": report.total_finetune_steps}
    return {"part": "gradual", "one_shot_cosine": one_shot, "one_shot_finetuned": one_shot_ft,
            "gradual": gradual, "settings": _settings(args)}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "lr": args.lr, "loss": args.loss, "target": args.target, "train": args.train,
            "warmup": args.warmup, "batch_size": args.batch_size, "n_calib": 256, "n_eval": 256,
            "text": "Hamlet lines as make compress (i % 4 == 0 calibration, i % 4 == 2 held-out)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["lm", "goal", "modes", "gradual"], required=True)
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--methods", nargs="+", default=["dsf", "sparsegpt", "wanda", "magnitude"])
    p.add_argument("--minilm-methods", nargs="+", default=["dsf", "sparsegpt", "wanda"])
    p.add_argument("--eval-chars", type=int, default=60000)
    p.add_argument("--lm-calib", type=int, default=128)
    p.add_argument("--lm-finetune", type=int, default=0)
    p.add_argument("--lm-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--loss", choices=["mse", "cosine"], default="mse")
    p.add_argument("--target", choices=["tokens", "pooled"], default="tokens")
    p.add_argument("--train", choices=["compressed", "norms", "all"], default="compressed")
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--modes-density", type=float, default=0.3)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                   help="gradual: re-factorise each stage from scratch (default: from the fine-tuned "
                   "factors)")
    p.add_argument("--cache", default="/tmp/sparsefact-bench-finetune")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sparsefact.backends.threads import limit_threads

    start = time.perf_counter()
    with limit_threads(args.threads):
        parts = {"lm": lm_part, "goal": goal_part, "modes": modes_part, "gradual": gradual_part}
        result = parts[args.part](args)
    result["wall_seconds"] = time.perf_counter() - start
    path = _write(args.part + (f"-{args.tag}" if args.tag else ""), result, args.threads)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
