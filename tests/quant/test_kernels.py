"""lamina's kernel paths (lamina.kernels: portable C, AVX2, AVX-512 VNNI) and the prefill dtype (float32 or bfloat16),
each against float32 arithmetic on the same weights: every path this CPU runs natively, and the AVX-512 path's own
source built over SIMDe (portable versions of its intrinsics) on every CPU with AVX2, so its arithmetic is checked
everywhere. Tolerances are stated per path where they are asserted."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lamina
from lamina import kernels
from lamina.engine.kv_cache import KVCache
from lamina.engine.runner import ModelRunner
from lamina.errors import ConfigError
from lamina.quant import QLinear, ggml, kernel_path, use_kernels

from .test_quant import PASSAGE

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no native kernel: {kernels.unavailable_reason()}")


def _paths() -> list[tuple[str, bool]]:
    """(path, emulated) for every path this machine can run natively, and the AVX-512 source over SIMDe on every
    x86 CPU with AVX2 (AVX-512 ones too: the emulated build is where a SIMDe-only break shows)."""
    found = [(path, False) for path in kernels.supported_paths()]
    if "avx2" in kernels.cpu_features():
        found.append(("avx512", True))
    return found


PATHS = _paths()
IDS = [f"{p}{'-simde' if e else ''}" for p, e in PATHS]


def _kernels(path, emulated) -> kernels.Kernels:
    return kernels.get(path, emulate=emulated)


def test_the_cpu_is_asked_and_the_best_path_is_chosen():
    paths = kernels.supported_paths()
    assert paths[0] == "portable" and kernels.best_path() == paths[-1]
    assert kernels.get().path == kernels.best_path()
    flags = open("/proc/cpuinfo").read() if kernels.X86 else ""
    # cpuid agrees with what Linux reports (it clears the AVX flags when it does not save their registers)
    assert ("avx2" in kernels.cpu_features()) == (" avx2" in flags and " fma" in flags and " f16c" in flags)
    assert ("avx512" in kernels.cpu_features()) == (" avx512bw" in flags and " avx512_vnni" in flags)
    assert ("amx_bf16" in kernels.cpu_features()) == (" amx_bf16" in flags and " amx_tile" in flags)


@pytest.mark.parametrize("path, emulated", PATHS, ids=IDS)
def test_each_library_is_built_for_its_path(path, emulated):
    built = _kernels(path, emulated).lib.lamina_path().decode()
    assert built == (f"{path} (SIMDe)" if emulated else path)


@pytest.mark.skipif(not kernels.X86, reason="x86 paths")
def test_every_x86_path_builds_here(tmp_path, monkeypatch):
    """The compiler takes every path's flags on any x86 machine (the library is built, not run, where the CPU lacks
    the path), so a machine with AVX-512 never meets a path that no machine of ours has compiled."""
    monkeypatch.setenv("LAMINA_CACHE_DIR", str(tmp_path))
    for path in kernels.PATHS:
        name, flags = kernels.build_flags(path)
        built = kernels._compile(name, kernels.SOURCES, flags)
        assert built.is_file() and built.parent == tmp_path


def test_a_path_the_cpu_lacks_is_refused_not_run():
    with pytest.raises(ValueError, match="unknown kernel path 'avx9'"):
        kernels.get("avx9")
    missing = [p for p in kernels.PATHS if p not in kernels.supported_paths()]
    if missing:
        with pytest.raises(RuntimeError, match=f"this CPU cannot run the {missing[-1]} kernels"):
            kernels.get(missing[-1])
        with pytest.raises(ConfigError, match=f"kernel_path='{missing[-1]}'"):
            lamina.load(kernel_path=missing[-1])
    with pytest.raises(ConfigError, match="prefill_dtype must be"):
        lamina.load(prefill_dtype="float16")
    with pytest.raises(ConfigError, match="apply to GGML-block weights"):
        lamina.load(quantize="none", kernel_path="portable")


def _weights(n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    w[0, :5] = 3.0  # a large weight: the block's scale follows it
    return w


@pytest.mark.parametrize("path, emulated", PATHS, ids=IDS)
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("n,k", [(12, 96), (13, 64), (40, 1536)])
def test_products_equal_float32_on_the_same_blocks(path, emulated, qtype, n, k):
    """Every register-tile shape: 1-5 rows (one tile and its edges), 17, 25 and 64 (several tiles of rows; on
    AVX-512 groups of 16 and 8 rows, whole and part-filled), an odd number of weight rows (the edge after the last
    whole tile). Bound: int16 activations per block of 32 carry
    ~3e-5 of each block's largest value, so 1e-4 of the output's scale on every path."""
    kern = _kernels(path, emulated)
    layer = QLinear.from_float(_weights(n, k, seed=n), qtype)
    for rows in (1, 2, 3, 4, 5, 17, 25, 64):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        x[:, 3] = 40.0  # an outlier, as activations after SwiGLU have
        if rows > 2:
            x[1] = 0.0  # an all-zero row
        expected = F.linear(x, layer.dequantized())
        out = kern.qmatmul(x, layer.blocks, qtype, n)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("path, emulated", PATHS, ids=IDS)
@pytest.mark.parametrize(
    "qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
)
def test_a_few_rows_against_weights_from_memory_are_each_row_alone(path, emulated, qtype):
    """2-8 activation rows against a matrix larger than a core's L2 (1 MiB: the AVX-512 path then reads each weight
    row once for all of them): each row's products bitwise those it gets alone (a decode step's rows do not change
    each other's results, so a verified draft token's logits are those of the step without it), and within the
    int16 activations' bound of the float32 product with gguf's dequantization of the same blocks."""
    import gguf

    kern = _kernels(path, emulated)
    k = 512
    w = _weights(8, k, seed=1)
    row_bytes = ggml.QUANTIZE[qtype](w).shape[1]
    n = (1 << 20) // row_bytes + 9  # just past 1 MiB, and not a whole number of any tile
    blocks = ggml.QUANTIZE[qtype](_weights(n, k, seed=2))
    dense = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[qtype])).float()
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(3))
    x[:, 3] = 40.0
    x[1] = 0.0
    alone = torch.cat([kern.qmatmul(x[i : i + 1], blocks, qtype, n) for i in range(8)])
    for rows in (2, 3, 4, 5, 8):
        together = kern.qmatmul(x[:rows], blocks, qtype, n)
        if path == "avx512":
            assert torch.equal(together, alone[:rows])
        expected = F.linear(x[:rows], dense)
        torch.testing.assert_close(together, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_activation_quantization_is_identical_on_every_path():
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(3)) * 5
    x[2] = 0.0
    x[4, 7] = -1e4
    reference = kernels.get("portable").quantize(x)
    for path, emulated in PATHS:
        for ours, theirs in zip(_kernels(path, emulated).quantize(x), reference):
            assert torch.equal(ours, theirs), path


@pytest.mark.parametrize("path, emulated", PATHS, ids=IDS)
def test_dequantize_to_bfloat16_rounds_as_torch(path, emulated):
    layer = QLinear.from_float(_weights(16, 64, seed=5), "Q4_1")
    kern = _kernels(path, emulated)
    f32 = kern.dequantize(0, layer.blocks, 16, 64)
    assert torch.equal(kern.dequantize(0, layer.blocks, 16, 64, torch.bfloat16), f32.to(torch.bfloat16))


@pytest.fixture(scope="module")
def default():
    return lamina.load(device="cpu", dtype="float32", max_seq_len=512)


@pytest.fixture(scope="module")
def fp32():
    return lamina.load(device="cpu", dtype="float32", max_seq_len=512, quantize="none")


def _on_path(llama, path, emulated):
    """The default model's weights with every block projection on one kernel path, in a runner of its own."""
    kern = _kernels(path, emulated)
    for module in llama.model.modules():
        if isinstance(module, QLinear):
            module.kernels = kern
    return ModelRunner(llama.model, llama.config)


