"""Speculative decoding's speed: tokens/s of greedy replies with and without speculation, on the tasks where it
should help (repeat or edit a passage, summarize it, fill a JSON schema from it) and where it should not cost
(open-ended writing), at one stream and at 16; prompt lookup on the default model, and a draft model (the default
model's weights in float32 as the target, drafted by the default Q4_1 file); against llama.cpp's prompt-lookup
decoding (llama-cpp-python's LlamaPromptLookupDecoding) on the same GGUF, same machine, same run.

    python benchmarks/bench_speculative.py [--tokens 160] [--runs 2] [--k 8] [--engines lamina,draft,llama.cpp]

Each engine and mode runs in its own subprocess; every reply is greedy and at most --tokens long, and replies with
and without speculation must be equal (the script says so when they are not). Printed per task: tokens/s without
and with speculation, the ratio, the acceptance rate (accepted draft tokens / verified draft tokens) and the drafts
verified; then 16 streams of the same tasks together, and llama.cpp's ratio of its own lookup decoding.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import build_llama_cpp, machine_line  # noqa: E402

PASSAGE = (
    "The river Seine flows through Paris for thirteen kilometres, dividing the city into the Left Bank and the Right "
    "Bank. Its banks are lined with green bookstalls, cafes and old stone bridges, the oldest of which is the Pont "
    "Neuf, finished in 1607. Every spring the water rises with the melting snow from the hills of Burgundy, and in "
    "1910 a great flood closed the metro for two months. Today boats carry tourists past Notre-Dame, the Louvre and "
    "the Eiffel Tower, and in summer the quays become beaches with sand, deck chairs and music."
)
TASKS = {
    "repeat": f"Repeat the following passage word for word, and nothing else.\n\n{PASSAGE}",
    "edit": f"Rewrite the following passage with every 'Paris' replaced by 'Lyon', changing nothing else.\n\n{PASSAGE}",
    "summarize": f"Summarize the following passage in three sentences.\n\n{PASSAGE}",
    "json": (
        'From the passage below, give a JSON object with the keys "river", "city", "oldest_bridge", "flood_year" '
        f"and \"landmarks\" (a list).\n\n{PASSAGE}"
    ),
    "open-ended": "Write a story about a dragon who learns to cook.",
}
NGRAM = {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def lamina_worker(args) -> dict:
    import torch

    import lamina
    from lamina.loader import default_model_path

    torch.set_num_threads(args.threads)
    spec = None
    load = dict(max_batch_size=16, max_seq_len=1024)
    if args.mode == "ngram":
        spec = NGRAM | {"num_speculative_tokens": args.k}
    if args.engine == "draft":
        load |= dict(quantize="none", dtype="float32")
        if args.mode == "draft":
            spec = {"model": str(default_model_path()), "num_speculative_tokens": args.k}
    llm = lamina.load(speculative_config=spec, **load)
    prompts = {name: llm.encode_dialog([{"role": "user", "content": text}]) for name, text in TASKS.items()}
    llm.generate([prompts["repeat"]], 8, temperature=0)  # warm up (kernels, caches)
    out = {"one": {}, "tokens": {}}
    for name, ids in prompts.items():
        best = 0.0
        for _ in range(args.runs):  # (later runs find the prompt in the prefix cache, with speculation or without)
            start = time.perf_counter()
            (tokens,), _ = llm.generate([ids], args.tokens, temperature=0)
            best = max(best, len(tokens) / (time.perf_counter() - start))
        out["one"][name] = best
        out["tokens"][name] = tokens
    many = [ids for ids in prompts.values() for _ in range(16 // len(prompts) + 1)][:16]
    start = time.perf_counter()
    results, _ = llm.generate(many, args.tokens, temperature=0)
    out["sixteen"] = sum(len(t) for t in results) / (time.perf_counter() - start)
    if llm.core.speculator is not None:
        st = llm.core.speculator.stats
        out["stats"] = dict(drafts=st.drafts, draft_tokens=st.draft_tokens, accepted=st.accepted_tokens)
    return out


def llama_cpp_worker(args) -> dict:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:  # the copy bench_generate builds for this machine (reused once there)
        sys.path.insert(0, str(build_llama_cpp("native")))
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from lamina.loader import default_model_path

    draft = LlamaPromptLookupDecoding(num_pred_tokens=args.k, max_ngram_size=3) if args.mode == "ngram" else None
    llm = Llama(str(default_model_path()), n_ctx=1024, n_threads=args.threads, verbose=False, draft_model=draft)
    out = {"one": {}, "tokens": {}}
    for name, text in TASKS.items():
        best = 0.0
        for _ in range(args.runs):
            llm.reset()
            start = time.perf_counter()
            chat = [{"role": "user", "content": text}]
            reply = llm.create_chat_completion(chat, max_tokens=args.tokens, temperature=0)
            best = max(best, reply["usage"]["completion_tokens"] / (time.perf_counter() - start))
        out["one"][name] = best
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=160)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--engines", default="lamina,draft,llama.cpp")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads is None:
        import os

        args.threads = len(os.sched_getaffinity(0))
    if args.worker:
        result = (llama_cpp_worker if args.engine == "llama.cpp" else lamina_worker)(args)
        print(json.dumps(result))
        return

    def measure(engine: str, mode: str) -> dict | None:
        cmd = [sys.executable, __file__, "--worker", "1", "--engine", engine, "--mode", mode]
        cmd += ["--tokens", str(args.tokens), "--runs", str(args.runs), "--k", str(args.k)]
        cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{engine} {mode}: failed\n{done.stderr[-2000:]}")
            return None
        return json.loads(done.stdout.strip().splitlines()[-1])

    print(machine_line(args.threads))
    print(f"greedy replies of up to {args.tokens} tokens, best of {args.runs}; k = {args.k}; {args.threads} threads")
    pairs = {
        "lamina": ("lamina", "off", "ngram", "prompt lookup, default model (Q4_1)"),
        "draft": ("draft", "off", "draft", "draft model: target float32 (quantize none), draft the Q4_1 file"),
        "llama.cpp": ("llama.cpp", "off", "ngram", "llama.cpp prompt lookup, default model (Q4_1)"),
    }
    for name in args.engines.split(","):
        engine, off, on, title = pairs[name]
        base, spec = measure(engine, off), measure(engine, on)
        if base is None or spec is None:
            continue
        print(f"\n{title}")
        print(f"{'task':<12} {'off tok/s':>10} {'on tok/s':>10} {'ratio':>7}")
        for task in TASKS:
            off_rate, on_rate = base["one"][task], spec["one"][task]
            print(f"{task:<12} {off_rate:>10.1f} {on_rate:>10.1f} {on_rate / off_rate:>6.2f}x")
            if "tokens" in base and base["tokens"] and base["tokens"][task] != spec["tokens"][task]:
                print(f"  ! {task}: the replies differ with speculation")
        if "sixteen" in base:
            off_rate, on_rate = base["sixteen"], spec["sixteen"]
            print(f"{'16 streams':<12} {off_rate:>10.1f} {on_rate:>10.1f} {on_rate / off_rate:>6.2f}x")
        if "stats" in spec:
            st = spec["stats"]
            rate = st["accepted"] / st["draft_tokens"] if st["draft_tokens"] else 0.0
            print(f"drafts verified {st['drafts']}, draft tokens {st['draft_tokens']}, acceptance {rate:.2f}")


if __name__ == "__main__":
    main()
