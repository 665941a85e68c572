"""The OpenAI-compatible routes on the tiny random model, in-process, driven by the official `openai` client
(its HTTP client is the app's TestClient): the checkpoint's adapter answers on both routes (the same
tokens and logprobs as the SDK's asample with the same seed), streaming gives the non-streamed text,
auth and isolation, and every refusal in OpenAI's error shape naming the field."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from tests.app_client import OWNER_KEY, app_client, future_result
from tests.openai_tokenizer import write_char_tokenizer
from tinkerd.control.chat_tokenizer import ChatTokenizer
from tinkerd.engine.interface import AdapterSpec
from tinkerd.protocol.paths import tinker_path
from tinkerd.protocol.types import AdamParams, Datum, ForwardBackwardCall
from tinkerd.server.auth import identity

PROMPT = [3, 5, 7, 9]
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def api(tmp_path):
    for client in app_client(tmp_path):
        client.st.tokenizers.folders["tiny"] = write_char_tokenizer(tmp_path / "tokenizer")
        client.tokenizer = ChatTokenizer(tmp_path / "tokenizer")
        yield client


def oai(api, key="tml-owner", prefix="/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://testserver{prefix}", api_key=key, http_client=api, max_retries=0)


def checkpoint(api, tmp_path, owner_key="tml-owner", name="pushed") -> str:
    """A sampler checkpoint of a run pushed hard towards continuing any prompt with token 42."""
    trainer, model_id = api.st.trainer, f"s-{name}:train:0"
    trainer.create_adapter(model_id, "tiny", AdapterSpec(rank=4, seed=1))
    tokens = np.array(PROMPT + [42] * 4, dtype=np.int64)
    datum = Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": np.ones(7, np.float32)})
    for _ in range(3):
        trainer.forward_backward(ForwardBackwardCall(model_id, 0, "cross_entropy", {}, False, [datum]))
        trainer.optim_step(model_id, AdamParams(learning_rate=0.05))
    folder, path = tmp_path / name, tinker_path(model_id, "sampler_weights", name)
    trainer.save_sampler_weights(model_id, folder)
    api.st.store.add_checkpoint(path, model_id, identity(owner_key), "sampler_weights", name, str(folder), "tiny")
    return path


def sdk_sample(api, prompt, model_path=None, n=1, seed=5, max_tokens=6):
    body = {"prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]}, "num_samples": n,
            "sampling_params": {"max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stop": []},
            **({"model_path": model_path} if model_path else {"base_model": "tiny"})}
    r = api.post("/api/v1/asample", json=body, headers=OWNER_KEY)
    assert r.status_code == 200, r.text
    return future_result(api, r.json()["request_id"])["sequences"]


def test_the_checkpoint_answers_on_both_routes_with_the_sdk_samples_tokens(api, tmp_path):
    path = checkpoint(api, tmp_path)
    client = oai(api)
    for model in (path, f"tiny;{path}"):
        done = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, seed=5, n=2, logprobs=0)
        expected = sdk_sample(api, PROMPT, path, n=2)
        for choice, seq in zip(done.choices, expected):
            assert choice.logprobs.token_logprobs == pytest.approx(seq["logprobs"], abs=1e-5)
            assert choice.text == api.tokenizer.decode(seq["tokens"])
    prompt = api.tokenizer.encode(api.tokenizer.render(MESSAGES))
    chat = client.chat.completions.create(model=path, messages=MESSAGES, max_tokens=6, seed=5, logprobs=True)
    expected = sdk_sample(api, prompt, path)[0]
    assert [e.logprob for e in chat.choices[0].logprobs.content] == pytest.approx(
        [lp for t, lp in zip(expected["tokens"], expected["logprobs"]) if t not in api.tokenizer.special_ids], abs=1e-5)
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, seed=5, logprobs=0)
    assert base.choices[0].logprobs.token_logprobs == pytest.approx(sdk_sample(api, PROMPT)[0]["logprobs"], abs=1e-5)
    assert base.choices[0].logprobs.token_logprobs != pytest.approx(done.choices[0].logprobs.token_logprobs, abs=1e-3)
    assert chat.usage.prompt_tokens == len(prompt) and chat.usage.completion_tokens == 6


def test_streaming_gives_the_same_text_and_usage_as_the_whole_answer(api):
    client = oai(api, prefix="/oai/api/v1")
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, seed=9, n=2)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, seed=9, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed, finish = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        assert chunk.object == "chat.completion.chunk" and chunk.usage is None
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 6  # token by token, not one chunk at the end
    assert streamed == {c.index: c.message.content for c in whole.choices}
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24 == whole.usage.completion_tokens
    raw = api.post("/v1/completions", headers={"Authorization": "Bearer tml-owner"},
                   json={"model": "tiny", "prompt": "ab", "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.text.endswith("data: [DONE]\n\n")


def test_models_lists_base_models_and_the_callers_readable_checkpoints(api, tmp_path):
    mine, theirs = checkpoint(api, tmp_path, name="mine"), checkpoint(api, tmp_path, "tml-other", name="theirs")
    assert [m.id for m in oai(api).models.list().data] == ["tiny", mine]
    assert oai(api).models.retrieve(mine).owned_by == "you"
    with pytest.raises(openai.NotFoundError) as err:
        oai(api).chat.completions.create(model=theirs, messages=MESSAGES, max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    api.st.store.set_checkpoint_public(theirs, True)
    listed = oai(api).models.list().data
    assert [m.id for m in listed] == ["tiny", theirs, mine] and listed[1].owned_by == "public"  # newest first
    assert oai(api).completions.create(model=theirs, prompt=PROMPT, max_tokens=2).choices[0].finish_reason == "length"


@pytest.mark.parametrize("override, param", [
    ({"n": 1000}, "n"), ({"temperature": 5}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 500}, "max_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"top_logprobs": 3}, "top_logprobs"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"stop": [1, 2]}, "stop"), ({"model": "tinker://x/y"}, "model"),
])
def test_bad_chat_requests_answer_400_naming_the_field(api, override, param):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **override}
    r = api.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer tml-owner"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param.split("[")[0] in error["message"] and error["type"] == "invalid_request_error"


def test_completions_refusals_and_harmless_fields(api):
    headers = {"Authorization": "Bearer tml-owner"}
    for body, param in [({"suffix": "x"}, "suffix"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"),
                        ({"best_of": 3}, "best_of"), ({"prompt": [999]}, "prompt")]:
        r = api.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 2, **body}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    ok = api.post("/v1/chat/completions", headers=headers, json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": 2, "user": "u1", "metadata": {"a": "b"}, "store": False,
        "presence_penalty": 0, "response_format": {"type": "text"}, "some_future_field": 1})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    bad_json = api.post("/v1/chat/completions", content=b"{not json", headers=headers)
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]


def test_keys_and_the_full_queue(api):
    with pytest.raises(openai.AuthenticationError) as err:
        oai(api, key="not-a-tml-key").models.list()
    assert err.value.body["code"] == "invalid_api_key"
    r = api.get("/v1/models")
    assert r.status_code == 401 and "Authorization" in r.json()["error"]["message"]
    api.st.config.max_pending_samples = 0
    r = api.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES},
                 headers={"Authorization": "Bearer tml-owner"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "rate_limit_exceeded"