@pytest.mark.parametrize("path, emulated", PATHS, ids=IDS)
def test_decode_step_on_each_path_equals_the_pytorch_forward(default, path, emulated):
    """The whole C decode step built for the path against the PyTorch forward (float32 GEMM on dequantized blocks
    for prefill, the portable path's products for decode), on the default model: logits within 2e-4 of scale.
    (Both sides quantize activations per block; the float parts between the products (norms, attention) differ by
    ulps, which flips a rounding now and then: measured on an AMD Zen 5, the portable C step, whose products are the
    reference's own, 0.96-1.23e-4 of scale over three steps, avx2 1.35e-4, avx512 0.92e-4; on the AVX2 EPYC under
    1e-4. A wrong product or cache read moves logits by far more.)"""
    try:
        runner = _on_path(default, path, emulated)
        assert runner.native is not None and runner.native.kernels.path == path
        reference = ModelRunner(default.model, default.config, native=False)
        for module in default.model.modules():
            if isinstance(module, QLinear):
                module.kernels = kernels.get("portable")
        prompts = [[1, 504, 3458, 282, 4649, 314], [1, 378, 1429], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
        tables = [[0], [1], [2]]
        with torch.inference_mode():
            runner.prefill(prompts, tables)
            reference.prefill(prompts, tables)
            tokens, positions = [28, 29, 30], [len(p) for p in prompts]
            for _ in range(3):
                logits = runner.native(tokens, tables, positions)
                expected = reference.decode(tokens, tables, positions)
                torch.testing.assert_close(logits, expected, rtol=1e-4, atol=2e-4 * expected.abs().max().item())
                tokens = expected.argmax(-1).tolist()
                positions = [p + 1 for p in positions]
    finally:
        use_kernels(default.model)


DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Count from one to ten."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three primary colors."}],
]


