"""Which torch device a compression can run on (``sparsefact compress --device``)."""

from __future__ import annotations

import torch

__all__ = ["cuda_unavailable_reason"]


def cuda_unavailable_reason(index: int | None = None) -> str | None:
    """``None`` when torch can use CUDA (device ``index`` if given), else what is missing.

    Parameters
    ----------
    index : int, optional
        A device number (``cuda:N``); ``None``: any CUDA device.

    Returns
    -------
    str or None
        A sentence naming the missing piece: torch's CUDA build, a visible device, or device
        ``index``.
    """
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA (a CUDA build of torch is needed)"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable CUDA device "
                "(torch.cuda.is_available() is False: no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)")
    if index is not None and index >= torch.cuda.device_count():
        return f"no CUDA device {index}: torch sees {torch.cuda.device_count()}"
    return None
