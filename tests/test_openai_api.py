"""The OpenAI-compatible /v1 API, driven with the official `openai` client against a live server."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from backend.contracts import VisualReply
from backend.errors import ModelNotReady, ServerBusy
from backend.images import ImageLimits
from backend.models.holder import LoadStatus
from backend.openai_server.responses import Interleaved
from backend.openai_server.routes import build_openai_router
from backend.openai_server.schema import (
    IMAGE_ONLY_QUESTION,
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    plan_choices,
    to_conversation,
)
from backend.prompting import Turn
from backend.remote.client import BackendError
from backend.replies import Reply
from backend.settings import ServerLimits

KEY = "test-key"
MAX_CHARS = 2000


@contextlib.contextmanager
def serving(app):
    """Run `app` with uvicorn in a thread on a free port of 127.0.0.1; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def data_url(image: Image.Image, image_format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return f"data:image/{image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


# ----------------------------------------------------------------------------- pure mapping rules


def messages(*pairs) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in pairs]


def test_conversation_mapping():
    conversation = to_conversation(
        messages(
            ("system", "Be brief."),
            ("user", "a"),
            ("assistant", "b"),
            ("developer", "No lists."),
            ("user", "c"),
            ("user", "d"),
        ),
        MAX_CHARS,
        1000,
    )
    assert conversation.system_prompt == "Be brief.\n\nNo lists."
    assert conversation.history == [Turn("a", "b")]
    assert conversation.message == "c\n\nd"  # consecutive user messages read as one
    assert conversation.image is None
    png = data_url(Image.new("RGB", (4, 4), "red"))
    parts = [{"type": "image_url", "image_url": {"url": png}}]
    with_image = to_conversation([ChatMessage(role="user", content=parts)], MAX_CHARS, 10_000)
    assert with_image.message == IMAGE_ONLY_QUESTION and with_image.image.startswith(b"\x89PNG")
    with pytest.raises(ApiError, match="last message must be the user's"):
        to_conversation(messages(("user", "a"), ("assistant", "b")), MAX_CHARS, 1000)
    with pytest.raises(ApiError, match="remote URLs are not fetched") as refused:
        url = [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]
        to_conversation([ChatMessage(role="user", content=url)], MAX_CHARS, 1000)
    assert refused.value.param == "messages[0].content[0].image_url.url"


def test_settings_mapping_defaults_seeds_and_beam_width():
    limits = ServerLimits(max_new_tokens=64)

    def plan(**fields):
        request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)
        return plan_choices(request, limits, 256)

    [default] = plan(seed=3)
    # OpenAI's defaults, not the UI's: no top-k, no repetition penalty, temperature 1.
    assert (default.temperature, default.top_k, default.top_p, default.repetition_penalty) == (
        1.0,
        0,
        1.0,
        1.0,
    )
    assert default.max_new_tokens == 64 and default.mode == "sample"
    assert [s.seed for s in plan(n=3, seed=10)] == [10, 11, 12]
    assert plan(temperature=0)[0].mode == "greedy"
    assert plan(top_k=-1)[0].top_k == 0  # vLLM's "off"
    assert plan(stop="END", max_completion_tokens=5)[0].stop_words == ("END",)
    [beam] = plan(use_beam_search=True, n=3)  # vLLM >= 0.6: n is the width; one (best) beam returns
    assert (beam.mode, beam.num_beams) == ("beam", 3)
    assert plan(use_beam_search=True, best_of=5, n=1)[0].num_beams == 5  # vLLM < 0.6
    assert plan(num_beams=2)[0].mode == "beam"
    for fields, param in [
        ({"max_tokens": 65}, "max_tokens"),
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"n": 9}, "n"),
    ]:
        with pytest.raises(ApiError) as refused:
            plan(**fields)
        assert refused.value.param == param and param in refused.value.message


def test_interleaved_streams_round_robin_and_close_all():
    closed = []

    def stream(name, count):
        try:
            yield from (f"{name}{i}" for i in range(count))
        finally:
            closed.append(name)

    merged = Interleaved([stream("a", 2), stream("b", 3)])
    assert list(merged) == [(0, "a0"), (1, "b0"), (0, "a1"), (1, "b1"), (1, "b2")]
    merged.close()
    assert sorted(closed) == ["a", "b"]


# ----------------------------------------------------------------------------- errors, without models


def stub_app(chat) -> TestClient:
    app = FastAPI()
    app.include_router(build_openai_router(chat, None, None, "stub", ServerLimits()))
    return TestClient(app)


