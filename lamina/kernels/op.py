"""The products as a PyTorch operator, `torch.ops.lamina.qmatmul`, which torch.compile treats as one opaque call."""

from __future__ import annotations

import torch

from lamina.kernels.binding import get


def qmatmul(
    x: torch.Tensor, blocks: torch.Tensor, qtype: str, out_features: int, path: str | None = None
) -> torch.Tensor:
    """`Kernels.qmatmul` on the kernels of `path` (None or "": the best this CPU runs). A direct call (about 10 us of
    Python around the kernel); compiled code reaches the same function through torch.ops.lamina.qmatmul."""
    return get(path or None).qmatmul(x, blocks, qtype, out_features)


# The operator for torch.compile: an opaque call in the graph. Defined with the low-level Library API rather than
# torch.library.custom_op, whose Python wrapper costs ~50 us a call (more than the kernel on a small matrix).
_LIBRARY = torch.library.Library("lamina", "DEF")
_LIBRARY.define("qmatmul(Tensor x, Tensor blocks, str qtype, int out_features, str path) -> Tensor")
_LIBRARY.impl("qmatmul", qmatmul, "CPU")


@torch.library.register_fake("lamina::qmatmul", lib=_LIBRARY)
def _(x, blocks, qtype, out_features, path):
    return x.new_empty(x.shape[0], out_features)
