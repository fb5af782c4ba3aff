"""The native decode step (C, lamina/kernels/decode.c) against the PyTorch forward over the same GGML blocks: the same
hidden states and KV-cache writes for ragged positions and scattered cache rows, the same for prompts run as rows of
one step (fresh, later chunks, short and long, every KV-cache type and head grouping), the same greedy tokens through
`generate`, and a clear refusal of models it cannot run."""

import dataclasses

import pytest
import torch

from lamina import Llama, kernels
from lamina.engine.native import NativeDecode, unsupported
from lamina.engine.runner import ModelRunner
from lamina.model import ModelConfig, Transformer
from lamina.quant import build_model, use_kernels

from .test_generate import _prompts

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no native kernel: {kernels.unavailable_reason()}")


def _quantized(llama, mode: str, dtype=torch.float32):
    state = {name: t.to(dtype) for name, t in llama.model.state_dict().items()}
    model = build_model(llama.model.config, state, mode, device=torch.device("cpu"), dtype=dtype)
    return Llama(model, llama.tokenizer, dataclasses.replace(llama.config, dtype=dtype))


@pytest.mark.parametrize(
    "mode, block_size, tables",
    [
        ("int8", None, [[3], [0], [2]]),  # whole rows, scattered (not 0..B-1)
        ("int4", None, [[3], [0], [2]]),
        ("int4", 4, [[9, 2, 12], [0, 5, 7, 1, 13], [6, 3]]),  # paged: blocks of 4 positions
    ],
)
def test_step_equals_pytorch_forward(llama, mode, block_size, tables):
    quantized = _quantized(llama, mode)
    kw = dict(num_blocks=16, block_size=block_size) if block_size else {}
    native = ModelRunner(quantized.model, quantized.config, **kw)
    assert native.native is not None
    reference = ModelRunner(quantized.model, quantized.config, native=False, **kw)
    prompts = _prompts([5, 11, 2])
    bs = native.block_size
    with torch.inference_mode():
        for runner in (native, reference):
            runner.prefill(prompts, tables)
        tokens, positions = [7, 8, 9], [len(p) for p in prompts]
        for _ in range(4):
            logits = native.native(tokens, tables, positions)
            expected = reference.decode(tokens, tables, positions)
            # Same blocks, same int16 activation steps; float sums in another order: ~1e-5 relative.
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
            for (k, v), (rk, rv) in zip(native.cache.layers, reference.cache.layers):
                for t, p in zip(tables, positions):
                    at = (t[p // bs], slice(None), p % bs)
                    # Scale-aware, as the logits above: an element near zero carries the error of its whole row
                    # (1.07e-4 seen on AVX-512 machines, where the compiler vectorises the float loops otherwise).
                    for ours, theirs in ((k[at], rk[at]), (v[at], rv[at])):
                        scale = max(1.0, theirs.abs().max().item())
                        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * scale)
            tokens = expected.argmax(-1).tolist()
            positions = [p + 1 for p in positions]


def test_float_output_projection_after_the_step(llama):
    """An output projection the kernel does not read: the step returns hidden states and PyTorch makes the logits."""
    quantized = _quantized(llama, "int8")
    model = quantized.model
    weight = quantized.model.output.dequantized()  # the same weights, as a float nn.Linear
    model.output = torch.nn.Linear(model.config.dim, model.config.vocab_size, bias=False).requires_grad_(False)
    model.output.weight.copy_(weight)
    runner = ModelRunner(model, quantized.config)
    reference = ModelRunner(model, quantized.config, native=False)
    assert runner.native is not None and not runner.native._logits_in_c
    prompts = _prompts([4, 6])
    with torch.inference_mode():
        for r in (runner, reference):
            r.prefill(prompts, [[0], [1]])
        logits = runner.decode([5, 6], [[0], [1]], [4, 6])
        expected = reference.decode([5, 6], [[0], [1]], [4, 6])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_generate_gives_the_pytorch_paths_tokens(llama, monkeypatch):
    quantized = _quantized(llama, "int4")
    prompts = _prompts([3, 9, 5, 1])
    # Make sequence 1 stop early, so that later steps run on scattered cache rows.
    free, _ = quantized.generate(prompts, 12, temperature=0)
    monkeypatch.setattr(quantized.tokenizer, "stop_tokens", quantized.tokenizer.stop_tokens + [free[1][2]])
    tokens, lps = quantized.generate(prompts, 12, temperature=0, logprobs=True)
    assert len(tokens[1]) < 12
    quantized.runner = ModelRunner(quantized.model, quantized.config, native=False)
    expected_tokens, expected_lps = quantized.generate(prompts, 12, temperature=0, logprobs=True)
    assert tokens == expected_tokens
    for ours, theirs in zip(lps, expected_lps):
        assert ours == pytest.approx(theirs, abs=1e-3)


def test_models_it_cannot_run_take_the_pytorch_path(llama):
    assert llama.runner.native is None  # float weights
    assert "GGML blocks" in unsupported(llama.model, llama.runner.cache)
    bf16 = _quantized(llama, "int8", dtype=torch.bfloat16)
    assert bf16.runner.native is None and "float32" in unsupported(bf16.model, bf16.runner.cache)
    with pytest.raises(ValueError, match="cannot run this model: .*float32"):
        NativeDecode(bf16.model, bf16.runner.cache)
    compiled = Llama(bf16.model, bf16.tokenizer, dataclasses.replace(bf16.config, compile=True))
    assert compiled.runner.native is None


def test_rejects_rows_and_positions_outside_the_cache(llama):
    step = _quantized(llama, "int8").runner.native
    with pytest.raises(ValueError, match=r"outside the KV cache \(4 blocks of 64 positions\)"):
        step([1], [[4]], [0])
    with pytest.raises(ValueError, match="outside the KV cache"):
        step([1], [[0]], [64])
    with pytest.raises(ValueError, match="1 tokens, 2 block tables"):
        step([1], [[0], [1]], [0, 0])


def _random_model(n_heads: int, n_kv_heads: int, head_dim: int, path: str | None = None) -> Transformer:
    """Two layers of int8 blocks with random weights, queries and keys scaled up so that attention is peaked (a wrong
    running maximum or a lost key would show)."""
    config = ModelConfig(
        dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=101, hidden_dim=96, head_dim=head_dim
    )
    torch.manual_seed(0)
    state = Transformer(config).state_dict()
    for name in state:
        if name.endswith(("wq.weight", "wk.weight")):
            state[name] *= 4.0
    model = build_model(config, state, "int8", device=torch.device("cpu"), dtype=torch.float32)
    use_kernels(model, path, prefill_dtype=torch.int16)  # the PyTorch side in the step's arithmetic on every path
    return model


@pytest.mark.parametrize(
    "heads, kv_dtype, path",
    [
        *(((4, 2, 16), "float32", path) for path in kernels.PATHS),  # 2 query heads a kv head, on each kernel path
        ((6, 1, 48), "float32", None),  # 6 (more than a tile's 4) and D not a multiple of 64
        ((4, 4, 24), "float32", None),  # one each, and D not a multiple of 16 (the portable loop)
        ((4, 2, 64), "float32", None),  # D of SmolLM2 and Llama 3.2 1B: whole 64-wide steps of the output
        ((4, 1, 128), "float32", None),  # D of Llama 3 8B, 4 query heads a kv head
        ((4, 2, 32), "float16", None),
        ((4, 2, 32), "bfloat16", None),
        ((4, 2, 32), "q8_0", None),
    ],
)
def test_prompts_as_rows_equal_pytorch_prefill(llama, heads, kv_dtype, path):
    """Prompts as rows of one step: each attends causally to its own rows and to what its blocks hold before them;
    long ones (a run: tiles of keys), short ones (row by row), and a later chunk, packed in one call, in blocks of 8
    positions scattered over the cache."""
    if path is not None and path not in kernels.supported_paths():
        pytest.skip(f"this CPU does not run the {path} kernels")
    model = _random_model(*heads, path)
    config = dataclasses.replace(llama.config, max_seq_len=128, kv_cache_dtype=kv_dtype)
    kw = dict(num_blocks=40, block_size=8)
    native = ModelRunner(model, config, **kw)
    assert native.native is not None
    reference = ModelRunner(model, config, native=False, **kw)
    tables = [list(range(0, 40, 3))[:12], [1, 4], list(range(2, 40, 3))[:12]]
    first = [[(7 * i + 3) % 101 for i in range(21)]]  # the start of the third prompt, cached before
    prompts = [[(5 * i + 1) % 101 for i in range(77)], [9, 8, 7], [(11 * i) % 101 for i in range(50)]]
    with torch.inference_mode():
        for runner in (native, reference):
            runner.prefill(first, [tables[2]])
        assert native.native.runs_prefill(sum(map(len, prompts)))  # the C step takes it, not PyTorch
        ours = native.prefill(prompts, tables, [0, 0, 21])
        theirs = reference.prefill(prompts, tables, [0, 0, 21])
    # Same blocks, same int16 activation steps; float sums in another order (and an online softmax), ~1e-5 relative.
    # A bfloat16 or q8_0 cache rounds coarsely enough that a key a hair from a rounding boundary goes the other way
    # on one side: one step of its 8 bits (bfloat16), or of its block's 1/127 of the largest value (q8_0).
    tol = {"float32": 1e-4, "float16": 1e-4, "bfloat16": 1e-3, "q8_0": 1e-3}[kv_dtype]
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol * scale)
    for (k, v), (rk, rv) in zip(native.cache.layers, reference.cache.layers):
        for a, b in ((k, rk), (v, rv)):
            if kv_dtype == "q8_0":  # as values, one step of their block apart at most (see above)
                a, b = (c.data.float() * c.scales.repeat_interleave(32, -1) for c in (a, b))
                step = b.abs().max().item() / 127
                torch.testing.assert_close(a, b, rtol=0, atol=1e-4 + step)
            else:  # float32 (1e-4), float16 and bfloat16 (one step of their 10 or 7 bits)
                a, b = a.float(), b.float()
                rtol = {"float32": 1e-4, "float16": 2**-10, "bfloat16": 2**-7}[kv_dtype]
                torch.testing.assert_close(a, b, rtol=rtol, atol=1e-4 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("heads", [(4, 2, 64), (6, 1, 48)])
def test_prompt_chunks_and_decode_rows_in_one_pass_equal_separate_passes(llama, heads):
    """The server's steps while streams decode: prompt chunks (a later chunk as a run of rows, a short fresh one row
    by row) and decode rows through one pass of the C step (ModelRunner.rows) give what PyTorch's separate prefill
    and decode passes give: the chunks' hidden states, the logits of the rows asked for only (a chunk's last row and
    the decode rows, in that order), the same keys and values in the cache."""
    model = _random_model(*heads)
    config = dataclasses.replace(llama.config, max_seq_len=128)
    kw = {"num_blocks": 40, "block_size": 8}
    native = ModelRunner(model, config, **kw)
    assert native.native is not None
    reference = ModelRunner(model, config, native=False, **kw)
    tables = [list(range(0, 40, 4)), list(range(1, 40, 4)), list(range(2, 40, 4)), [3, 7]]
    firsts = [[(5 * i + 1) % 101 for i in range(30)], [(3 * i + 2) % 101 for i in range(17)]]
    firsts.append([(7 * i + 3) % 101 for i in range(21)])  # the third prompt's first chunk
    chunk, fresh, decoded = [(11 * i) % 101 for i in range(40)], [9, 8, 7], [4, 5]
    with torch.inference_mode():
        for runner in (native, reference):
            runner.prefill(firsts, tables[:3])
        hidden, logits = native.rows(
            chunk + fresh + decoded,
            [tables[2]] * 40 + [tables[3]] * 3 + tables[:2],
            [*range(21, 61), 0, 1, 2, 30, 17],
            [39, 42, 43, 44],
        )
        theirs = reference.prefill([chunk, fresh], [tables[2], tables[3]], [21, 0])
        expected = torch.cat([reference.logits(theirs[[39, 42]]), reference.decode(decoded, tables[:2], [30, 17])])
        with pytest.raises(ValueError, match="logits asked of rows"):
            native.native.step([1], [tables[0]], [31], [1])
    scale = theirs.abs().max().item()
    torch.testing.assert_close(hidden[:43], theirs, rtol=1e-4, atol=1e-4 * scale)
    assert logits.shape == expected.shape == (4, 101)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    for (k, v), (rk, rv) in zip(native.cache.layers, reference.cache.layers):
        for a, b in ((k, rk), (v, rv)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))


