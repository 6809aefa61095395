"""/health and /metrics, bad flags ending in argparse's one line, refused requests as one WARNING line."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from backend.config import parse_config
from backend.errors import BadInput
from backend.metrics import Metrics
from backend.model_status import LoadStatus
from backend.openai_server.probes import build_probe_router
from backend.replies import Reply
from backend.request_stats import RequestStats
from tests.test_openai_api import serving


class Clock:
    """Seconds that move only when a test says so."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def probe_app(status: LoadStatus, metrics: Metrics | None = None) -> TestClient:
    chat = SimpleNamespace(holder=SimpleNamespace(status=lambda: status, loaded_name="tiny"))
    app = FastAPI()
    app.include_router(build_probe_router(chat, metrics))
    return TestClient(app)


@pytest.mark.parametrize(
    ("status", "code", "said"),
    [
        (LoadStatus("ready", "Ready: tiny"), 200, "ok"),
        (LoadStatus("loading", "Switching to other-model: waiting for 2 request(s)"), 503, "loading"),
        (LoadStatus("failed", "Could not load tiny: no such file"), 503, "failed"),
    ],
)
def test_health_is_ready_only_when_the_chat_model_answers_and_says_why_not(status, code, said):
    response = probe_app(status).get("/health")
    assert response.status_code == code
    assert response.json()["status"] == said and response.json()["model"] == "tiny"
    assert response.json().get("reason") == (None if code == 200 else status.stage)


def test_metrics_count_tokens_latencies_and_outcomes_but_never_text():
    clock, metrics = Clock(), Metrics()
    metrics.watch("tiny", lambda: (3, 2, (300, 1000)))
    stats = RequestStats(clock=clock, observer=metrics)

    def replies(texts, finish_reason):
        for index, text in enumerate(texts, start=1):
            clock.now += 0.5
            yield Reply(text, index == len(texts), index, 0.0, 1, "sample", finish_reason, prompt_tokens=7)

    list(stats.counted(replies(["secret", "secret words", "secret words here"], "length")))
    stream = stats.counted(replies(["other", "other text"], "eos"))
    next(stream)
    stream.close()  # a Stop: counted as aborted
    text = probe_app(LoadStatus("ready", "Ready"), metrics).get("/metrics").text
    assert 'playground_generation_tokens_total{model_name="tiny"} 4.0' in text
    assert 'playground_prompt_tokens_total{model_name="tiny"} 14.0' in text
    assert 'playground_request_success_total{finished_reason="length",model_name="tiny"} 1.0' in text
    assert 'playground_request_success_total{finished_reason="abort",model_name="tiny"} 1.0' in text
    assert 'playground_time_to_first_token_seconds_count{model_name="tiny"} 2.0' in text
    assert 'playground_time_to_first_token_seconds_sum{model_name="tiny"} 1.0' in text  # 0.5 s each
    assert 'playground_inter_token_latency_seconds_count{model_name="tiny"} 2.0' in text
    assert 'playground_e2e_request_latency_seconds_count{model_name="tiny"} 2.0' in text
    assert 'playground_requests_running{model_name="tiny"} 3.0' in text
    assert 'playground_requests_waiting{model_name="tiny"} 2.0' in text
    assert 'playground_kv_cache_usage_perc{model_name="tiny"} 0.3' in text
    assert "secret" not in text and "other" not in text


@pytest.mark.slow
def test_the_app_serves_health_and_metrics_and_counts_ui_api_and_v1_requests_alike(demo_text_dir):
    from app import create_server

    config = parse_config(["--model", str(demo_text_dir), "--dtype", "float32", "--api-key", "k"], False, {})
    app, _, holders = create_server(config, load_in_background=False)
    with serving(app) as url:
        assert httpx.get(f"{url}/health").json()["status"] == "ok"  # no API key needed
        body = {"model": config.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"})
        assert reply.status_code == 200
        from gradio_client import Client

        Client(url, verbose=False).predict(text="Once", mode="greedy", max_new_tokens=3, api_name="/complete")
        text = httpx.get(f"{url}/metrics").text
    name = config.model
    ended = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("playground_request_success_total{") and f'model_name="{name}"' in line
    )
    assert ended == 2  # the /v1 request and the gradio_client one, through the same counters
    assert "playground_requests_running" in text and "playground_kv_cache_usage_perc" in text


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (["--gpu-memory", "garbage"], {}, "--gpu-memory: cannot read 'garbage'"),
        (["--cpu-memory", "12XB"], {}, "--cpu-memory: cannot read the size '12XB'"),
        ([], {"PLAYGROUND_MAX_BATCH_SIZE": "eight"}, "--max-batch-size: invalid int value: 'eight'"),
        ([], {"PLAYGROUND_DTYPE": "fp8"}, "--dtype: invalid choice 'fp8'"),
        ([], {"PLAYGROUND_PORT": "http"}, "--port: invalid int value: 'http'"),
        (["--malloc-trim-seconds", "-5"], {}, "--malloc-trim-seconds: must be 0 (off) or a number"),
        ([], {"PLAYGROUND_MALLOC_TRIM_SECONDS": "inf"}, "--malloc-trim-seconds: must be 0 (off)"),
    ],
)
def test_a_bad_flag_or_variable_is_one_line_and_exit_code_2(argv, env, words, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_config(argv, has_gpu=False, env=env)
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert words in error[-1] and "Traceback" not in "\n".join(error)


def test_a_refused_request_is_one_warning_line_without_a_traceback(caplog):
    from ui.handlers import report

    caplog.set_level(logging.INFO)
    report(BadInput("Message is empty: type something to send."))
    [record] = [r for r in caplog.records if r.name == "ui.handlers"]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "BadInput" in record.getMessage() and "Message is empty" in record.getMessage()


def test_an_api_refusal_is_one_warning_and_gradio_prints_no_traceback_for_it(caplog):
    import gradio as gr

    from ui.handlers import api_stream

    def refuse():
        raise BadInput("Message is empty: type something to send.")

    caplog.set_level(logging.INFO)
    with pytest.raises(gr.Error) as raised:
        list(api_stream(refuse))
    assert raised.value.print_exception is False  # Gradio's queue would print a traceback otherwise
    [record] = [r for r in caplog.records if r.name == "ui.handlers"]
    assert record.levelno == logging.WARNING and record.exc_info is None
