"""Tensor parallelism on torch.distributed: one model's weights split across the processes of a group, each rank
holding its share of the attention heads and of the feed-forward's hidden units (and of the KV cache: a rank caches
only its own key/value heads), with one all-reduce after the attention output and one after the feed-forward, as in
Megatron-LM, gpt-fast's tp.py and vLLM's Column/RowParallelLinear.

The plan is applied as the weights are read (`span`: each loader reads only a rank's part of each weight, so no rank
ever holds the whole model), and each rank builds a smaller model of the same code: a local ModelConfig with its
heads and hidden units, and weights sliced by output rows (wq, wk, wv, w1, w3: "column parallel") or by input
columns (wo, w2: "row parallel"; `parallelize` wraps them in `AllReduce`). The model file has no parallel code. GGML
blocks are sliced along rows, and along columns in whole blocks of 32.

Embeddings and the output projection are split by vocabulary, as vLLM's VocabParallelEmbedding / ParallelLMHead: a
rank looks up only the token ids in its rows (the others give zeros; one all-reduce sums them) and computes only
its rows' logits, which one all-gather joins. Replicating them instead costs each rank the whole table (on Llama 3
shapes, 128,256 x dim: a quarter of a 1B model's weights, twice that untied), so a rank would hold far more than
its 1/N. Every rank gets the whole logits and samples from them with the same generator, so every rank computes
the same tokens (the all-reduced hidden states are bitwise equal on every rank) and returns what Meta's reference
returns on each. Norms are replicated.

Key/value heads: with as many ranks as KV heads or fewer, each rank takes n_kv_heads / world of them; with more, each
KV head is replicated on world / n_kv_heads ranks, which hold the query heads that read it.

The modules: `group` (the process group and this process's place in it), `plan` (which part of each weight a rank
holds, and its model's shapes), `layers` (the parallel layers that make a rank's model a part of the whole) and
`protocol` (how the ranks that follow rank 0's engine run its forward passes).
"""

from lamina.parallel.group import TensorParallel, agree, current, init, launched_ranks, setup
from lamina.parallel.layers import AllReduce, VocabParallelEmbedding, VocabParallelLogits, parallelize
from lamina.parallel.plan import build_config, local_config, shard, span, vocab_rows
from lamina.parallel.protocol import drive, follow, group_of, heartbeat, rank0_value, release

__all__ = [
    "current",
    "drive",
    "follow",
    "group_of",
    "heartbeat",
    "rank0_value",
    "release",
    "AllReduce",
    "VocabParallelEmbedding",
    "VocabParallelLogits",
    "agree",
    "build_config",
    "TensorParallel",
    "init",
    "launched_ranks",
    "local_config",
    "parallelize",
    "setup",
    "shard",
    "span",
    "vocab_rows",
]