class StubChat:
    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.holder = SimpleNamespace(status=lambda: LoadStatus("loading", "x"), loaded_name="stub")

    def chat(self, message, history, settings):
        return self.behaviour()


def body(**extra):
    return {"model": "stub", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (ServerBusy("The server is busy (8 replies running, 16 waiting)."), 429, "server_busy"),
        (ModelNotReady("The model is still loading."), 503, "model_not_ready"),
        (BackendError("The backend server failed (HTTP 500): oops"), 502, "backend_error"),
    ],
)
def test_a_full_queue_a_loading_model_or_a_failing_backend_is_refused(error, status, code):
    def refuse():
        raise error

    response = stub_app(StubChat(refuse)).post("/v1/chat/completions", json=body())
    assert response.status_code == status
    assert response.headers.get("retry-after") == ("1" if status in (429, 503) else None)
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"] == str(error)


def test_a_failure_mid_stream_is_an_error_event_then_done():
    def failing():
        yield Reply("partial", False, 1, 0.1, 1, "sample")
        raise RuntimeError("boom")

    response = stub_app(StubChat(failing)).post("/v1/chat/completions", json=body(stream=True))
    assert response.status_code == 200
    events = [line for line in response.text.split("\n\n") if line]
    assert '"content": "partial"' in events[0]
    assert '"error"' in events[-2] and "RuntimeError: boom" in events[-2]
    assert events[-1] == "data: [DONE]"
    whole = stub_app(StubChat(failing)).post("/v1/chat/completions", json=body())
    assert whole.status_code == 500 and "Generation failed (RuntimeError: boom)" in whole.text


# ----------------------------------------------------------------------------- a live server


@pytest.fixture(scope="module")
def server(demo_text_dir, demo_vision_dirs):
    from app import create_server
    from backend.config import parse_config

    arguments = ["--model", str(demo_text_dir), "--dtype", "float32", "--api-key", KEY]
    arguments += ["--vision-model", str(demo_vision_dirs["demo:tiny-llava"]), "--max-upload-mb", "1"]
    arguments += ["--max-input-chars", str(MAX_CHARS)]
    config = parse_config(arguments, has_gpu=False, env={})
    app, _, holders = create_server(config, load_in_background=False)
    assert [holder.status().state for holder in holders] == ["ready", "ready"]
    with serving(app) as url:
        yield SimpleNamespace(url=url, model=config.model, holder=holders[0])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def chat(client, server, content="Hello", **kwargs):
    return client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": content}], **kwargs
    )


@pytest.mark.slow
def test_models_lists_the_served_model(client, server):
    [model] = client.models.list().data
    assert model.id == server.model
    assert model.max_model_len == 512
    assert {"top_k", "repetition_penalty", "use_beam_search", "image_url"} <= set(model.extensions)


@pytest.mark.slow
def test_every_v1_request_without_the_key_is_401_and_the_ui_stays_open(server):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/nowhere")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.request(method, server.url + path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/").status_code == 200  # the Gradio page is not behind the key


@pytest.mark.slow
def test_chat_reply_usage_and_seed_reproducibility(client, server):
    first = chat(client, server, seed=5, max_tokens=12)
    again = chat(client, server, seed=5, max_tokens=12)
    other = chat(client, server, seed=6, max_tokens=12)
    text = first.choices[0].message.content
    assert text and text == again.choices[0].message.content != other.choices[0].message.content
    usage = first.usage
    assert usage.prompt_tokens > 1 and 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert first.choices[0].finish_reason in ("stop", "length")
    [two_a, two_b] = chat(client, server, seed=5, max_tokens=12, n=2).choices
    assert two_a.message.content == text  # choice i uses seed + i
    assert two_b.message.content == chat(client, server, seed=6, max_tokens=12).choices[0].message.content


