"""--rate-limit: the sliding-window limiter on a fake clock, then the UI, gradio_client and /v1 doors."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client

from backend.config import parse_config
from backend.errors import RateLimited
from backend.services.rate_limit import ClientRateLimit, SlidingWindowLimiter, client_key, rate_limit_for
from tests.test_openai_api import serving
from ui.handlers import MeteredChat, metered_chat, metered_vision


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request_from(host: str | None, forwarded_for: str | None = None):
    headers = {"x-forwarded-for": forwarded_for} if forwarded_for else {}
    return SimpleNamespace(client=SimpleNamespace(host=host) if host else None, headers=headers)


# ----------------------------------------------------------------------------- the limiter


def test_window_admits_n_then_says_how_long_to_wait_and_slides():
    clock = FakeClock()
    limiter = SlidingWindowLimiter(3, window=60, clock=clock)
    for _ in range(3):
        assert limiter.wait("a") == 0
        clock.now += 10
    assert limiter.wait("a") == pytest.approx(30)  # the first admission leaves the window in 30 s
    clock.now += 29.5
    assert limiter.wait("a") == pytest.approx(0.5)  # refusals are not counted
    clock.now += 0.5
    assert limiter.wait("a") == 0  # one slot came free
    assert limiter.wait("a") == pytest.approx(10)  # the next frees at the second admission's minute


def test_clients_have_their_own_budgets():
    clock = FakeClock()
    limiter = SlidingWindowLimiter(1, clock=clock)
    assert limiter.wait("a") == 0 and limiter.wait("b") == 0
    assert limiter.wait("a") > 0 and limiter.wait("b") > 0


def test_idle_clients_are_forgotten_and_memory_is_bounded():
    clock = FakeClock()
    limiter = SlidingWindowLimiter(2, window=60, clock=clock, max_clients=100)
    for index in range(50):
        limiter.wait(f"client-{index}")
    assert len(limiter) == 50
    clock.now += 61
    limiter.wait("newcomer")
    assert len(limiter) == 1  # everyone idle for a whole window is gone
    for index in range(500):
        limiter.wait(f"flood-{index}")
    assert len(limiter) == 100  # a flood of addresses never grows it past max_clients


def test_concurrent_requests_get_exactly_n_admissions():
    limiter = SlidingWindowLimiter(25, clock=FakeClock())
    admitted = []

    def hammer():
        admitted.extend(1 for _ in range(20) if limiter.wait("same") == 0)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 25


def test_client_identity_trusts_x_forwarded_for_only_when_told():
    assert client_key("10.0.0.5", "1.2.3.4, 10.0.0.1", trust_proxy_headers=False) == "10.0.0.5"
    assert client_key("10.0.0.5", "1.2.3.4, 10.0.0.1", trust_proxy_headers=True) == "1.2.3.4"
    assert client_key("10.0.0.5", " , x", trust_proxy_headers=True) == "10.0.0.5"
    assert client_key(None, None, trust_proxy_headers=True) == "unknown"


def test_refusal_says_the_limit_and_when_to_come_back():
    clock = FakeClock()
    limit = ClientRateLimit(2, clock=clock)
    limit.admit(request_from("1.1.1.1"))
    limit.admit(request_from("1.1.1.1"))
    clock.now += 12.2
    with pytest.raises(RateLimited) as refused:
        limit.admit(request_from("1.1.1.1"))
    assert str(refused.value) == "Rate limit: at most 2 requests per minute; try again in 48 s."
    assert refused.value.retry_after == 48
    limit.admit(request_from("2.2.2.2"))  # another client is not affected
    # Without --trust-proxy-headers a forged header does not buy a fresh budget.
    with pytest.raises(RateLimited):
        limit.admit(request_from("1.1.1.1", forwarded_for="9.9.9.9"))


def test_flags_and_environment():
    assert parse_config([], has_gpu=False, env={}).server.rate_limit == 0
    assert rate_limit_for(0) is None
    config = parse_config(["--rate-limit", "5", "--trust-proxy-headers"], has_gpu=False, env={})
    assert (config.server.rate_limit, config.server.trust_proxy_headers) == (5, True)
    env = {"PLAYGROUND_RATE_LIMIT": "7", "PLAYGROUND_TRUST_PROXY_HEADERS": "true"}
    config = parse_config([], has_gpu=False, env=env)
    assert (config.server.rate_limit, config.server.trust_proxy_headers) == (7, True)
    assert not parse_config([], has_gpu=False, env={}).server.trust_proxy_headers
    limit = rate_limit_for(config.server.rate_limit, config.server.trust_proxy_headers)
    assert (limit.per_minute, limit.trust_proxy_headers) == (7, True)


def test_metered_services_count_generation_calls_only():
    calls = []
    service = SimpleNamespace(
        chat=lambda *args: "reply", holder="the holder", limits=None, stats=None, step_text=lambda *a: a[0]
    )
    wrapped = metered_chat(service, SimpleNamespace(admit=calls.append), request_from("1.1.1.1"))
    assert isinstance(wrapped, MeteredChat)
    assert (wrapped.holder, wrapped.step_text("x", None)) == ("the holder", "x")
    assert calls == []
    assert wrapped.chat("hello", [], None) == "reply"
    assert len(calls) == 1
    assert metered_chat(service, None, request_from("1.1.1.1")) is service  # no limit: the service itself
    assert metered_vision(None, SimpleNamespace(admit=calls.append), None) is None  # images off stay off
    vision = SimpleNamespace(caption=lambda *args: "a cat", holder="h", image_limits=None)
    assert (
        metered_vision(vision, SimpleNamespace(admit=calls.append), None).caption("img", "", None) == "a cat"
    )
    assert len(calls) == 2


# ----------------------------------------------------------------------------- a live server, limit 2


@pytest.fixture(scope="module")
def server(demo_text_dir):
    from app import create_server

    arguments = ["--model", str(demo_text_dir), "--dtype", "float32", "--vision-model", "none"]
    arguments += ["--rate-limit", "2", "--trust-proxy-headers"]
    config = parse_config(arguments, has_gpu=False, env={})
    app, demo, holders = create_server(config, load_in_background=False)
    assert holders[0].status().state == "ready"
    with serving(app) as url:
        yield SimpleNamespace(url=url, demo=demo, model=config.model)


def forwarded(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": f"{address}, 10.255.0.1"}  # as a Space's proxy sends it


@pytest.mark.slow
def test_gradio_client_api_is_limited_per_client(server):
    client = Client(server.url, verbose=False, headers=forwarded("203.0.113.1"))
    for _ in range(2):
        assert client.predict(message="Hello", max_new_tokens=3, api_name="/chat")
    with pytest.raises(Exception, match=r"Rate limit: at most 2 requests per minute; try again in \d+ s"):
        client.predict(text="Once", max_new_tokens=3, api_name="/complete")
    with pytest.raises(Exception, match="Rate limit"):
        client.predict(text="The", api_name="/next_tokens")
    # Another client (told apart by the proxy's header, so gr.Request reached the handler) is served.
    other = Client(server.url, verbose=False, headers=forwarded("203.0.113.2"))
    assert other.predict(message="Hello", max_new_tokens=3, api_name="/chat")


@pytest.mark.slow
def test_v1_is_limited_with_429_and_retry_after(server):
    body = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    headers = forwarded("198.51.100.7")
    for _ in range(2):
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers).status_code == 200
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 200  # not generation
    refused = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": server.model, "prompt": "x", "max_tokens": 3},
        headers=headers,
        timeout=30,
    )
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert error["message"].startswith("Rate limit: at most 2 requests per minute; try again in ")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


@pytest.mark.slow
def test_ui_chat_refusal_is_a_note_in_the_conversation(server):
    block_fn = next(fn for fn in server.demo.fns.values() if fn.name == "on_chat")
    data = {component: component.value for component in block_fn.inputs}
    by_id = {component.elem_id: component for component in block_fn.inputs}
    data[by_id["message"]] = {"text": "Hello", "files": []}
    data[by_id["chatbot"]] = []
    request = request_from("192.0.2.44")  # what Gradio injects as gr.Request: .client.host and .headers
    def shown(updates: list[tuple]) -> tuple:
        """(box, history, view) as last shown: the very last update only turns ◀ ▶ back on."""
        return next(update for update in reversed(updates) if isinstance(update[1], list))[:3]

    *served, refused = [shown(list(block_fn.fn(data, request=request))) for _ in range(3)]
    for _, history, _ in served:
        assert [turn["role"] for turn in history[:2]] == ["user", "assistant"]
        assert "Rate limit" not in str(history)
    box, history, _ = refused
    assert box["text"] == "Hello"  # the refused message stays in the box, to be sent again later
    assert "⚠️ Rate limit: at most 2 requests per minute; try again in" in history[-1]["metadata"]["title"]
