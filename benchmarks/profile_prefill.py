"""Where a prefill goes: the whole prompt pass against its matrix products, in each arithmetic prefill can take.

    python benchmarks/profile_prefill.py MODEL.gguf [--threads 2] [--tokens 512] [--prefill-dtype int16|float32]

The prefill is timed through the API (one prompt of --tokens tokens, one new token, best of 3: the time to the first
token). The products alone run every projection of the loaded model in model order with --tokens activation rows, as
the prefill does (the output projection with one row: only the last position's logits are computed): each layer's
call as the pass makes it (its `prefill_dtype`: lamina's int16 kernels over the blocks, the default on AVX-512, or
float32), and beside it the same product both ways: lamina's int16 kernels, and float32 split into its two halves,
the block matrix dequantized for the call and PyTorch's GEMM on it. Each figure is the best of 2 calls, so the
products measured alone can come out a few percent above the pass they belong to (the rest is then negative). What is
left is the pass's own work (attention, norms, rotary embedding, the embedding lookup, quantizing activations).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import machine_line  # noqa: E402


def best_of(n: int, fn) -> float:
    fn()
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--prefill-dtype", default=None, help="int16 or float32 (default: lamina's for this CPU)")
    args = parser.parse_args()
    import torch

    import lamina
    from lamina.quant.linear import NATIVE_MAX_ROWS, QLinear

    torch.set_num_threads(args.threads)
    llm = lamina.load(
        args.model,
        max_seq_len=args.tokens + 16,
        max_batch_size=1,
        prefix_caching=False,
        prefill_dtype=args.prefill_dtype,
    )
    prompt = [1000 + i % 20000 for i in range(args.tokens)]
    prefill = best_of(3, lambda: llm.generate([prompt], 1, temperature=0))

    model = llm.runner.model
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, QLinear)]
    if not linears:
        raise SystemExit(f"{args.model}: no projection is held in blocks here (nothing to profile)")
    rows = {name: 1 if name == "output" else args.tokens for name, _ in linears}
    x = {(n, m.in_features): torch.randn(n, m.in_features) for n in set(rows.values()) for _, m in linears}

    def inputs(name, m):
        return x[(rows[name], m.in_features)]

    import torch.nn.functional as F

    by_type: dict[str, list[float]] = {}  # format -> [as the pass makes it, int16 kernels, dequantize, GEMM, ops]
    for name, m in linears:
        a = inputs(name, m)
        call = best_of(2, lambda: m(a))  # the layer's own call, as the pass makes it
        if m.native and a.shape[0] <= NATIVE_MAX_ROWS:  # the last position's logits: a decode kernel either way
            nat, dq, mm = call, 0.0, call
        else:
            nat = best_of(2, lambda: m.kernels.run(m._qtype_id, m.blocks, m.out_features, a)) if m.native else 0.0
            dq = best_of(2, lambda: m.dequantized(torch.float32))
            w = m.dequantized(torch.float32)
            mm = best_of(2, lambda: F.linear(a, w))
            del w
        row = by_type.setdefault(m.qtype, [0.0] * 5)
        for i, took in enumerate((call, nat, dq, mm, 2 * a.shape[0] * m.in_features * m.out_features)):
            row[i] += took
    call, nat, dq, mm, ops = (sum(row[i] for row in by_type.values()) for i in range(5))

    path = linears[0][1].kernels.path if linears[0][1].native else "none"
    dtypes = ", ".join(sorted({str(m.prefill_dtype).removeprefix("torch.") for _, m in linears}))
    print(f"# {machine_line(args.threads)}, {Path(args.model).name}, kernel path {path}, prefill in {dtypes}")
    print(f"prefill of {args.tokens} tokens {prefill:.3f} s ({args.tokens / prefill:.1f} tok/s)")
    print(
        f"its products as it makes them ({dtypes}) {call:.3f} s ({call / prefill:.0%}, {ops / call / 1e9:.0f} G "
        f"operations/s); the rest of the pass {prefill - call:.3f} s ({(prefill - call) / prefill:.0%})"
    )
    if nat:
        print(f"the same products through lamina's int16 kernels ({path}): {nat:.3f} s ({ops / nat / 1e9:.0f} G/s)")
    print(
        f"the same products in float32: {dq + mm:.3f} s: dequantizing {dq:.3f} s, GEMM {mm:.3f} s "
        f"({ops / (dq + mm) / 1e9:.0f} G/s overall)"
    )
    for name, (c, n, d, g, o) in sorted(by_type.items(), key=lambda kv: -kv[1][0]):
        line = f"  {name}: as made {c:.3f} s ({o / c / 1e9:.0f} G/s)"
        if n:
            line += f", int16 kernels {n:.3f} s ({o / n / 1e9:.0f} G/s)"
        print(line + f", float32 dequantize {d:.3f} s + GEMM {g:.3f} s ({o / (d + g) / 1e9:.0f} G/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
