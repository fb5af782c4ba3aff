"""Where a prefill goes: the whole prompt pass against its matrix products, split into dequantizing and multiplying.

    python benchmarks/profile_prefill.py MODEL.gguf [--threads 2] [--tokens 512]

The prefill is timed through the API (one prompt of --tokens tokens, one new token, best of 3: the time to the first
token). The products alone run every projection of the loaded model in model order with --tokens activation rows, as
the prefill does (the output projection with one row: only the last position's logits are computed), each split into
its two halves: the block matrix dequantized for the call (`QLinear.dequantized`, the prefill's dtype) and PyTorch's
GEMM on it (the layer's whole call less the dequantizing). Each figure is the best of 2 calls, so the products
measured alone can come out a few percent above the pass they belong to (the difference is then negative). What is
left is the pass's own work (attention, norms, rotary embedding, the embedding lookup). Beside them: the GEMM's rate
in floating-point operations a second, and, for comparison, the same products through lamina's int16 kernels (the
panels on AVX-512: the decode kernels given every row, which prefill does not take by default, since int16
activations move prompt log-probabilities past float32's; see docs/models.md, "Kernel paths").
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
    args = parser.parse_args()
    import torch

    import lamina
    from lamina.quant.linear import NATIVE_MAX_ROWS, QLinear

    torch.set_num_threads(args.threads)
    llm = lamina.load(args.model, max_seq_len=args.tokens + 16, max_batch_size=1, prefix_caching=False)
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

    by_type: dict[str, list[float]] = {}
    dequant = gemm = native = flops = few = 0.0
    for name, m in linears:
        a = inputs(name, m)
        call = best_of(2, lambda: m(a))  # the layer's own call, as the pass makes it
        if m.native and a.shape[0] <= NATIVE_MAX_ROWS:  # the last position's logits: a decode kernel, no GEMM
            few += call
            continue
        took_dq = best_of(2, lambda: m.dequantized(m.prefill_dtype))
        took_nat = best_of(2, lambda: m.kernels.run(m._qtype_id, m.blocks, m.out_features, a)) if m.native else 0.0
        op = 2 * a.shape[0] * m.in_features * m.out_features
        dequant, gemm, native, flops = dequant + took_dq, gemm + call - took_dq, native + took_nat, flops + op
        row = by_type.setdefault(m.qtype, [0.0, 0.0, 0.0, 0.0])
        row[0] += took_dq
        row[1] += call - took_dq
        row[2] += took_nat
        row[3] += op

    products = dequant + gemm + few
    path = linears[0][1].kernels.path if linears[0][1].native else "none"
    dtype = str(linears[0][1].prefill_dtype).removeprefix("torch.")
    print(f"# {machine_line(args.threads)}, {Path(args.model).name}, kernel path {path}, prefill GEMM in {dtype}")
    print(f"prefill of {args.tokens} tokens {prefill:.3f} s ({args.tokens / prefill:.1f} tok/s)")
    print(f"products {products:.3f} s ({products / prefill:.0%} of it): dequantizing {dequant:.3f} s "
          f"({dequant / prefill:.0%}), GEMM {gemm:.3f} s ({gemm / prefill:.0%}, {flops / gemm / 1e9:.0f} GFLOP/s); "
          f"the output projection's one row {few:.3f} s; the rest of the pass {prefill - products:.3f} s "
          f"({(prefill - products) / prefill:.0%})")
    if native:
        print(f"the same products through lamina's int16 kernels ({path}): {native:.3f} s "
              f"({flops / native / 1e9:.0f} G operations/s, {(dequant + gemm) / native:.2f}x dequantize + GEMM)")
    for name, (dq, mm, nat, fl) in sorted(by_type.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        line = f"  {name}: dequantize {dq:.3f} s, GEMM {mm:.3f} s ({fl / mm / 1e9:.0f} GFLOP/s)"
        if nat:
            line += f", int16 kernels {nat:.3f} s ({fl / nat / 1e9:.0f} G operations/s)"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
