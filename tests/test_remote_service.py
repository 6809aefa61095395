"""Remote mode: one instance serves the tiny models, a second uses them through its OpenAI-compatible API."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import gradio as gr
import httpx
import openai
import pytest
from gradio_client import Client, handle_file

from backend.errors import BadInput, ContextOverflow, InvalidSettings, ModelNotReady, ServerBusy
from backend.remote.capabilities import RemoteCapabilities, sampling_payload
from backend.remote.client import BackendError, OpenAIClient, iter_sse, remote_error
from backend.remote.service import RemoteChatService, RemoteHolder
from backend.settings import GenerationSettings, ServerLimits
from tests.test_openai_api import serving
from ui.banner import banner_markdown
from ui.controls import build_controls
from ui.system_tab import model_markdown

KEY = "upstream-key"
OURS = {"id": "m", "owned_by": "chat-caption-playground", "extensions": ["top_k", "repetition_penalty"]}

# ----------------------------------------------------------------------------- without servers


def test_server_sent_events_are_parsed():
    lines = ['data: {"a": 1}', "", ": a comment", "data: line one", "data: line two", "", "data: [DONE]"]
    assert list(iter_sse(lines)) == ['{"a": 1}', "line one\nline two", "[DONE]"]


def test_capabilities_decide_what_the_ui_disables():
    plain = RemoteCapabilities.from_model_card({"id": "gpt", "owned_by": "openai"})
    assert set(plain.unsupported()) == {"top_k", "repetition_penalty", "num_beams", "mode"}
    assert "vLLM extension" in plain.unsupported()["top_k"] and "openai" in plain.unsupported()["top_k"]
    assert RemoteCapabilities.from_model_card({"id": "x", "owned_by": "vllm"}).unsupported() == {}
    llama_cpp = RemoteCapabilities.from_model_card({"id": "tiny.gguf", "owned_by": "me"})
    assert llama_cpp.engine == "llama.cpp" and set(llama_cpp.unsupported()) == {"num_beams", "mode"}
    assert "(tiny.gguf)" in llama_cpp.unsupported()["mode"]  # not "(me)": llama-cpp-python's owned_by
    assert not llama_cpp.takes_images and "llama.cpp" in llama_cpp.images_off_reason()
    assert plain.takes_images and plain.images_off_reason() is None
    ours = RemoteCapabilities.from_model_card(OURS)
    assert set(ours.unsupported()) == {"num_beams", "mode"} and not ours.takes_images
    with gr.Blocks():
        controls = build_controls(ServerLimits(), plain.unsupported())
    assert controls["top_k"].interactive is False and controls["top_k"].value == 0
    assert controls["top_k"].info == plain.unsupported()["top_k"]
    assert controls["repetition_penalty"].value == 1.0 and controls["num_beams"].interactive is False
    assert [choice for _, choice in controls["mode"].choices] == ["sample", "greedy"]
    assert controls["temperature"].interactive is None  # standard OpenAI parameters stay


def test_settings_become_openai_parameters():
    vllm = RemoteCapabilities("vllm", frozenset({"top_k", "repetition_penalty", "use_beam_search"}))
    plain = RemoteCapabilities("openai", frozenset())
    settings = GenerationSettings(seed=3, temperature=0.5, top_k=40, top_p=0.9, repetition_penalty=1.2)
    payload, left_out = sampling_payload(settings, vllm)
    assert payload == {
        "max_tokens": 256,
        "seed": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.2,
    }
    assert left_out == []
    payload, left_out = sampling_payload(settings, plain)
    assert "top_k" not in payload and left_out == ["repetition_penalty", "top_k"]
    greedy, _ = sampling_payload(GenerationSettings(mode="greedy", stop_words=("\n",)), vllm)
    assert greedy["temperature"] == 0.0 and greedy["stop"] == ["\n"] and "top_k" not in greedy
    beam, _ = sampling_payload(GenerationSettings(mode="beam", num_beams=3), vllm)
    assert beam["use_beam_search"] is True and beam["n"] == 3  # vLLM >= 0.6: the width is n
    with pytest.raises(InvalidSettings, match="'mode'.*no beam search"):
        sampling_payload(GenerationSettings(mode="beam"), plain)
    llama_cpp = RemoteCapabilities.from_model_card({"id": "tiny.gguf", "owned_by": "me"})
    payload, left_out = sampling_payload(GenerationSettings(mode="greedy", repetition_penalty=1.0), llama_cpp)
    # llama.cpp's own samplers (repeat_penalty 1.1, top_k 40, min_p 0.05 unless told) are set to do nothing
    assert payload | {"top_k": 0, "repeat_penalty": 1.0, "min_p": 0.0} == payload and left_out == []
    payload, _ = sampling_payload(settings, llama_cpp)
    assert (payload["top_k"], payload["repeat_penalty"]) == (40, 1.2) and "repetition_penalty" not in payload


@pytest.mark.parametrize(
    ("status", "body", "kind", "words"),
    [
        (401, {"error": {"message": "bad key"}}, BackendError, "--backend-api-key"),
        (429, {"error": {"message": "full"}}, ServerBusy, "busy: full"),
        (503, {"error": {"message": "loading"}}, ModelNotReady, "not ready: loading"),
        (
            400,
            {"error": {"message": "too long", "code": "context_length_exceeded"}},
            ContextOverflow,
            "too long",
        ),
        (400, {"error": {"message": "bad top_p"}}, BadInput, "refused the request: bad top_p"),
        (422, {"detail": "missing field"}, BadInput, "missing field"),
        (500, "Internal Server Error", BackendError, "HTTP 500"),
    ],
)
def test_backend_errors_become_typed_errors(status, body, kind, words):
    error = remote_error(status, body, "http://backend/v1")
    assert isinstance(error, kind) and words in str(error)


def fake_backend(card: dict, events: list[dict]) -> httpx.MockTransport:
    """An OpenAI-compatible server in a function: /v1/models and one streamed chat reply."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [card]})
        sent = json.loads(request.content)
        handle.requests.append(sent)
        body = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    handle.requests = []
    return httpx.MockTransport(handle)


