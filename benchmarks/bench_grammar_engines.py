"""Why lamina's structured output runs on llguidance: its coverage and speed against xgrammar's, on the tests' JSON
Schemas (tests/engine/test_structured.py) and bench_structured.py's schema, over the default model's vocabulary.

    pip install --no-deps xgrammar apache-tvm-ffi   # a peer for this script only (its own deps: transformers, torch)
    python benchmarks/bench_grammar_engines.py

Per schema: compile time (a schema never seen) and the first mask; then the median and largest per-token mask time
along a valid document. Both engines get the same JSON style (", " and ": ", no free whitespace). Ratios are
xgrammar's time over llguidance's (> 1: llguidance is faster).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from bench_generate import commit, cpu_line  # noqa: E402
from bench_structured import SCHEMA  # noqa: E402


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _timed(f):
    start = time.perf_counter()
    value = f()
    return value, 1000 * (time.perf_counter() - start)


def main() -> int:
    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar is not installed: pip install --no-deps xgrammar apache-tvm-ffi", file=sys.stderr)
        return 1
    import transformers

    import lamina
    from lamina.engine.sampling import StructuredOutputs
    from tests.engine.test_structured import SCHEMAS

    llama = lamina.load(max_batch_size=1, max_seq_len=256)
    vocab = llama.model.config.vocab_size
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=llama.tokenizer.backend)
    (info, compiler), xg_setup = _timed(
        lambda: (lambda i: (i, xgr.GrammarCompiler(i)))(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab))
    )
    grammars = llama.core.grammars
    _, llg_setup = _timed(lambda: grammars.ll_tokenizer)

    def xg_compile(schema):
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    print(
        f"# {cpu_line()}, {date.today()}, commit {commit()}, vocabulary {vocab}; xgrammar {_version('xgrammar')}, "
        f"llguidance {_version('llguidance')}; vocabulary setup: xgrammar {xg_setup:.0f} ms, llguidance {llg_setup:.0f} ms"
    )
    print(
        "| schema | xgrammar compile (ms) | llguidance compile (ms) | ratio | xgrammar first mask (ms) "
        "| llguidance first mask (ms) |"
    )
    print("|---|---|---|---|---|---|")
    compiles = []
    for name, schema in {**SCHEMAS, "bench_structured": SCHEMA}.items():
        row = []
        try:
            compiled, ms = _timed(lambda: xg_compile(schema))
            matcher, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, info.vocab_size)
            row += [ms, _timed(lambda: matcher.fill_next_token_bitmask(mask))[1]]
        except Exception as e:  # noqa: BLE001 - coverage is what is measured
            row += [f"fails: {type(e).__name__}", ""]
        try:
            spec = StructuredOutputs(json=schema)
            _, ms = _timed(lambda: grammars.compile(spec))
            fresh = grammars.matcher(spec)
            row += [ms, _timed(lambda: grammars.fill([fresh]))[1]]
        except Exception as e:  # noqa: BLE001
            row += [f"fails: {type(e).__name__}", ""]
        xg_ms, xg_first, llg_ms, llg_first = row
        ratio = f"{xg_ms / llg_ms:.1f}x" if isinstance(xg_ms, float) and isinstance(llg_ms, float) else ""
        if ratio:
            compiles.append((xg_ms, llg_ms))
        cells = [f"{v:.2f}" if isinstance(v, float) else v for v in (xg_ms, llg_ms)]
        firsts = [f"{v:.2f}" if isinstance(v, float) else v for v in (xg_first, llg_first)]
        print(f"| {name} | {cells[0]} | {cells[1]} | {ratio} | {firsts[0]} | {firsts[1]} |")

    # Per-token masks along a valid document of bench_structured's schema (ten people).
    person = {"name": "Ann Lee", "age": 30, "city": "Oslo", "email": "ann@example.com", "hobbies": ["ski", "chess"]}
    ids = llama.tokenizer.encode(json.dumps({"people": [person] * 10}), bos=False, eos=False)
    xg_matcher, mask = xgr.GrammarMatcher(xg_compile(SCHEMA)), xgr.allocate_token_bitmask(1, info.vocab_size)
    llg_matcher = grammars.matcher(StructuredOutputs(json=SCHEMA))
    xg_times, llg_times = [], []
    for token in ids:
        xg_times.append(_timed(lambda: xg_matcher.fill_next_token_bitmask(mask))[1])
        llg_times.append(_timed(lambda: grammars.fill([llg_matcher]))[1])
        if not (xg_matcher.accept_token(token) and llg_matcher.consume_token(token)):
            raise SystemExit(f"the document's token {token} was refused: the two engines disagree")
    xg_med, llg_med = statistics.median(xg_times), statistics.median(llg_times)
    total_xg, total_llg = sum(c[0] for c in compiles), sum(c[1] for c in compiles)
    print(
        f"\ncompile, all schemas both cover: xgrammar {total_xg:.0f} ms, llguidance {total_llg:.0f} ms "
        f"({total_xg / total_llg:.1f}x)\nper-token mask over {len(ids)} tokens: xgrammar median {xg_med:.3f} ms (max "
        f"{max(xg_times):.3f}), llguidance median {llg_med:.3f} ms (max {max(llg_times):.3f}) ({xg_med / llg_med:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