def test_greedy_chat_is_the_same_on_every_exact_path(fp32):
    """The int16 paths (all of them) give the float32 model's greedy replies on the default model's chat prompts."""
    expected = fp32.chat_completion(DIALOGS, temperature=0, max_gen_len=20)
    for path, emulated in PATHS:
        if emulated:  # not through lamina.load: the emulated library is only the tests'
            continue
        llama = lamina.load(device="cpu", dtype="float32", max_seq_len=512, kernel_path=path, prefill_dtype="float32")
        assert kernel_path(llama.model) == path and llama.runner.native.kernels.path == path
        assert llama.chat_completion(DIALOGS, temperature=0, max_gen_len=20) == expected, path


def _prompt_logprobs(llama, ids) -> list[float]:
    (_,), (lps,) = llama.generate([ids], 0, logprobs=True, echo=True)
    return lps[1:]


def test_bfloat16_prefill_costs_within_bounds(fp32):
    """The bfloat16 GEMM for many-row products (asked for; where the CPU has AMX or AVX-512 BF16), measured against
    float32 prefill on the same blocks: the held passage's perplexity within 1%, its log-probabilities 0.05 nats
    apart on average and 0.25 at most, the top token the same at 97% of positions or more, and the greedy chat
    replies unchanged. (Measured on the default model: perplexity 7.877 against 7.907, mean 0.021 nats, max 0.154,
    top token 99.2% the same.)"""
    bf16 = lamina.load(device="cpu", dtype="float32", max_seq_len=512, prefill_dtype="bfloat16")
    f32 = lamina.load(device="cpu", dtype="float32", max_seq_len=512, prefill_dtype="float32")
    assert all(m.prefill_dtype == torch.bfloat16 for m in bf16.model.modules() if isinstance(m, QLinear))
    ids = f32.tokenizer.encode(PASSAGE, bos=f32.tokenizer.add_bos, eos=False)
    assert len(ids) > 2 * 32  # scored in one chunk of many rows: the GEMM path
    ours, theirs = _prompt_logprobs(bf16, ids), _prompt_logprobs(f32, ids)
    ppl = [math.exp(-sum(lps) / len(lps)) for lps in (ours, theirs)]
    assert abs(ppl[0] / ppl[1] - 1) < 0.01, ppl
    gaps = [abs(a - b) for a, b in zip(ours, theirs)]
    assert sum(gaps) / len(gaps) < 0.05 and max(gaps) < 0.25, (sum(gaps) / len(gaps), max(gaps))
    agree = _top_token_agreement(bf16, f32, ids)
    assert agree >= 0.97, agree


@pytest.mark.xfail(
    "amx_bf16" in kernels.cpu_features(),
    reason="on AMX (Sapphire Rapids, oneDNN's tile GEMM) one of the four greedy replies departs from float32 "
    "prefill's at its 12th token ('These colors are fundamental' / 'These three colors are'), already at 92361d3: "
    "the bfloat16 prefill of issue 24's CPUs",
    strict=False,
)
def test_bfloat16_prefill_keeps_the_greedy_chat_replies(fp32):
    """The bfloat16 GEMM for many-row products against float32 prefill on the same blocks: the greedy chat replies
    unchanged (measured on AVX-512 BF16 without AMX)."""
    bf16 = lamina.load(device="cpu", dtype="float32", max_seq_len=512, prefill_dtype="bfloat16")
    prompts = [[{"role": "user", "content": PASSAGE[:600] + "\n\nSummarize this in one sentence."}], *DIALOGS]
    assert bf16.chat_completion(prompts, temperature=0, max_gen_len=16) == fp32.chat_completion(
        prompts, temperature=0, max_gen_len=16
    )