def delta(text: str | None = None, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}


def test_a_streamed_reply_from_a_plain_openai_server():
    events = [delta(" Hel"), delta("lo"), delta(finish="stop")]
    events.append({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}})
    transport = fake_backend({"id": "gpt-x", "owned_by": "openai"}, events)
    holder = RemoteHolder(OpenAIClient("http://backend:8000", "k", transport=transport), "gpt-x")
    assert holder.load().state == "ready" and holder.loaded_name == "gpt-x"
    service = RemoteChatService(holder, ServerLimits())
    replies = list(service.chat("Hi", [], GenerationSettings(seed=1, top_k=50, repetition_penalty=1.0)))
    assert [reply.text for reply in replies] == ["Hel", "Hello", "Hello"]
    final = replies[-1]
    assert final.done and final.finish_reason == "stop" and final.prompt_tokens is not None
    assert (final.prompt_tokens, final.new_tokens) == (9, 2)
    assert "top_k" in final.notice and "openai" in final.notice  # dropped, and said so
    [sent] = transport.handler.requests
    assert sent["model"] == "gpt-x" and sent["stream"] is True and "top_k" not in sent
    assert sent["messages"][0] == {"role": "system", "content": GenerationSettings().system_prompt}
    assert "logprobs" not in sent  # only when asked for: llama.cpp streams other text with them
    assert final.tokens == ()
    with pytest.raises(BadInput, match="template"):
        service.chat_context([], "")


def entry(token: str, logprob: float, *alternatives: tuple[str, float]) -> dict:
    top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": top}