@pytest.mark.slow
def test_streamed_chunks_concatenate_to_the_whole_reply(client, server):
    whole = chat(client, server, seed=9, max_tokens=16).choices[0].message.content
    chunks = list(
        chat(client, server, seed=9, max_tokens=16, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


@pytest.mark.slow
def test_stop_cuts_the_reply_before_the_stop_word(client, server):
    full = chat(client, server, temperature=0, max_tokens=40).choices[0].message.content
    assert len(full) > 12
    stop = full[6:9]
    cut = chat(client, server, temperature=0, max_tokens=40, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_completions_stream_echo_and_batched_prompts(client, server):
    def complete(**kwargs):
        return client.completions.create(model=server.model, **{"max_tokens": 8, "temperature": 0, **kwargs})

    text = complete(prompt="The weather today is").choices[0].text
    streamed = "".join(
        chunk.choices[0].text for chunk in complete(prompt="The weather today is", stream=True)
    )
    assert text and streamed == text
    assert complete(prompt="The weather today is", echo=True).choices[0].text == "The weather today is" + text
    batch = client.completions.create(
        model=server.model, prompt=["One", "Two three"], n=2, max_tokens=4, seed=1
    )
    assert [choice.index for choice in batch.choices] == [0, 1, 2, 3]
    single = [complete(prompt=p, max_tokens=1).usage.prompt_tokens for p in ("One", "Two three")]
    assert batch.usage.prompt_tokens == sum(single)


def first_step_logprobs(server, prompt: str) -> torch.Tensor:
    """The model's own next-token log-probabilities after `prompt`, computed here without the server."""
    from backend.prompting import build_raw_prompt

    loaded = server.holder.get()
    ids = build_raw_prompt(loaded.tokenizer, prompt, 10_000).ids
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([ids])).logits[0, -1, : len(loaded.tokenizer)]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.slow
def test_logprobs_are_the_models_raw_distribution_whatever_the_sampling_settings(client, server):
    expected = first_step_logprobs(server, "The weather today is")
    top = torch.topk(expected, 5)
    for settings in ({"temperature": 0}, {"temperature": 1.7, "top_p": 0.5, "extra_body": {"top_k": 3}}):
        reply = client.completions.create(
            model=server.model, prompt="The weather today is", max_tokens=6, seed=3, logprobs=5, **settings
        )
        logprobs = reply.choices[0].logprobs
        assert len(logprobs.tokens) == reply.usage.completion_tokens == len(logprobs.token_logprobs)
        assert "".join(logprobs.tokens) == reply.choices[0].text
        first = logprobs.top_logprobs[0]
        assert len(first) == 5
        assert sorted(first.values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-4)
        chosen = server.holder.get().tokenizer.encode(logprobs.tokens[0], add_special_tokens=False)
        assert logprobs.token_logprobs[0] == pytest.approx(float(expected[chosen[0]]), abs=1e-4)
        assert logprobs.text_offset == [
            sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))
        ]


@pytest.mark.slow
def test_chat_logprobs_whole_and_streamed_agree(client, server):
    asked = {"seed": 11, "max_tokens": 10, "logprobs": True, "top_logprobs": 3}
    whole = chat(client, server, **asked).choices[0]
    content = whole.logprobs.content
    assert len(content) == chat(client, server, seed=11, max_tokens=10).usage.completion_tokens
    assert "".join(entry.token for entry in content).strip() == whole.message.content.strip()
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert len(entry.top_logprobs) == 3
        listed = [alternative.logprob for alternative in entry.top_logprobs]
        assert listed == sorted(listed, reverse=True) and entry.logprob <= listed[0] + 1e-6
    streamed = [
        entry
        for chunk in chat(client, server, stream=True, **asked)
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert chat(client, server, seed=11, max_tokens=4).choices[0].logprobs is None  # only when asked
    greedy = chat(client, server, temperature=0, max_tokens=4, logprobs=True, top_logprobs=1).choices[0]
    assert [e.token for e in greedy.logprobs.content] == [
        e.top_logprobs[0].token for e in greedy.logprobs.content
    ]


@pytest.mark.slow
def test_completion_logprobs_stream_and_refusals(client, server):
    asked = {"model": server.model, "prompt": "Once upon", "max_tokens": 8, "seed": 2, "logprobs": 2}
    whole = client.completions.create(**asked).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **asked) if c.choices]
    streamed = [token for part in chunks if part for token in part.tokens]
    offsets = [offset for part in chunks if part for offset in part.text_offset]
    assert streamed == whole.tokens and offsets == whole.text_offset
    for bad, param in (({"logprobs": 6}, "logprobs"), ({"echo": True}, "logprobs")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(**{**asked, **bad})
        assert refused.value.body["param"] == param


@pytest.mark.slow
def test_extensions_match_the_ui_settings_and_beam_search(client, server):
    from gradio_client import Client

    ui = Client(server.url, verbose=False).predict(
        message="Hello", seed=5, max_new_tokens=16, api_name="/chat"
    )
    api = client.chat.completions.create(
        model=server.model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello"},
        ],
        seed=5,
        temperature=0.7,
        top_p=0.95,
        max_tokens=16,
        extra_body={"top_k": 50, "repetition_penalty": 1.1},
    )
    assert api.choices[0].message.content == ui  # same engine, same settings, same text
    beams = chat(client, server, max_tokens=8, n=3, extra_body={"use_beam_search": True})
    assert len(beams.choices) == 1 and beams.choices[0].message.content
    assert chat(client, server, max_tokens=8, extra_body={"num_beams": 3}).choices[0].message.content == (
        beams.choices[0].message.content
    )


