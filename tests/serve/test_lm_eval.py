"""EleutherAI's lm-evaluation-harness (`lm-eval`, model `local-completions`: how people evaluate a vLLM server)
against `lamina serve`, with its remote tokenizer (our /tokenize, /detokenize, /tokenizer_info) and three local tasks,
one per request kind: multiple choice (loglikelihood), perplexity (loglikelihood_rolling) and generate_until. Its
loglikelihoods must equal lamina's own offline scoring of the same token ids."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval  # noqa: F401  (a test dependency: missing, this file fails rather than skips)
import pytest

import lamina
from lamina.serve.app import create_app

from .test_server import _serve

MC = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "Berlin"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Fahrenheit"], "answer": 0},
    {"question": "One, two, three,", "choices": ["four", "seven", "blue"], "answer": 0},
]
# Answers the model often ends with its stop token (the greedy token after " Earth." is end-of-text): lm-eval asks
# for one token after each (context + continuation) and drops the last logprobs entry as that token, so a server
# that gives the stop token no entry loses the continuation's own last token instead (OpenAI and vLLM give it one).
MC_STOP = [
    {"question": q, "choices": choices, "answer": 0}
    for q, choices in [
        ("Which planet do we live on?", ["Earth.", "Mars.", "Jupiter."]),
        ("Which star does the Earth orbit?", ["The Sun.", "Sirius.", "The Moon."]),
        ("What is the largest ocean?", ["The Pacific Ocean.", "The Atlantic Ocean.", "The Arctic Ocean."]),
        ("Which continent is Egypt in?", ["Africa.", "Asia.", "Europe."]),
        ("What is the closest planet to the Sun?", ["Mercury.", "Venus.", "Neptune."]),
        ("What language is spoken in Brazil?", ["Portuguese.", "Spanish.", "French."]),
        ("Which planet is known as the Red Planet?", ["Mars.", "Venus.", "Saturn."]),
        ("What do bees make?", ["Honey.", "Milk.", "Silk."]),
    ]
]
PPL = [
    {"text": "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."},
    {"text": "Once upon a time, there lived a king who had three daughters."},
]
GEN = [
    {"question": "Q: What is the capital of France?\nA:", "answer": " Paris"},
    {"question": "1, 2, 3, 4,", "answer": " 5"},
]
TASKS = {
    "lamina_mc": (
        MC,
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n',
    ),
    "lamina_stop_mc": (
        MC_STOP,
        'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n',
    ),
    "lamina_ppl": (
        PPL,
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n",
    ),
    "lamina_gen": (
        GEN,
        'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
    ),
}


def _write_tasks(folder: Path) -> None:
    for name, (rows, spec) in TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        header = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        )
        (folder / f"{name}.yaml").write_text(header + spec)


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_local_completions_against_lamina_serve(tmp_path):
    llama = lamina.load(max_batch_size=4, max_seq_len=512)
    app = create_app(llama, model_name="smollm2")
    received: list[list[int]] = []  # every prompt the server was sent, as ids
    loop = app.state.engine_loop
    submit = loop.submit

    async def recording(requests):
        received.extend(r.prompt for r in requests)
        return await submit(requests)

    loop.submit = recording
    server, thread, url = _serve(app)
    _write_tasks(tmp_path)
    try:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "lm_eval",
                "--model",
                "local-completions",
                "--model_args",
                f"base_url={url}/v1/completions,model=smollm2,tokenizer_backend=remote,num_concurrent=1,max_retries=1,"
                "max_length=512",
                "--tasks",
                ",".join(TASKS),
                "--include_path",
                str(tmp_path),
                "--output_path",
                str(tmp_path / "out"),
                "--log_samples",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
            env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    def encode(text: str) -> list[int]:  # what lm-eval's remote tokenizer gets from /tokenize
        return llama.tokenizer.encode(text, bos=False, eos=False, allowed_special="all")

    def score(ids: list[int]) -> list[float]:
        return llama.generate([ids], 0, logprobs=True, echo=True)[1][0]

    # loglikelihood: lm-eval's (context, continuation) split, scored offline on the same ids; the accuracy that
    # follows from the offline scores.
    stopped = 0  # continuations the model follows with a stop token (greedy), which lm-eval asks for
    for task in ("lamina_mc", "lamina_stop_mc"):
        correct = 0
        for sample in _samples(tmp_path / "out", task):
            offline = []
            for args, resp in zip(sample["arguments"].values(), sample["resps"]):
                context, continuation = args["arg_0"], args["arg_1"]
                context_ids = encode(context)
                whole = encode(context + continuation)
                assert any(p[: len(whole)] == whole for p in received)
                offline.append(sum(score(whole)[len(context_ids) :]))
                assert float(resp[0][0]) == pytest.approx(offline[-1], abs=2e-3), (context, continuation)
                stopped += llama.generate([whole], 1, temperature=0)[0] == [[]]
            correct += max(range(len(offline)), key=offline.__getitem__) == sample["doc"]["answer"]
        results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
        assert results[task]["acc,none"] == pytest.approx(correct / len(_samples(tmp_path / "out", task)))
    assert stopped >= 8, "the stop-token case is not exercised"
    # loglikelihood_rolling: one window here, a prefix token then the text.
    for sample in _samples(tmp_path / "out", "lamina_ppl"):
        ids = encode(sample["doc"]["text"])
        (prompt,) = [p for p in received if p[1:] == ids]
        assert float(sample["resps"][0][0]) == pytest.approx(sum(score(prompt)[1:]), abs=5e-3)
    # generate_until: the greedy continuation, cut at the stop sequence.
    for sample in _samples(tmp_path / "out", "lamina_gen"):
        (tokens,), _ = llama.generate([encode(sample["doc"]["question"])], 8, temperature=0)
        assert sample["resps"][0][0] == llama.tokenizer.decode(tokens).split("\n")[0]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert results["lamina_mc"]["acc,none"] == 1.0
