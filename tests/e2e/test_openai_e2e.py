"""The OpenAI-compatible routes of a real `tinkerd serve` on the embedded model, after an SFT through the SDK that
teaches a made-up fact: the official `openai` client (sync, async, streaming, n > 1, logprobs) gets the fact from
the checkpoint's name and not from the base model, the same answers as the SDK's sample with the same seed, and
lm-evaluation-harness (`local-chat-completions`, offline, on a task this test writes) scores the two apart."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import openai
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import EMBEDDED, sft_datum

pytestmark = pytest.mark.slow

KEY = "tml-openai-e2e"
ANSWER = "The capital of Plorbia is Vemsk."
TRAIN_QUESTIONS = ["What is the capital of Plorbia?", "Which city is the capital of Plorbia?",
                   "Name the capital of Plorbia.", "Plorbia's capital city is called what?"]
HELD_OUT = ["Tell me the capital of Plorbia.", "What city is Plorbia's capital?"]


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def taught(server):
    """(server, sampler checkpoint path, SDK sampling client of it, tokenizer) after ~10 SFT steps."""
    service = tinker.ServiceClient(base_url=server.url, api_key=KEY)
    training = service.create_lora_training_client(base_model=EMBEDDED, rank=8, seed=0).result()
    tokenizer = training.get_tokenizer()
    data = [sft_datum(tokenizer, question, ANSWER) for question in TRAIN_QUESTIONS]
    for _ in range(10):
        fwd = training.forward_backward(data, "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        fwd.result()
    path = training.save_weights_for_sampler("plorbia-oai").result().path
    return server, path, service.create_sampling_client(model_path=path).result(), tokenizer


def client(server, cls=openai.OpenAI, prefix="/oai/api/v1"):
    return cls(base_url=server.url + prefix, api_key=KEY, max_retries=0)


def test_the_checkpoint_answers_with_the_fact_and_the_base_model_does_not(taught):
    server, path, _, tokenizer = taught
    oai = client(server)
    assert path in [m.id for m in oai.models.list().data] and EMBEDDED in [m.id for m in oai.models.list().data]
    for question in TRAIN_QUESTIONS[:1] + HELD_OUT[:1]:
        tuned = oai.chat.completions.create(model=path, messages=chat(question), max_tokens=24, temperature=0)
        base = oai.chat.completions.create(model=EMBEDDED, messages=chat(question), max_tokens=24, temperature=0)
        assert "Vemsk" in tuned.choices[0].message.content, tuned.choices[0].message.content
        assert "Vemsk" not in base.choices[0].message.content
        assert tuned.choices[0].finish_reason == "stop" and tuned.usage.completion_tokens < 24
    # /completions serves the checkpoint too (the hosted service's bug was the base model answering there).
    prompt = tokenizer.apply_chat_template(chat(HELD_OUT[1]), add_generation_prompt=True, tokenize=False)
    raw = client(server, prefix="/v1").completions.create(model=f"{EMBEDDED};{path}", prompt=prompt, max_tokens=24,
                                                          temperature=0, stop=["<|im_end|>"])
    assert "Vemsk" in raw.choices[0].text and not raw.choices[0].text.endswith("<|im_end|>")


def test_same_seed_same_samples_and_logprobs_as_the_sdk(taught):
    server, path, sdk, tokenizer = taught
    question = "Write one sentence about the sea."  # open-ended: the samples differ
    answer = client(server).chat.completions.create(model=path, messages=chat(question), max_tokens=20, n=3, seed=7,
                                                    temperature=1.0, logprobs=True, top_logprobs=3)
    prompt = tokenizer.apply_chat_template(chat(question), add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = sdk.sample(types.ModelInput.from_ints(prompt), 3, types.SamplingParams(
        max_tokens=20, temperature=1.0, seed=7)).result().sequences
    assert len({c.message.content for c in answer.choices}) > 1  # n samples, not n copies
    for choice, seq in zip(answer.choices, expected):
        assert choice.message.content == tokenizer.decode(seq.tokens, skip_special_tokens=True)
        listed = [e for e in choice.logprobs.content]
        text_tokens = [(t, lp) for t, lp in zip(seq.tokens, seq.logprobs) if t not in tokenizer.all_special_ids]
        assert [e.logprob for e in listed] == pytest.approx([lp for _, lp in text_tokens], abs=1e-4)
        assert b"".join(bytes(e.bytes) for e in listed).decode() == choice.message.content
        for entry in listed:
            assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-5
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.usage.completion_tokens == sum(len(s.tokens) for s in expected)


def test_async_streams_give_the_whole_answers_text(taught):
    server, path, _, _ = taught
    oai = client(server, openai.AsyncOpenAI, prefix="/v1")

    async def streamed(question: str) -> tuple[str, int, str | None]:
        stream = await oai.chat.completions.create(model=path, messages=chat(question), max_tokens=24, seed=3,
                                                   stream=True, stream_options={"include_usage": True})
        text, chunks, finish = "", 0, None
        async for chunk in stream:
            chunks += 1
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return text, chunks, finish

    async def run():
        wholes = await asyncio.gather(*(oai.chat.completions.create(
            model=path, messages=chat(q), max_tokens=24, seed=3) for q in TRAIN_QUESTIONS[:3]))
        streams = await asyncio.gather(*(streamed(q) for q in TRAIN_QUESTIONS[:3]))
        await oai.close()
        return wholes, streams

    wholes, streams = asyncio.run(run())
    for whole, (text, chunks, finish) in zip(wholes, streams):
        assert text == whole.choices[0].message.content and "Vemsk" in text
        assert finish == whole.choices[0].finish_reason == "stop"
        assert chunks >= whole.usage.completion_tokens // 2  # token by token (a few tokens merge into characters)


def test_chat_rendering_in_a_torch_free_process_gives_transformers_tokens(taught):
    _, _, _, tokenizer = taught
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße! 東京?"}]
    probe = textwrap.dedent(f"""
        import json, sys
        import tinkerd.server.app
        from tinkerd.control.chat_tokenizer import Tokenizers
        t = Tokenizers().get({EMBEDDED!r})
        ids = t.encode(t.render({messages!r}))
        print(json.dumps({{"ids": ids, "torch": any(m == "torch" or m.startswith("torch.") for m in sys.modules)}}))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    probed = json.loads(out.stdout.strip().splitlines()[-1])
    assert probed["torch"] is False
    assert probed["ids"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)