def test_a_prompt_in_another_arithmetic_keeps_its_own_pass(llama, monkeypatch):
    """A model whose many-row products are float32 GEMMs (`prefill_dtype`, the default off AVX-512) keeps them for a
    prompt chunk of more rows than the C step's products take (NATIVE_MAX_ROWS), decode rows beside it or not; a
    shorter chunk joins the decode rows' pass."""
    from lamina.engine import EngineCore
    from lamina.engine.sampling import SamplingParams
    from lamina.quant.linear import NATIVE_MAX_ROWS

    quantized = _quantized(llama, "int4")
    use_kernels(quantized.model, prefill_dtype=torch.float32)
    config = dataclasses.replace(quantized.config, max_step_tokens=NATIVE_MAX_ROWS + 8, max_seq_len=128)
    engine = EngineCore(quantized.model, quantized.tokenizer, config)
    assert engine.runner.native is not None
    passes = []  # (the runner's method, the rows it ran)

    def rows(kind, first):  # prefill takes prompts, the others a token a row
        return sum(map(len, first)) if kind == "prefill" else len(first)

    for kind in ("rows", "prefill", "decode"):
        real = getattr(engine.runner, kind)
        monkeypatch.setattr(
            engine.runner, kind, lambda *a, kind=kind, real=real: passes.append((kind, rows(kind, a[0]))) or real(*a)
        )
    greedy = SamplingParams(temperature=0, max_tokens=12)
    short, long = _prompts([4, NATIVE_MAX_ROWS + 27])  # "long": a chunk of 39 rows, then one of 20
    engine.add(quantized.new_request(short, greedy, request_id="short"))
    engine.step()
    engine.add(quantized.new_request(long, greedy, request_id="long"))
    while engine.has_work:
        engine.step()
    prompt_passes = [n for kind, n in passes if kind == "prefill"]
    # "short"'s prompt, then "long"'s first chunk in a pass of its own beside "short"'s decode row (that row took one
    # of the step's tokens)
    assert prompt_passes == [4, NATIVE_MAX_ROWS + 7] and ("decode", 1) in passes
    assert [n for kind, n in passes if kind == "rows"] == [21]  # its last 20 rows and "short"'s one


