"""The official `openai` Python client talking to `cascade serve`.

Run by scripts/python-client-test.sh, which starts the gateway (with the real
SmolLM2 model) in front of the mock upstream and sets CASCADE_URL.
"""

import os

import openai
import pytest

BASE_URL = os.environ.get("CASCADE_URL", "http://127.0.0.1:8080/v1")
LOCAL = os.environ.get("CASCADE_LOCAL_MODEL", "smollm2")
REMOTE = os.environ.get("CASCADE_REMOTE_MODEL", "mock")
EASY = "What is the capital of France? Answer with the city name only."


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_cascade_the_local_and_the_remote_model(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["cascade", LOCAL, REMOTE]


def test_chat_through_the_cascade(client):
    raw = client.chat.completions.with_raw_response.create(
        model="cascade", messages=[{"role": "user", "content": EASY}], max_tokens=12
    )
    assert raw.headers["x-cascade-route"] in ("local", "remote")
    assert raw.headers["x-request-id"]
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens > 0


def test_chat_streamed(client):
    stream = client.chat.completions.create(
        model="cascade",
        messages=[{"role": "user", "content": EASY}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text
    assert usage is not None and usage.total_tokens > 0


def test_completions_from_the_local_model(client):
    completion = client.completions.create(model=LOCAL, prompt="The capital of France is", max_tokens=6)
    assert completion.choices[0].text


def test_completions_streamed(client):
    stream = client.completions.create(model=LOCAL, prompt="The capital of France is", max_tokens=6, stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text


def test_remote_model_answer_comes_from_the_upstream(client):
    completion = client.chat.completions.create(
        model=REMOTE, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
    )
    assert completion.choices[0].message.content.startswith("Mock answer from")
    stream = client.completions.create(model=REMOTE, prompt="Hello", max_tokens=8, stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text.startswith("Mock answer from")


def test_unknown_model_is_a_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    assert info.value.body["code"] == "model_not_found"


def test_invalid_parameter_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="cascade", messages=[{"role": "user", "content": "Hi"}], temperature=5
        )
