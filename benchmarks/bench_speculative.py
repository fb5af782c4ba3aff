"""Speculative decoding's speed: tokens/s of greedy replies with and without speculation, on the tasks where it
should help (repeat or edit a passage, summarize it, fill a JSON schema from it) and where it should not cost
(open-ended writing), at one stream and at 16; prompt lookup on the default model, a draft model (the default
model's weights in float32 as the target, drafted by the default Q4_1 file), and prompt lookup on a random
Llama-3.2-1B-shaped Q4_K_M file (bench_gguf.py's: its replies are noise, so it shows what verification costs at that
size and that the planner then declines); against llama.cpp's prompt-lookup decoding (llama-cpp-python's
LlamaPromptLookupDecoding) on the same GGUF files, same machine, same run.

    python benchmarks/bench_speculative.py [--tokens 160] [--runs 3] [--k 8]
                                           [--engines lamina,draft,lamina-1b,llama.cpp,llama.cpp-1b]

Each engine runs in its own subprocess, which holds it twice, without and with speculation, and runs each task on
the two in turns (off, on, off, on, ...; best of --runs each), so that a ratio compares runs a few seconds apart
(between processes started minutes apart this machine's plain figures moved by up to 25%). Every reply is greedy
and at most --tokens long; lamina's replies with and without speculation must be equal (the script says so when
they are not). Printed per task: tokens/s without and with speculation and the ratio; for lamina the acceptance
rate (accepted draft tokens / verified draft tokens), the drafts verified, 16 streams of the tasks together, and
the decode step's seconds by its number of rows as the planner measured them.
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


ONE_B = Path(__file__).with_name(".models") / "llama3-1b-random-Q4_K_M.gguf"  # bench_gguf.py makes it


def best_rates(runs: int, engines: dict, call) -> dict:
    """Tokens/s of `call(engine)` (which returns the tokens it generated), best of `runs`, the engines' runs taking
    turns (off, on, off, on, ...) so that both see the machine alike; and each engine's last tokens."""
    rates, tokens = {name: 0.0 for name in engines}, {}
    for _ in range(runs):
        for name, engine in engines.items():
            start = time.perf_counter()
            tokens[name] = call(engine)
            rates[name] = max(rates[name], sum(map(len, tokens[name])) / (time.perf_counter() - start))
    return {"rates": rates, "tokens": tokens}


