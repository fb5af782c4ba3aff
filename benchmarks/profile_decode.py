"""Where a decode step goes: the whole C decode step against its matrix products alone, by format.

    python benchmarks/profile_decode.py MODEL.gguf [--threads 2] [--tokens 32] [--streams 1]

The step is timed through the API (greedy, --streams sequences, after a 16-token prompt each, best of 3 runs of
--tokens tokens); the products alone by calling lamina's kernels on every projection of the loaded model in model
order, one call each with one activation row a stream (so each reads its weights from memory, as the step does),
best of 5 passes. What is left is
the step's own work (norms, rotary embedding, attention, quantizing activations, barriers). Beside them: this
machine's read bandwidth in the same run (torch.sum over 1 GiB of float32, best of 5) and each format's share of it,
the ratio that says whether the products are memory-bound (near 1) or compute-bound.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import machine_line  # noqa: E402
from bench_gguf import bandwidth  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, default=1)
    args = parser.parse_args()
    import torch

    import lamina
    from lamina.quant.linear import QLinear

    torch.set_num_threads(args.threads)
    llm = lamina.load(args.model, max_seq_len=64 + args.tokens, max_batch_size=args.streams, prefix_caching=False)
    prompts = [list(range(1000 + 16 * i, 1016 + 16 * i)) for i in range(args.streams)]

    def step_s() -> float:
        first = None
        for _ in llm.stream(prompts, args.tokens, temperature=0, ignore_eos=True):
            first = first or time.perf_counter()
        return (time.perf_counter() - first) / (args.tokens - 1)

    step_s()  # warm-up
    step = min(step_s() for _ in range(3))
    linears = [m for m in llm.runner.model.modules() if isinstance(m, QLinear) and m.native]
    if not linears:
        raise SystemExit(f"{args.model}: no projection runs in lamina's C kernels here (nothing to profile)")
    x = {m.in_features: torch.randn(args.streams, m.in_features) for m in linears}
    by_type: dict[str, list[float]] = {}

    def products(record: bool) -> float:
        total = 0.0
        for m in linears:
            start = time.perf_counter()
            m.kernels.run(m._qtype_id, m.blocks, m.out_features, x[m.in_features])
            took = time.perf_counter() - start
            total += took
            if record:
                row = by_type.setdefault(m.qtype, [0.0, 0.0, 0.0])
                row[0], row[1] = row[0] + m.blocks.numel(), row[1] + took
                row[2] += m.in_features * m.out_features
        return total

    products(False)
    best = min(products(False) for _ in range(4))
    products(True)
    bw = bandwidth(args.threads)
    nbytes = sum(m.blocks.numel() for m in linears)
    print(f"# {machine_line(args.threads)}, {Path(args.model).name}, kernel path {linears[0].kernels.path}, "
          f"read bandwidth {bw / 1e9:.1f} GB/s")
    print(f"decode step of {args.streams} stream(s) {step * 1e3:.2f} ms ({args.streams / step:.1f} tok/s; one stream's "
          f"bandwidth bound for its {nbytes / 1e6:.0f} MB of projections: {bw / nbytes:.1f} tok/s, a step at "
          f"{nbytes / step / bw:.0%} of it)")
    print(f"products alone {best * 1e3:.2f} ms ({best / step:.0%} of the step, {nbytes / best / 1e9:.1f} GB/s, "
          f"{nbytes / best / bw:.0%} of bandwidth); the rest of the step {(step - best) * 1e3:.2f} ms")
    for name, (size, took, weights) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name}: {size / 1e6:.0f} MB in {took * 1e3:.2f} ms, {size / took / 1e9:.1f} GB/s, "
              f"{size / took / bw:.0%} of bandwidth, {args.streams * weights / took / 1e9:.0f} G multiply-adds/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