@pytest.mark.skipif("avx512" not in kernels.supported_paths(), reason="int16 prefill runs on the AVX-512 panels")
def test_int16_prefill_costs_within_bounds(fp32):
    """lamina's int16 kernels for many-row products (the default on AVX-512), measured against float32 prefill on
    the same blocks: the held passage's perplexity within 0.1%, its log-probabilities 2e-3 nats apart on average and
    0.02 at most, the top token the same at 99% of positions or more, and the greedy chat replies (a long prompt's
    among them) and constrained replies (a JSON schema, a choice) unchanged. By default the prompt's pass is the
    native C step's (lamina/kernels/decode.c: int16 products, tiled attention), so this bounds that path. (Measured
    on the default model, Zen 4: through PyTorch's forward, perplexity 7.90692 against 7.90698, mean 2.5e-4 nats, max
    2.5e-3; through the C step, 7.90704 against 7.90698, mean 2.5e-4, max 1.7e-3; top token 100% the same both.)"""
    i16 = lamina.load(device="cpu", dtype="float32", max_seq_len=512)  # the default here
    f32 = lamina.load(device="cpu", dtype="float32", max_seq_len=512, prefill_dtype="float32")
    assert all(m.prefill_dtype == torch.int16 for m in i16.model.modules() if isinstance(m, QLinear))
    ids = f32.tokenizer.encode(PASSAGE, bos=f32.tokenizer.add_bos, eos=False)
    assert len(ids) > 2 * 32  # scored in one chunk of many rows
    ours, theirs = _prompt_logprobs(i16, ids), _prompt_logprobs(f32, ids)
    ppl = [math.exp(-sum(lps) / len(lps)) for lps in (ours, theirs)]
    assert abs(ppl[0] / ppl[1] - 1) < 0.001, ppl
    gaps = [abs(a - b) for a, b in zip(ours, theirs)]
    assert 0 < max(gaps), "the int16 path was not taken"
    assert sum(gaps) / len(gaps) < 2e-3 and max(gaps) < 0.02, (sum(gaps) / len(gaps), max(gaps))
    agree = _top_token_agreement(i16, f32, ids)
    assert agree >= 0.99, agree
    prompts = [[{"role": "user", "content": PASSAGE[:600] + "\n\nSummarize this in one sentence."}], *DIALOGS]
    assert i16.chat_completion(prompts, temperature=0, max_gen_len=16) == f32.chat_completion(
        prompts, temperature=0, max_gen_len=16
    )
    # Constrained replies from a long prompt (prefilled through the int16 path): the same JSON and the same choice.
    for constraint in (
        {"json": {"type": "object", "properties": {"topic": {"type": "string"}, "words": {"type": "integer"}},
                  "required": ["topic", "words"]}},
        {"choice": ["history", "science", "cooking", "sport"]},
    ):
        ask = [[{"role": "user", "content": PASSAGE[:600] + "\n\nWhat is this text about? Answer in JSON."}]]
        replies = [
            llama.chat_completion(ask, temperature=0, max_gen_len=48, structured_outputs=constraint)
            for llama in (i16, f32)
        ]
        assert replies[0] == replies[1], replies