def lamina_worker(args) -> dict:
    import torch

    import lamina
    from lamina.loader import default_model_path

    torch.set_num_threads(args.threads)
    load = dict(max_batch_size=16, max_seq_len=1024)
    path, spec = None, NGRAM | {"num_speculative_tokens": args.k}
    if args.engine == "draft":
        load |= dict(quantize="none", dtype="float32")
        spec = {"model": str(default_model_path()), "num_speculative_tokens": args.k}
    elif args.engine == "lamina-1b":
        path = ONE_B
    engines = {"off": lamina.load(path, **load), "on": lamina.load(path, speculative_config=spec, **load)}
    tasks = TASKS if args.engine != "lamina-1b" else {t: TASKS[t] for t in ("repeat", "open-ended")}
    prompts = {name: engines["off"].encode_dialog([{"role": "user", "content": text}]) for name, text in tasks.items()}
    for llm in engines.values():
        llm.generate([prompts["repeat"]], 8, temperature=0)  # warm up (kernels, caches)
    out = {"one": {}, "same": {}}
    for name, ids in prompts.items():  # (later runs find the prompt in the prefix cache, with speculation or without)
        got = best_rates(args.runs, engines, lambda llm: llm.generate([ids], args.tokens, temperature=0)[0])
        out["one"][name] = got["rates"]
        out["same"][name] = got["tokens"]["off"] == got["tokens"]["on"]
    many = [ids for ids in prompts.values() for _ in range(16 // len(prompts) + 1)][:16]
    got = best_rates(args.runs, engines, lambda llm: llm.generate(many, args.tokens, temperature=0)[0])
    out["sixteen"] = got["rates"]
    spec = engines["on"].core.speculator
    st = spec.stats
    out["stats"] = dict(drafts=st.drafts, draft_tokens=st.draft_tokens, accepted=st.accepted_tokens)
    out["costs"] = {rows: seconds for rows, seconds in sorted(spec.costs.seconds.items())}
    return out


def llama_cpp_worker(args) -> dict:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:  # the copy bench_generate builds for this machine (reused once there)
        sys.path.insert(0, str(build_llama_cpp("native")))
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from lamina.loader import default_model_path

    path = str(ONE_B if args.engine == "llama.cpp-1b" else default_model_path())
    draft = LlamaPromptLookupDecoding(num_pred_tokens=args.k, max_ngram_size=3)
    common = dict(n_ctx=1024, n_threads=args.threads, verbose=False)
    engines = {"off": Llama(path, **common), "on": Llama(path, draft_model=draft, **common)}
    tasks = TASKS if args.engine != "llama.cpp-1b" else {t: TASKS[t] for t in ("repeat", "open-ended")}

    def reply(llm, text):
        llm.reset()
        chat = [{"role": "user", "content": text}]
        return [[0] * llm.create_chat_completion(chat, max_tokens=args.tokens, temperature=0)["usage"]["completion_tokens"]]

    out = {"one": {}}
    for name, text in tasks.items():
        out["one"][name] = best_rates(args.runs, engines, lambda llm: reply(llm, text))["rates"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=160)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--engines", default="lamina,draft,lamina-1b,llama.cpp,llama.cpp-1b")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads is None:
        import os

        args.threads = len(os.sched_getaffinity(0))
    if args.worker:
        result = (llama_cpp_worker if args.engine.startswith("llama.cpp") else lamina_worker)(args)
        print(json.dumps(result))
        return

    def measure(engine: str) -> dict | None:
        cmd = [sys.executable, __file__, "--worker", "1", "--engine", engine]
        cmd += ["--tokens", str(args.tokens), "--runs", str(args.runs), "--k", str(args.k)]
        cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{engine}: failed\n{done.stderr[-2000:]}")
            return None
        return json.loads(done.stdout.strip().splitlines()[-1])

    print(machine_line(args.threads))
    print(f"greedy replies of up to {args.tokens} tokens, best of {args.runs} (with and without speculation in one "
          f"process, taking turns); k = {args.k}; {args.threads} threads")
    titles = {
        "lamina": "prompt lookup, default model (Q4_1)",
        "draft": "draft model: target float32 (quantize none), draft the Q4_1 file",
        "lamina-1b": f"prompt lookup, random Llama-3.2-1B-shaped Q4_K_M ({ONE_B.name}: its replies are noise)",
        "llama.cpp": "llama.cpp prompt lookup (LlamaPromptLookupDecoding), default model (Q4_1)",
        "llama.cpp-1b": f"llama.cpp prompt lookup, {ONE_B.name}",
    }
    for name in args.engines.split(","):
        if name.endswith("-1b") and not ONE_B.exists():
            print(f"\n{titles[name]}: skipped, no {ONE_B} (python benchmarks/bench_gguf.py --shapes 1b --make-only)")
            continue
        result = measure(name)
        if result is None:
            continue
        print(f"\n{titles[name]}")
        print(f"{'task':<12} {'off tok/s':>10} {'on tok/s':>10} {'ratio':>7}")
        for task, rates in result["one"].items():
            print(f"{task:<12} {rates['off']:>10.1f} {rates['on']:>10.1f} {rates['on'] / rates['off']:>6.2f}x")
            if not result.get("same", {}).get(task, True):
                print(f"  ! {task}: the replies differ with speculation")
        if "sixteen" in result:
            rates = result["sixteen"]
            print(f"{'16 streams':<12} {rates['off']:>10.1f} {rates['on']:>10.1f} {rates['on'] / rates['off']:>6.2f}x")
        if "stats" in result:
            st = result["stats"]
            rate = st["accepted"] / st["draft_tokens"] if st["draft_tokens"] else 0.0
            print(f"drafts verified {st['drafts']}, draft tokens {st['draft_tokens']}, acceptance {rate:.2f}")
            costs = ", ".join(f"{rows}: {1e3 * sec:.1f}" for rows, sec in result["costs"].items())
            print(f"decode step ms by rows (as the planner measured them): {costs}")


if __name__ == "__main__":
    main()
