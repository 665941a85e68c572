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


def checkpoint(api, tmp_path, owner_key="tml-owner", name="pushed", st=None) -> str:
    """A sampler checkpoint of a run pushed hard towards continuing any prompt with token 42."""
    st = st or api.st
    trainer, model_id = st.trainer, f"s-{name}:train:0"
    trainer.create_adapter(model_id, "tiny", AdapterSpec(rank=4, seed=1))
    tokens = np.array(PROMPT + [42] * 4, dtype=np.int64)
    datum = Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": np.ones(7, np.float32)})
    for _ in range(3):
        trainer.forward_backward(ForwardBackwardCall(model_id, 0, "cross_entropy", {}, False, [datum]))
        trainer.optim_step(model_id, AdamParams(learning_rate=0.05))
    folder, path = tmp_path / name, tinker_path(model_id, "sampler_weights", name)
    trainer.save_sampler_weights(model_id, folder)
    st.store.add_checkpoint(path, model_id, identity(owner_key), "sampler_weights", name, str(folder), "tiny")
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


def _documented_openai_parameters():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("compatibility", Path(__file__).parents[2] / "docs" / "compatibility.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFUSED_EXAMPLES = {
    "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "logit_bias": {"5": 1},
    "response_format": {"type": "json_schema", "json_schema": {}}, "tools": [{"type": "function"}], "tool_choice": "auto",
    "functions": [{"name": "f"}], "function_call": "auto", "audio": {"voice": "alloy"}, "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"}, "web_search_options": {}, "suffix": "x",
}


def test_every_parameter_docs_compatibility_refuses_answers_400_naming_it(api):
    docs = _documented_openai_parameters()
    refused = [(route, name) for route, name, status, _ in docs.OPENAI if status == docs.REFUSED]
    assert {name for _, name in refused} == set(REFUSED_EXAMPLES)
    for route, name in refused:
        for path in {"chat": ["/v1/chat/completions"], "completions": ["/v1/completions"],
                     "both": ["/v1/chat/completions", "/v1/completions"]}[route]:
            body = {"model": "tiny", "messages": MESSAGES, "prompt": "ab", "max_tokens": 2, name: REFUSED_EXAMPLES[name]}
            r = api.post(path, json=body, headers={"Authorization": "Bearer tml-owner"})
            assert r.status_code == 400 and r.json()["error"]["param"] == name, (path, name, r.text)


def test_random_openai_bodies_get_a_4xx_or_an_answer_never_a_500(tmp_path):
    from hypothesis import HealthCheck, given, settings
    import string

    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(-1, 3), st.text(max_size=6),
                       st.just("tiny"), st.just("tinker://s:train:0/sampler_weights/x"))
    value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.sampled_from(["role", "content", "type", "text",
                                                                                          "include_usage"]), inner, max_size=3)),
                         max_leaves=6)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "system", "assistant", "tool", 3]),
                                     "content": st.one_of(st.text(string.printable, max_size=8), value)})
    unset_or = lambda *good: st.one_of(st.none(), *good, value)  # noqa: E731 - mostly valid, sometimes wild
    body = st.fixed_dictionaries({"model": st.sampled_from(["tiny", "tiny", "tiny;tinker://a/b/c", 5, "nope"]),
                                  "messages": st.one_of(st.lists(message, min_size=1, max_size=3), value),
                                  "prompt": st.one_of(st.text(string.printable, min_size=1, max_size=8), value),
                                  "max_tokens": st.one_of(st.integers(1, 4), st.sampled_from([0, -1, 10**9, "5", 2.5, []]))},
                             optional={
        "n": unset_or(st.integers(1, 3)), "temperature": unset_or(st.floats(0, 2)), "top_p": unset_or(st.floats(0.1, 1)),
        "top_k": unset_or(st.integers(-1, 5)), "seed": unset_or(st.integers()), "stop": unset_or(st.text(min_size=1)),
        "logprobs": unset_or(st.booleans(), st.integers(0, 3)), "top_logprobs": unset_or(st.integers(0, 3)),
        "echo": unset_or(st.booleans()), "stream": unset_or(st.booleans()),
        "stream_options": unset_or(st.just({"include_usage": True}))})
    clients = app_client(tmp_path)
    api = next(clients)
    api.st.tokenizers.folders["tiny"] = write_char_tokenizer(tmp_path / "tokenizer")

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=body)
    def check(route, body):
        r = api.post(route, json=body, headers={"Authorization": "Bearer tml-owner"})
        assert r.status_code in (200, 400, 404), r.text
        statuses.add(r.status_code)
        if r.status_code != 200:
            assert r.json()["error"]["message"]

    statuses: set[int] = set()
    try:
        check()
    finally:
        clients.close()
    assert statuses == {200, 400, 404}  # the fuzz reached the sampler, the checks and the model lookup
