"""What a built model's weights are stored as, and what runs their products (what `lamina info` and the load log
print)."""

from __future__ import annotations

from torch import nn

from lamina.quant.linear import QEmbedding, QLinear


def weight_types(model: nn.Module) -> list[tuple[str, int, int, str]]:
    """What a built model's weights are stored as, one row per format or float dtype: (name, how many tensors, their
    bytes, what runs their products). A tied embedding shares its output projection's blocks (counted once)."""
    rows: dict[str, list] = {}
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, (QLinear, QEmbedding)):
            row = rows.setdefault(module.qtype, [0, 0, set()])
            if isinstance(module, QEmbedding):
                row[2].add("embedding rows dequantized")
            else:
                row[2].add(f"lamina's {module.kernels.path} C kernels" if module.native else "dequantized per product")
            if module.blocks.data_ptr() not in seen:
                seen.add(module.blocks.data_ptr())
                row[0], row[1] = row[0] + 1, row[1] + module.blocks.numel()
    for _, p in model.named_parameters():
        row = rows.setdefault(str(p.dtype).removeprefix("torch."), [0, 0, {"PyTorch"}])
        row[0], row[1] = row[0] + 1, row[1] + p.numel() * p.element_size()
    return [(name, n, size, ", ".join(sorted(runs))) for name, (n, size, runs) in rows.items()]


def describe(model: nn.Module) -> str:
    """What a built model's weights are stored as, e.g. "Q4_1 x120, Q8_0 x1 projections; the rest float"."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QLinear):
            counts[module.qtype] = counts.get(module.qtype, 0) + 1
    if not counts:
        return "none (every weight in the float dtype)"
    return ", ".join(f"{qtype} x{n}" for qtype, n in sorted(counts.items())) + " projections; the rest float"
