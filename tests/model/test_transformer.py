"""The transformer against Meta's reference model: logits, cached decode, packed batches, dtypes."""

import pytest
import torch

from lamina.engine.runner import ModelRunner


def _prompts(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128000, (n,), generator=gen).tolist() for n in lengths]


def test_prefill_logits_equal_reference(llama, reference):
    (prompt,) = _prompts([23])
    runner = ModelRunner(llama.model, llama.config)
    with torch.inference_mode():
        ours = llama.model.logits(runner.prefill([prompt], [[0]]))
        theirs = reference.forward(torch.tensor([prompt]), 0)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_packed_prefill_equals_one_at_a_time(llama):
    prompts = _prompts([5, 17, 1, 9])
    runner = ModelRunner(llama.model, llama.config)
    with torch.inference_mode():
        packed = runner.prefill(prompts, [[3], [0], [2], [1]])
        alone = torch.cat([runner.prefill([p], [[0]]) for p in prompts])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_many_short_prompts_share_attention_calls_and_equal_the_reference(llama, reference):
    """Fresh prompts of similar length attend in one padded call (lamina.model.transformer._fresh_groups); each
    prompt's logits still equal Meta's model run on that prompt alone."""
    from lamina.model.transformer import _fresh_groups

    lengths = [3, 14, 7, 7, 2, 11, 9, 40, 5, 12, 8, 6]
    groups = _fresh_groups(lengths)
    assert sorted(j for g in groups for j in g) == list(range(len(lengths)))
    assert len(groups) < len(lengths) - 4 and [7] in groups  # shared calls; the long prompt padded no one
    for g in groups:  # padding to a group's longest costs at most twice the scores its members need
        assert len(g) * max(lengths[j] for j in g) ** 2 <= 2 * sum(lengths[j] ** 2 for j in g)
    prompts = _prompts(lengths, seed=4)
    runner = ModelRunner(llama.model, llama.config, num_blocks=24, block_size=8)
    free = iter(range(24))
    tables = [[next(free) for _ in range(-(-n // 8))] for n in lengths]
    with torch.inference_mode():
        ours = llama.model.logits(runner.prefill(prompts, tables)).split(lengths)
        for rows, prompt in zip(ours, prompts):  # every position of every prompt
            theirs = reference.forward(torch.tensor([prompt]), 0)[0]
            torch.testing.assert_close(rows, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "block_size, tables",
    [
        (None, [[2], [0]]),  # whole rows, not 0..B-1
        (4, [[5, 1, 7, 3, 9], [0, 8, 2, 6, 4]]),  # paged: blocks of 4 positions, scattered
    ],
)
def test_cached_decode_equals_full_recompute(llama, reference, block_size, tables):
    # Prefill (the longer prompt in two chunks), then decode token by token; each step's logits must equal the
    # reference's full forward pass over the whole sequence.
    prompts, extra = _prompts([4, 11]), _prompts([6, 6], seed=2)
    runner = ModelRunner(llama.model, llama.config, num_blocks=10 if block_size else None, block_size=block_size)
    with torch.inference_mode():
        runner.prefill([prompts[0], prompts[1][:5]], tables)
        runner.prefill([prompts[1][5:]], tables[1:], starts=[5])
        for step in range(6):
            positions = [len(p) + step for p in prompts]
            logits = runner.decode([e[step] for e in extra], tables, positions)
            for b, (p, e) in enumerate(zip(prompts, extra)):
                full = reference.forward(torch.tensor([p + e[: step + 1]]), 0)[0, -1]
                torch.testing.assert_close(logits[b], full, rtol=1e-4, atol=1e-4)


def test_bfloat16_tracks_float32(tiny_ckpt, tokenizer_path, llama):
    from lamina import Llama

    bf16 = Llama.build(tiny_ckpt, tokenizer_path, 64, 2, device="cpu", dtype="bf16")
    assert bf16.model.tok_embeddings.weight.dtype == torch.bfloat16
    (prompt,) = _prompts([12])
    with torch.inference_mode():
        a = llama.model.logits(ModelRunner(llama.model, llama.config).prefill([prompt], [[0]]))
        b = bf16.model.logits(ModelRunner(bf16.model, bf16.config).prefill([prompt], [[0]]))
    assert b.dtype == torch.float32
    # Same argmax where float32 is confident, and close distributions everywhere.
    p, q = a.softmax(-1), b.softmax(-1)
    assert (0.5 * (p - q).abs().sum(-1)).max() < 0.1
    confident = p.max(-1).values > 0.5
    assert torch.equal(a.argmax(-1)[confident], b.argmax(-1)[confident])
