"""Names shared by the experiment's modules, importable without torch (for the command line)."""

from __future__ import annotations

__all__ = ["ARCHS", "DATASETS", "HEADS", "MODEL_NAMES", "model_spec"]

#: Accepted values of ``dataset``.
DATASETS = ("auto", "fashion-mnist", "digits")
#: Architectures and heads; a model name is ``arch`` or ``arch-butterfly``.
ARCHS = ("mlp", "cnn")
HEADS = ("dense", "butterfly")
MODEL_NAMES = ("mlp", "mlp-butterfly", "cnn", "cnn-butterfly")


def model_spec(name: str) -> tuple[str, str]:
    """``(arch, head)`` of a model name (``"mlp"``, ``"mlp-butterfly"``, ``"cnn"``, ``"cnn-butterfly"``)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    arch, _, head = name.partition("-")
    return arch, head or "dense"
