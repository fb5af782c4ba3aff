"""One rank of a tensor-parallel test run, started by torchrun from tests/parallel/test_tensor_parallel.py: loads the
model the way a user would (Meta's `Llama.build(..., model_parallel_size=N)`, or `lamina.load(tensor_parallel_size=N)`
for a GGUF), runs the prompts given in a JSON file, and writes what it got to OUT/rank<R>.json."""

import json
import os
import sys

import torch


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    import lamina

    if spec.get("per_rank_paths"):  # a launch whose ranks name different models
        spec["path"] = spec["per_rank_paths"][int(os.environ["RANK"])]
    if spec["kind"] == "meta":
        llama = lamina.Llama.build(
            spec["ckpt"],
            spec["tokenizer"],
            spec["max_seq_len"],
            spec["max_batch_size"],
            model_parallel_size=spec["world"],
            device="cpu",
            dtype="float32",
        )
    else:
        llama = lamina.load(
            spec.get("path"),
            device="cpu",
            dtype="float32",
            max_seq_len=spec["max_seq_len"],
            max_batch_size=spec["max_batch_size"],
            tensor_parallel_size=spec["world"],
            speculative_config=spec.get("speculative_config"),
        )
    tokens, logprobs = llama.generate(spec["prompts"], spec["max_gen_len"], temperature=0, logprobs=True)
    sampled, _ = llama.generate(spec["prompts"], spec["max_gen_len"], temperature=0.8, top_p=0.9, seed=7)
    c = llama.model.config
    out = {
        "rank": int(os.environ["RANK"]),
        "tokens": tokens,
        "logprobs": logprobs,
        "sampled": sampled,
        "local_heads": [c.n_heads, c.n_kv_heads, c.hidden_dim],
        "cache_heads": llama.runner.cache.layers[0][0].shape[1],
        "threads": torch.get_num_threads(),
        "c_step": llama.runner.native is not None,
        "weight_bytes": sum(t.numel() * t.element_size() for t in [*llama.model.parameters(), *llama.model.buffers()]),
    }
    if llama.core.speculator is not None:
        stats = llama.core.speculator.stats
        out["spec"] = [stats.drafts, stats.draft_tokens, stats.accepted_tokens]
        out["used_blocks"] = llama.core.pool.num_used
    if spec.get("pytorch_too") and llama.runner.native is not None:  # the same prompts on the PyTorch forward
        llama.runner.native = None
        out["pytorch_tokens"], out["pytorch_logprobs"] = llama.generate(
            spec["prompts"], spec["max_gen_len"], temperature=0, logprobs=True
        )
    with open(os.path.join(spec["out"], f"rank{out['rank']}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