def test_a_servers_logprobs_colour_the_reply_and_pass_on():
    first = {"index": 0, "delta": {"content": " Hel"}, "finish_reason": None}
    first["logprobs"] = {"content": [entry(" Hel", -0.5, (" Hel", -0.5), (" Hi", -1.5), ("!", -3.0))]}
    second = {"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}
    second["logprobs"] = {"content": [entry("lo", -0.1, ("lo", -0.1), ("p", -2.5), ("l", -4.0))]}
    transport = fake_backend({"id": "m", "owned_by": "vllm"}, [{"choices": [first]}, {"choices": [second]}])
    holder = RemoteHolder(OpenAIClient("http://backend:8000", transport=transport))
    assert holder.load().state == "ready"
    service = RemoteChatService(holder, ServerLimits())
    replies = list(service.chat("Hi", [], GenerationSettings(seed=1, logprobs=1)))
    assert [[token.text for token in reply.added] for reply in replies] == [[" Hel"], ["lo"], []]
    final = replies[-1]
    assert [token.text for token in final.tokens] == [" Hel", "lo"] and final.new_tokens == 2
    assert final.tokens[0].probability == pytest.approx(math.exp(-0.5))
    assert final.tokens[0].alternatives[1] == (" Hi", pytest.approx(math.exp(-1.5)))
    assert [alt[1:] for alt in final.tokens[1].top_logprobs] == [("lo", -0.1)]  # as many as asked
    assert final.tokens[0].utf8 == tuple(b" Hel")
    assert transport.handler.requests[0]["top_logprobs"] == 1
    zero = list(service.chat("Hi", [], GenerationSettings(seed=1, logprobs=0)))[-1]
    assert transport.handler.requests[1]["top_logprobs"] == 1  # llama.cpp sends none for 0
    assert [token.top_logprobs for token in zero.tokens] == [(), ()]


def test_a_stream_that_ends_without_a_finish_reason_is_an_error_not_a_short_reply():
    transport = fake_backend({"id": "m", "owned_by": "me"}, [delta("Hi")])  # then [DONE], no finish
    holder = RemoteHolder(OpenAIClient("http://backend:8000", transport=transport))
    assert holder.load().state == "ready"
    with pytest.raises(BackendError, match="without saying why.*context window"):
        list(RemoteChatService(holder, ServerLimits()).chat("Hi", [], GenerationSettings(seed=1)))


def test_a_server_that_refuses_logprobs_is_asked_for_them_only_when_a_request_wants_them():
    asked = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "owned_by": "tgi"}]})
        sent = json.loads(request.content)
        asked.append("logprobs" in sent)
        if "logprobs" in sent:
            return httpx.Response(400, json={"error": {"message": "logprobs is not supported"}})
        body = f"data: {json.dumps(delta('Hi', 'stop'))}\n\ndata: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    holder = RemoteHolder(OpenAIClient("http://backend:8000", transport=httpx.MockTransport(handle)))
    assert holder.load().state == "ready"
    service = RemoteChatService(holder, ServerLimits())
    assert list(service.chat("Hi", [], GenerationSettings(seed=1)))[-1].text == "Hi"
    with pytest.raises(BadInput, match="logprobs"):  # asked for by the request itself: said, not dropped
        service.chat("Hi", [], GenerationSettings(seed=3, logprobs=2))
    assert asked == [False, True]


def test_the_inspectors_settings_over_a_servers_top_tokens_match_the_local_warpers():
    """Given the whole distribution, remote mode's pure-Python warpers give what generation samples from."""
    import torch

    from backend.decode.inspector import final_probabilities
    from backend.token_probs import warped

    logits = torch.randn(40, generator=torch.Generator().manual_seed(0)) * 3
    logprobs = torch.log_softmax(logits, dim=-1)
    for settings in (
        GenerationSettings(temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.0),
        GenerationSettings(temperature=1.3, top_k=7, top_p=1.0, repetition_penalty=1.0),
        GenerationSettings(temperature=0.9, top_k=0, top_p=0.6, repetition_penalty=1.0),
        GenerationSettings(temperature=0.5, top_k=12, top_p=0.8, repetition_penalty=1.0),
        GenerationSettings(mode="greedy", repetition_penalty=1.0),
    ):
        expected = final_probabilities(logits, torch.tensor([[1]]), settings, 40)
        greedy = settings.mode == "greedy"
        got = warped(logprobs.tolist(), settings.temperature, settings.top_k, settings.top_p, greedy)
        assert got == pytest.approx(expected.tolist(), abs=1e-5), settings


def test_an_unreachable_backend_is_reported_and_retried():
    holder = RemoteHolder(OpenAIClient("http://127.0.0.1:9"))  # the discard port: nothing listens
    status = holder.load()
    assert status.state == "failed" and "cannot be reached" in status.stage
    with pytest.raises(ModelNotReady, match="cannot be reached"):
        RemoteChatService(holder, ServerLimits()).chat("Hi", [], GenerationSettings())