@pytest.mark.slow
def test_an_image_url_message_goes_to_the_vision_model(client, server, image_zoo):
    image = Image.open(image_zoo["good"]["picture.webp"])
    content = [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": data_url(image)}},
    ]

    def ask(**kwargs):
        return client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": content}], max_tokens=8, **kwargs
        )

    first = ask(seed=4)
    assert (
        first.choices[0].message.content
        and first.choices[0].message.content == ask(seed=4).choices[0].message.content
    )
    text_only = chat(client, server, "What is in the picture?", seed=4, max_tokens=8).usage.prompt_tokens
    assert first.usage.prompt_tokens > text_only  # the image's tokens count too
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(seed=4, stream=True) if c.choices)
    assert streamed == first.choices[0].message.content


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"seed": -5}, "seed"),
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "extra_body": {"use_beam_search": True, "n": 2}}, "logprobs"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"extra_body": {"best_of": 3}}, "best_of"),
        ({"extra_body": {"image_pipeline": "nope"}}, "image_pipeline"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(client, server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, server, **{"max_tokens": 4, **kwargs})
    assert refused.value.body["param"] == param
    assert param in refused.value.body["message"]


@pytest.mark.slow
def test_bad_requests_say_what_was_wrong(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="last message must be the user's"):
        client.chat.completions.create(model=server.model, messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="Message is empty"):
        chat(client, server, "   ")
    with pytest.raises(openai.BadRequestError, match="context window") as overflow:
        chat(client, server, "word " * 390, max_tokens=200)
    assert overflow.value.body["code"] == "context_length_exceeded"
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


@pytest.mark.slow
def test_oversize_messages_images_and_bodies_are_413(client, server):
    with pytest.raises(openai.APIStatusError, match="characters; the limit is") as long_message:
        chat(client, server, "x" * (MAX_CHARS + 1))
    assert long_message.value.status_code == 413 and long_message.value.body["param"] == "messages[0].content"
    with pytest.raises(openai.APIStatusError, match="characters; the limit is") as long_prompt:
        client.completions.create(model=server.model, prompt="x" * (MAX_CHARS + 1))
    assert long_prompt.value.status_code == 413
    bitmap = data_url(Image.new("RGB", (700, 700)), "BMP")  # uncompressed: 1.4 MiB > the 1 MiB limit
    big = [{"type": "image_url", "image_url": {"url": bitmap}}]
    with pytest.raises(openai.APIStatusError, match="MiB limit") as big_image:
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": big}])
    assert big_image.value.status_code == 413
    huge = b'{"model": "' + b"x" * (8 * 2**20) + b'"}'
    response = httpx.post(
        f"{server.url}/v1/completions", content=huge, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert response.status_code == 413
    assert chat(client, server, max_tokens=2).choices[0].message.content is not None  # still serving


LONG = {"seed": 0, "max_tokens": 300}  # a reply that runs all 300 tokens (checked below): no early end


@pytest.fixture(scope="module")
def long_reply(client, server):
    assert chat(client, server, "Hi", **LONG).choices[0].finish_reason == "length"
    return LONG


@pytest.fixture
def slow_forwards(server, monkeypatch):
    """Count forward passes and slow them down, so a reply can be abandoned midway."""
    model = server.holder.get().model
    calls = {"n": 0}
    original = model.forward

    def counting_forward(*args, **kwargs):
        calls["n"] += 1
        time.sleep(0.02)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting_forward)
    return calls


def assert_generation_stops(calls):
    time.sleep(1.0)
    after = calls["n"]
    time.sleep(1.0)
    assert calls["n"] == after, "generation kept running after the client left"
    assert after < 300


@pytest.mark.slow
def test_a_client_that_leaves_a_stream_cancels_the_generation(client, server, long_reply, slow_forwards):
    stream = chat(client, server, "Hi", stream=True, **long_reply)
    for _, _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    assert_generation_stops(slow_forwards)


@pytest.mark.slow
def test_a_client_that_leaves_a_whole_request_cancels_the_generation(server, long_reply, slow_forwards):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": server.model, "messages": [{"role": "user", "content": "Hi"}], **long_reply},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=httpx.Timeout(30, read=0.5),
        )
    assert_generation_stops(slow_forwards)