def test_a_step_of_a_few_rows_gives_each_row_what_it_gets_alone():
    """The default model on the C step: a decode step of up to NativeDecode.exact_rows rows (one sequence and its
    draft tokens, or several sequences) gives every row bitwise the logits, and writes bitwise the keys and values,
    that steps of one row each give; what lets speculative decoding verify a draft without changing a token."""
    import lamina

    llm = lamina.load(max_seq_len=256, max_batch_size=4)
    runner = llm.runner
    if runner.native is None or runner.native.exact_rows < 4:
        pytest.skip("no exact few-rows path here (AVX-512 kernels only)")
    text = "Once upon a time, in a land of mountains, a young dragon named Ember lived alone in a cave above the town."
    ids = llm.tokenizer.encode(text, bos=False, eos=False)
    a, b = [0, 1], [2, 3]  # two sequences' block tables (16-position blocks)

    def keys(table, stop):
        layer = runner.cache.layers[3][0]
        return torch.cat([layer[block] for block in table]).transpose(0, 1)[:, :stop].clone()

    with torch.inference_mode():
        for rows_a, rows_b in ((2, 0), (3, 0), (4, 0), (2, 2), (1, 3)):
            n = 12
            alone = []
            for table, rows, start in ((a, rows_a, 0), (b, rows_b, 9)):
                runner.prefill([ids[start : start + n]], [table])
                alone += [runner.decode([t], [table], [n + j])[0] for j, t in enumerate(ids[start + n : start + n + rows])]
            single_keys = keys(a, n + rows_a), keys(b, n + rows_b)
            for table, start in ((a, 0), (b, 9)):
                runner.prefill([ids[start : start + n]], [table])
            tokens = ids[n : n + rows_a] + ids[9 + n : 9 + n + rows_b]
            tables = [a] * rows_a + [b] * rows_b
            positions = [n + j for j in range(rows_a)] + [n + j for j in range(rows_b)]
            together = runner.decode(tokens, tables, positions)
            assert torch.equal(together, torch.stack(alone)), (rows_a, rows_b)
            assert torch.equal(keys(a, n + rows_a), single_keys[0]) and torch.equal(keys(b, n + rows_b), single_keys[1])