# ----------------------------------------------------------------------------- two live instances


def start(arguments: list[str]):
    from app import create_server
    from backend.config import parse_config

    config = parse_config(arguments, has_gpu=False, env={})
    app, _, holders = create_server(config, load_in_background=False)
    return app, config, holders


@pytest.fixture(scope="module")
def upstream(demo_text_dir, demo_vision_dirs):
    arguments = ["--model", str(demo_text_dir), "--dtype", "float32", "--api-key", KEY]
    arguments += ["--vision-model", str(demo_vision_dirs["demo:tiny-llava"])]
    app, config, holders = start(arguments)
    with serving(app) as url:
        yield SimpleNamespace(
            url=url, model=config.model, holder=holders[0], client=Client(url, verbose=False)
        )


@pytest.fixture(scope="module")
def front(upstream):
    app, _, holders = start(["--backend-url", upstream.url, "--backend-api-key", KEY, "--max-upload-mb", "1"])
    with serving(app) as url:
        yield SimpleNamespace(url=url, holder=holders[0], client=Client(url, verbose=False))


@pytest.mark.slow
def test_the_front_shows_the_backend_model(front, upstream):
    assert front.holder.status().state == "ready" and front.holder.loaded_name == upstream.model
    assert upstream.model in banner_markdown([("chat", front.holder)])
    assert upstream.url in model_markdown(front.holder)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [
        {"message": "Tell me about the sky", "seed": 123, "max_new_tokens": 16},
        {"message": "Hello", "mode": "greedy", "max_new_tokens": 24, "stop_words": "e"},
        {"message": "Hello", "mode": "beam", "num_beams": 3, "max_new_tokens": 8},
    ],
)
def test_chat_through_the_front_equals_chat_on_the_backend(front, upstream, kwargs):
    here = front.client.predict(api_name="/chat", **kwargs)
    assert here and here == upstream.client.predict(api_name="/chat", **kwargs)


@pytest.mark.slow
def test_completion_streams_through_the_front(front, upstream):
    kwargs = {"text": "Once upon a time", "seed": 4, "max_new_tokens": 12}
    outputs = list(front.client.submit(api_name="/complete", **kwargs))
    assert len(outputs) > 2 and all(b.startswith(a) for a, b in zip(outputs, outputs[1:], strict=False))
    assert outputs[-1] == upstream.client.predict(api_name="/complete", **kwargs)


@pytest.mark.slow
def test_images_go_to_the_backend(front, image_zoo):
    path = image_zoo["good"]["picture.webp"]

    def caption(**kwargs):
        return front.client.predict(image=handle_file(str(path)), api_name="/caption", **kwargs)

    first = caption(seed=11, max_new_tokens=8)
    assert first and first == caption(seed=11, max_new_tokens=8)
    bad, words = image_zoo["bad"]["bomb.png"]
    with pytest.raises(Exception, match=words):  # checked here, before the backend is asked
        front.client.predict(image=handle_file(str(bad)), api_name="/caption")


@pytest.mark.slow
def test_logprobs_and_the_inspector_through_the_front(front, upstream):
    ask = {"messages": [{"role": "user", "content": "Hello"}], "seed": 2, "max_tokens": 6}
    ask |= {"logprobs": True, "top_logprobs": 4}
    here = openai.OpenAI(base_url=f"{front.url}/v1", api_key="none", max_retries=0)
    there = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key=KEY, max_retries=0)
    mine = here.chat.completions.create(model=upstream.model, **ask).choices[0].logprobs.content
    theirs = there.chat.completions.create(model=upstream.model, **ask).choices[0].logprobs.content
    assert mine and [(e.token, e.logprob, len(e.top_logprobs)) for e in mine] == [
        (e.token, e.logprob, 4) for e in theirs
    ]
    settings = {"temperature": 0.8, "top_k": 2, "top_p": 1.0, "repetition_penalty": 1.0, "n": 5}
    remote = front.client.predict(text="Once upon a time", api_name="/next_tokens", **settings)
    local = upstream.client.predict(text="Once upon a time", api_name="/next_tokens", **settings)
    assert [t["text"] for t in remote["tokens"]] == [t["text"] for t in local["tokens"]]
    assert [t["p_raw"] for t in remote["tokens"]] == pytest.approx(
        [t["p_raw"] for t in local["tokens"]], abs=1e-5
    )
    assert sum(t["p_final"] > 0 for t in remote["tokens"]) == 2  # top-k 2 over the listed tokens
    assert "top 5" in remote["note"] and local["note"] is None
    service = RemoteChatService(front.holder, ServerLimits())
    greedy = GenerationSettings(mode="greedy", repetition_penalty=1.0)
    assert service.step_text("Once upon a time", greedy) == "Once upon a time" + local["tokens"][0]["text"]