# ----------------------------------------------------------------------------- several images

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_conversation_keeps_each_image_in_the_turn_that_sent_it():
    red, green, blue = (data_url(Image.new("RGB", (4, 4), colour)) for colour in ("red", "green", "blue"))
    conversation = to_conversation(
        [
            ChatMessage(role="user", content=[{"type": "text", "text": "a"}, image_part(red)]),
            ChatMessage(role="assistant", content="b"),
            ChatMessage(role="user", content=[image_part(green)]),
            ChatMessage(role="user", content=[image_part(blue), {"type": "text", "text": "c"}]),
        ],
        MAX_CHARS,
        10_000,
    )
    assert conversation.history == [Turn("a", "b")]
    decoded = [
        [Image.open(io.BytesIO(data)).getpixel((0, 0)) for data in turn]
        for turn in conversation.images.by_turn
    ]
    assert decoded == [[(255, 0, 0)], [(0, 128, 0), (0, 0, 255)]]
    assert conversation.message == "\n\nc" and conversation.image == conversation.images.by_turn[-1][-1]
    only_images = to_conversation(
        [ChatMessage(role="user", content=[image_part(red)] * 2)], MAX_CHARS, 10_000
    )
    assert only_images.message == "Describe the images."
    # Counted before any is decoded: nine undecodable parts are refused for their number.
    with pytest.raises(ApiError, match="has 9 images; the limit is 8 images per request") as refused:
        to_conversation([ChatMessage(role="user", content=[image_part("data:,x")] * 9)], MAX_CHARS, 10_000, 8)
    assert (refused.value.status, refused.value.param) == (400, "messages")


class OneImageVision:
    """A vision service that takes one image source (as remote.service's does)."""

    image_limits = ImageLimits()

    def __init__(self):
        self.given = []

    def visual_chat(self, message, image_source, history, settings, pipeline="auto"):
        self.given.append(image_source)
        return VisualReply("vision", None, iter([Reply("ok", True, 1, 0.1, 1, "sample")]))


def test_a_vision_service_that_takes_one_image_gets_it_and_refuses_several():
    vision = OneImageVision()
    app = FastAPI()
    app.include_router(build_openai_router(StubChat(None), vision, None, "stub", ServerLimits()))
    red = data_url(Image.new("RGB", (4, 4), "red"))
    one = {"model": "stub", "messages": [{"role": "user", "content": [image_part(red)]}]}
    assert TestClient(app).post("/v1/chat/completions", json=one).status_code == 200
    assert vision.given == [base64.b64decode(red.partition(",")[2])]
    two = {"model": "stub", "messages": [{"role": "user", "content": [image_part(red)] * 2}]}
    response = TestClient(app).post("/v1/chat/completions", json=two)
    assert (
        response.status_code == 400 and "reads one image per request" in response.json()["error"]["message"]
    )
    assert len(vision.given) == 1


@pytest.mark.slow
def test_several_images_are_read_in_order_each_where_it_was_sent(client, server):
    house, smiley = (data_url(Image.open(EXAMPLES / name)) for name in ("house.png", "smiley.jpg"))
    question = {"type": "text", "text": "What is in the pictures?"}

    def ask(*conversation):
        return client.chat.completions.create(
            model=server.model, messages=list(conversation), max_tokens=12, temperature=0, seed=0
        )

    def user(*images):
        return {"role": "user", "content": [*map(image_part, images), question]}

    both = ask(user(house, smiley))
    others = [ask(user(smiley, house)), ask(user(house)), ask(user(smiley))]
    assert all(other.choices[0].message.content != both.choices[0].message.content for other in others)
    assert both.usage.prompt_tokens - others[1].usage.prompt_tokens == 16 + 1  # each image's tokens count
    # An image in an earlier message stays in its turn.
    answer = {"role": "assistant", "content": "A house."}
    placed = ask(user(house), answer, user(smiley)).choices[0].message.content
    assert placed != ask(user(), answer, user(smiley)).choices[0].message.content
    assert placed != ask(user(), answer, user(house, smiley)).choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="has 9 images; the limit is 8 images") as many:
        ask(user(*[house] * 9))
    assert many.value.body["param"] == "messages"
