"""The `lamina` command end to end, as a subprocess: output, streaming, JSON, exit codes and error lines."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import lamina

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def run(*args, stdin=None, timeout=120):
    # stdin is a pipe (empty unless given), never the terminal pytest runs in
    return subprocess.run(
        [sys.executable, "-m", "lamina", *args],
        input=stdin or "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


@pytest.fixture(scope="module")
def smol():
    return lamina.load(device="cpu", dtype="float32", max_seq_len=512)


def test_generate_json_equals_the_python_api(smol):
    out = run(
        "generate",
        "The capital of France is",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--json",
        "--max-seq-len",
        "512",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"prompt_ids", "ids", "text", "logprobs", "finish_reason"}
    prompt_ids = smol.tokenizer.encode("The capital of France is", bos=smol.tokenizer.add_bos, eos=False)
    (expected,) = smol.complete([prompt_ids], 12, temperature=0, logprobs=True)
    assert result["prompt_ids"] == prompt_ids and result["ids"] == expected.tokens
    assert result["text"] == smol.tokenizer.decode(expected.tokens)
    assert result["logprobs"] == pytest.approx(expected.logprobs, abs=1e-4)
    assert result["finish_reason"] == expected.finish_reason


def test_the_readmes_first_command_answers_right():
    """README command 1's question to the default model, asked as the README asks it: the reply names Paris (greedy,
    so it does by the model's own most likely tokens, not by a lucky seed)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.startswith("python3 -m venv"))
    command = next(part.strip() for part in first.split("&&") if part.strip().startswith("lamina "))
    args = shlex.split(command)[1:]
    assert "--temperature" in args and args[args.index("--temperature") + 1] == "0", command
    out = run(*args)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout, out.stdout


def test_generate_streams_text_from_stdin_and_chat(smol):
    out = run(
        "generate",
        "--chat",
        "--max-tokens",
        "30",
        "--temperature",
        "0",
        "--max-seq-len",
        "512",
        stdin="What is the capital of France?",
    )
    assert out.returncode == 0, out.stderr
    (reply,) = smol.chat_completion(
        [[{"role": "user", "content": "What is the capital of France?"}]], temperature=0, max_gen_len=30
    )
    assert out.stdout == reply["generation"]["content"] + "\n"
    assert "Paris" in out.stdout  # the embedded model speaks English
    assert out.stderr == ""  # no progress bar when stderr is not a terminal


def test_chat_session_from_stdin():
    out = run(
        "chat",
        "--system",
        "Answer briefly.",
        "--max-tokens",
        "20",
        "--temperature",
        "0",
        "--max-seq-len",
        "512",
        stdin="Hello!\nWhat is 2 + 2?\n",
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) >= 2


def test_quantized_generation(smol):
    for mode in ("int8", "int4"):
        out = run(
            "generate",
            "The capital of France is",
            "-n",
            "4",
            "-t",
            "0",
            "--quantize",
            mode,
            "--json",
            "--max-seq-len",
            "128",
        )
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["ids"]) <= 4


def test_info():
    out = run("info", "--max-seq-len", "256")
    assert out.returncode == 0, out.stderr
    for expected in (
        "format: gguf",
        "layers: 30",
        "vocabulary: 49152",
        "context length: 8192",
        "tokenizer: HFTokenizer",
        "chat template: yes",
        "tied embeddings: yes",
    ):
        assert expected in out.stdout
    from lamina import kernels

    path = "native C" if kernels.available() else "PyTorch, eager"
    assert f"decode step: {path}" in out.stdout


def test_info_says_the_speculative_config():
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
    out = run("info", "--max-seq-len", "256", "--speculative-config", spec)
    assert out.returncode == 0, out.stderr
    assert "speculative: prompt lookup of 1..3-grams, up to 4 tokens a step" in out.stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (
            ["generate", "hi", "--model", "/no/such/model.gguf"],
            1,
            "lamina: error: model path not found: /no/such/model.gguf",
        ),
        (
            ["generate", "hi", "--temperature", "-1"],
            2,
            "argument --temperature/-t: -1 is out of range: expected a number >= 0",
        ),
        (["generate", "hi", "--top-p", "0"], 2, "expected a number in (0, 1]"),
        (
            ["generate", "--max-seq-len", "64"],
            1,
            "lamina: error: no prompt: give one as an argument or pipe it on stdin",
        ),
        (["generate", "", "--max-seq-len", "64"], 1, "lamina: error: no prompt: give one as an argument"),
        (["generate", "  \n", "--max-seq-len", "64"], 1, "(the one given is empty or only whitespace)"),
        (["generate", "hi", "--max-tokens", "100", "--max-seq-len", "64"], 1, "exceed max_seq_len 64"),
        (["generate", "hi", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["generate", "hi", "--max-tokens", "many"], 2, "invalid value 'many': expected an integer >= 0"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["generate", "hi", "--seed", "99999999999999999999"], 2, "expected a 64-bit integer"),
        (["generate", "hi", "--quantize", "int3"], 2, "invalid choice: 'int3'"),
        (["serve", "--port", "70000"], 2, "70000 is out of range: expected a port number"),
        (["serve", "--max-batch-size", "0"], 2, "0 is out of range: expected an integer > 0"),
        (["serve", "--kv-cache-memory", "lots"], 2, "invalid value 'lots': expected a size such as 512M or 2G"),
        (["serve", "--model", "/no/such.gguf"], 1, "lamina: error: model path not found: /no/such.gguf"),
    ],
)
def test_errors_are_one_line(args, code, message):
    out = run(*args)
    assert out.returncode == code
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    if code == 1:
        assert len(out.stderr.strip().splitlines()) == 1