@pytest.mark.slow
def test_every_image_of_a_conversation_goes_to_the_backend_in_its_turn(front, upstream):
    from PIL import Image

    from tests.test_openai_api import EXAMPLES, data_url

    house, smiley = (data_url(Image.open(EXAMPLES / name)) for name in ("house.png", "smiley.jpg"))

    def user(*urls):
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        return {"role": "user", "content": [*parts, {"type": "text", "text": "What is in them?"}]}

    answer = {"role": "assistant", "content": "A house."}
    ask = {"max_tokens": 10, "temperature": 0, "seed": 0, "model": upstream.model}
    here = openai.OpenAI(base_url=f"{front.url}/v1", api_key="none", max_retries=0)
    there = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key=KEY, max_retries=0)
    for conversation in ([user(house, smiley)], [user(smiley, house)], [user(house), answer, user(smiley)]):
        mine = here.chat.completions.create(messages=conversation, **ask)
        theirs = there.chat.completions.create(messages=conversation, **ask)
        assert mine.choices[0].message.content == theirs.choices[0].message.content
        assert mine.usage.prompt_tokens == theirs.usage.prompt_tokens  # every image reached it


@pytest.mark.slow
def test_errors_say_what_went_wrong(front):
    with pytest.raises(Exception, match="'top_p'"):
        front.client.predict(message="hi", top_p=0, api_name="/chat")
    with pytest.raises(Exception, match="context window"):
        front.client.predict(message="word " * 3000, max_new_tokens=8, api_name="/chat")
    wrong_key = RemoteHolder(OpenAIClient(front.holder.client.base, "wrong"))
    assert "--backend-api-key" in wrong_key.load().stage


@pytest.mark.slow
def test_the_fronts_own_api_passes_usage_through(front, upstream):
    ask = {"messages": [{"role": "user", "content": "Hello"}], "seed": 2, "max_tokens": 10}
    here = openai.OpenAI(base_url=f"{front.url}/v1", api_key="none", max_retries=0)
    there = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key=KEY, max_retries=0)
    mine, theirs = (
        here.chat.completions.create(model=upstream.model, **ask),
        there.chat.completions.create(model=upstream.model, **ask),
    )
    assert mine.choices[0].message.content == theirs.choices[0].message.content
    assert mine.usage.prompt_tokens == theirs.usage.prompt_tokens > 0


@pytest.mark.slow
def test_stop_on_the_front_cancels_the_backend(front, upstream, monkeypatch):
    model = upstream.holder.get().model
    calls = {"n": 0}
    original = model.forward

    def counting_forward(*args, **kwargs):
        calls["n"] += 1
        time.sleep(0.02)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting_forward)
    # With these settings seed 0 runs the full 300 tokens (tests/test_openai_api.py checks it).
    plain = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "system_prompt": ""}
    job = front.client.submit(message="Hi", seed=0, max_new_tokens=300, api_name="/chat", **plain)
    deadline = time.time() + 30
    while calls["n"] < 5 and time.time() < deadline:
        time.sleep(0.02)
    assert calls["n"] >= 5, f"generation never started: {job.status()}"
    job.cancel()
    time.sleep(1.5)
    after = calls["n"]
    time.sleep(1.0)
    assert calls["n"] == after, "the backend kept generating after Stop"
    assert after < 300


def test_remote_mode_and_the_v1_edge_import_no_torch():
    """In front of a remote engine nothing loads the torch stack: a small machine can be the front door."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; import backend.remote.service, backend.openai_server.routes, backend.contracts; "
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