def _top_token_agreement(a, b, ids) -> float:
    """How often the two engines' prefill of `ids` (each through its runner: the native C step where it takes the
    prompt) ranks the same token first, over every position. It writes the last blocks of each cache, which no
    request holds while the test runs."""
    tops = []
    for llama in (a, b):
        runner = llama.runner
        blocks = -(-len(ids) // runner.block_size)
        table = list(range(runner.cache.num_blocks - blocks, runner.cache.num_blocks))
        with torch.inference_mode():
            tops.append(runner.logits(runner.prefill([ids], [table])).argmax(-1))
    return (tops[0] == tops[1]).float().mean().item()


@pytest.mark.parametrize(
    "kind",
    [
        "f16",
        "bf16",
        pytest.param(
            "q8_0",
            marks=pytest.mark.xfail(
                "amx_bf16" in kernels.cpu_features(),
                reason="fails on Sapphire Rapids already at 92361d3 (greedy tokens of the two paths part): to be "
                "found, see issue 22's note",
                strict=False,
            ),
        ),
    ],
)
def test_kv_cache_dtype_on_the_c_step_and_the_pytorch_forward(kind):
    """A 16-bit or q8_0 KV cache is read and written the same way by the C decode step and the PyTorch forward (the
    same rounding: decode.c's kv_store against lamina.engine.kv_cache), so both paths give the same greedy tokens
    from the same prompt; the cache takes the memory its kind says."""
    llama = lamina.load(device="cpu", dtype="float32", max_seq_len=256, kv_cache_dtype=kind)
    assert llama.runner.native is not None and llama.runner.cache.dtype == {"f16": torch.float16,
                                                                           "bf16": torch.bfloat16}.get(kind, kind)
    prompts = [llama.tokenizer.encode(p, bos=False, eos=False) for p in ("The capital of France is", "def add(a, b):")]
    c_step, c_lps = llama.generate(prompts, 24, temperature=0, logprobs=True)
    llama.runner.native = None
    torch_step, torch_lps = llama.generate(prompts, 24, temperature=0, logprobs=True)
    assert c_step == torch_step
    # The two paths compute a new token's keys in a different order: a last-bit difference can move a value to the
    # next rounding step, one 127th of its block's largest in q8_0.
    for a, b in zip(c_lps, torch_lps):
        assert a == pytest.approx(b, abs=0.25 if kind == "q8_0" else 0.05)
    config = llama.model.config
    values = 2 * config.n_layers * config.n_kv_heads * config.head_dim
    expected = {"f16": 2 * values, "bf16": 2 * values, "q8_0": values + values // 32 * 4}[kind]
    assert KVCache.bytes_per_token(config, llama.runner.cache.dtype) == expected
    assert llama.core.pool.num_blocks * llama.runner.block_size * expected <= 2 * 256 * 4 * expected


def test_q8_0_kv_values_round_trip_within_half_a_step():
    """q8_0 as the KV cache stores it (llama.cpp's q8_0, with a float32 scale): every value within half a
    quantization step of the original, an all-zero block stored as zeros, reads back through Q8Cache's indexing."""
    from lamina.engine.kv_cache import Q8Cache, dequantize_q8, quantize_q8

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 100.0, 1e-3])[:, None]
    x[2, :32] = 0
    q, scale = quantize_q8(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 2) and float(scale[2, 0]) == 0
    back = dequantize_q8(q, scale)
    step = scale.repeat_interleave(32, -1)
    assert bool(((back - x).abs() <= step / 2 + 1e-7 * x.abs()).all()) and bool((back[2, :32] == 0).all())
    cache = Q8Cache((4, 3, 8, 64), torch.device("cpu"))
    cache[torch.tensor([2]), :, torch.tensor([5])] = x[None]
    assert torch.equal(cache[2, :, 5], back) and torch.equal(Q8Cache.round(x), back)


def test_kv_cache_dtypes_cost_within_bounds(fp32):
    """Quality of each KV-cache kind against a float32 cache on the same GGUF blocks: the held passage's perplexity
    and its log-probabilities, and greedy chat replies. Measured on the default model (AMD EPYC, this commit):
    perplexity 7.9069 (f32), 7.9073 (f16), 7.9187 (bf16), 7.9719 (q8_0); mean |dlogprob| 0.0005 / 0.0042 / 0.0202
    (max 0.0028 / 0.039 / 0.223); greedy replies to 6 prompts (64 tokens) identical for f16 and bf16, 4 of 6 for
    q8_0. Even f16 moves log-probabilities past the 1e-3 that lamina keeps to transformers' (and the float32 model's
    two decode paths to each other): the default stays the model's dtype."""
    ref = lamina.load(device="cpu", dtype="float32", max_seq_len=512, kv_cache_dtype="f32")
    ids = ref.tokenizer.encode(PASSAGE, bos=ref.tokenizer.add_bos, eos=False)
    theirs = _prompt_logprobs(ref, ids)
    expected = ref.chat_completion(DIALOGS, temperature=0, max_gen_len=20)
    bounds = {"f16": (0.001, 0.002, 0.01), "bf16": (0.005, 0.01, 0.1), "q8_0": (0.02, 0.04, 0.5)}
    for kind, (ppl_bound, mean_bound, max_bound) in bounds.items():
        llama = lamina.load(device="cpu", dtype="float32", max_seq_len=512, kv_cache_dtype=kind)
        ours = _prompt_logprobs(llama, ids)
        ppl = [math.exp(-sum(lps) / len(lps)) for lps in (ours, theirs)]
        gaps = [abs(a - b) for a, b in zip(ours, theirs)]
        assert abs(ppl[0] / ppl[1] - 1) < ppl_bound, (kind, ppl)
        assert sum(gaps) / len(gaps) < mean_bound and max(gaps) < max_bound, (kind, sum(gaps) / len(gaps), max(gaps))
        if kind != "q8_0":
            assert llama.chat_completion(DIALOGS, temperature=0, max_gen_len=20) == expected, kind
    assert lamina.load(device="cpu", max_seq_len=64).runner.cache.dtype == torch.float32  # the default: "auto"