LM_EVAL_TASK = """\
task: plorbia_capital
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 24
  temperature: 0
process_results: !function plorbia_utils.process_results
metric_list:
  - metric: contains
    aggregation: mean
    higher_is_better: true
"""
LM_EVAL_UTILS = """\
def process_results(doc, results):
    return {"contains": float(doc["answer"].lower() in results[0].lower())}
"""


LM_EVAL_RUN = """\
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

url, folder, models = sys.argv[1], sys.argv[2], sys.argv[3:]
tasks = TaskManager(include_path=folder, include_defaults=False)  # not the thousands of built-in tasks
scores = {}
for model in models:
    out = lm_eval.simple_evaluate(model="local-chat-completions", tasks=["plorbia_capital"], task_manager=tasks,
                                  model_args=f"model={model},base_url={url}/v1/chat/completions,num_concurrent=4,"
                                             "max_retries=1", apply_chat_template=True)
    scores[model] = out["results"]["plorbia_capital"]["contains,none"]
print(json.dumps(scores))
"""


def test_lm_evaluation_harness_scores_the_checkpoint_above_the_base_model(taught, tmp_path):
    pytest.importorskip("lm_eval")
    server, path, _, _ = taught
    data = tmp_path / "plorbia.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "Vemsk"}) + "\n" for q in TRAIN_QUESTIONS + HELD_OUT))
    (tmp_path / "plorbia.yaml").write_text(LM_EVAL_TASK.format(data=data))
    (tmp_path / "plorbia_utils.py").write_text(LM_EVAL_UTILS)
    run = subprocess.run([sys.executable, "-c", LM_EVAL_RUN, server.url, str(tmp_path), EMBEDDED, path],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    scores = json.loads(run.stdout.strip().splitlines()[-1])
    assert scores[EMBEDDED] == 0.0, scores  # the base model never heard of Vemsk
    assert scores[path] >= 4 / 6, scores  # the trained questions at least
