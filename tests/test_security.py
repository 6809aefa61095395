"""What a public deployment must not do: serve files outside its folders, log prompts, run model code."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client

from backend.config import parse_config
from backend.models.loading import ModelSpec, load_text_model
from backend.models.vision_loading import load_vision_model
from backend.replies import Reply
from backend.services.prompt_log import LoggedChat
from tests.test_openai_api import serving

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"


@pytest.fixture(scope="module")
def server(demo_text_dir, demo_vision_dirs):
    """The app as `python app.py` serves it (create_server + uvicorn), with its default settings."""
    from app import create_server

    arguments = ["--model", str(demo_text_dir), "--dtype", "float32"]
    arguments += ["--vision-model", str(demo_vision_dirs["demo:tiny-llava"])]
    config = parse_config(arguments, has_gpu=False, env={})
    app, demo, holders = create_server(config, load_in_background=False)
    assert [holder.status().state for holder in holders] == ["ready", "ready"]
    with serving(app) as url:
        yield SimpleNamespace(url=url, demo=demo, model=config.model)


def get_file(server, path: str) -> httpx.Response:
    return httpx.get(f"{server.url}/gradio_api/file={path}", timeout=30)


# ----------------------------------------------------------------------------- files


@pytest.mark.slow
def test_files_outside_the_apps_folders_are_refused(server):
    repo = str(ROOT)
    cache = str(Path(server.demo.GRADIO_CACHE))
    refused = {
        "/etc/passwd": get_file(server, "/etc/passwd"),
        "app.py by absolute path": get_file(server, f"{repo}/app.py"),
        "app.py by relative path": get_file(server, "app.py"),
        "an example by its repository path": get_file(server, f"{repo}/assets/examples/house.png"),
        "traversal out of the cache": get_file(server, f"{cache}/..%2F..%2F..%2Fetc%2Fpasswd"),
        "traversal, dots encoded": get_file(server, f"{cache}/%2E%2E/%2E%2E/%2E%2E/etc/passwd"),
        "relative traversal": get_file(server, "..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd"),
        "the repository's folder": get_file(server, repo),
    }
    for what, response in refused.items():
        assert response.status_code == 403, (what, response.status_code)  # "File not allowed"
        assert "root:" not in response.text and "create_server" not in response.text, what
    assert not server.demo.allowed_paths  # nothing beyond Gradio's own cache and uploads


def example_urls(config) -> dict[str, str]:
    """{file name: URL} of the example images the page's config refers to."""
    found = {}

    def walk(value):
        if isinstance(value, dict):
            path, url = value.get("path"), value.get("url")
            if isinstance(path, str) and isinstance(url, str) and (EXAMPLES / Path(path).name).exists():
                found[Path(path).name] = url
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(config)
    return found


@pytest.mark.slow
def test_the_example_images_the_page_shows_are_served(server):
    config = httpx.get(f"{server.url}/config", timeout=30).json()
    urls = example_urls(config)
    assert {"house.png", "chessboard.png", "smiley.jpg"} <= set(urls)
    for name, url in urls.items():
        # Gradio copies them into its cache when the page is built; that copy is what is served.
        assert f"/gradio_api/file={server.demo.GRADIO_CACHE}" in url, url
        response = httpx.get(url, timeout=30)
        assert response.status_code == 200, name
        assert response.content == (EXAMPLES / name).read_bytes(), name


# ----------------------------------------------------------------------------- logs


@pytest.mark.slow
def test_by_default_no_log_record_holds_a_prompt_or_reply(server, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ["gradio", "httpx", "httpcore", "uvicorn", "backend", "ui", "playground", "transformers"]:
        caplog.set_level(logging.DEBUG, logger=name)
    secret_ui = "zebra umbrella 4711"
    secret_v1 = "walrus teapot 9052"
    reply = Client(server.url, verbose=False).predict(
        message=secret_ui, mode="greedy", max_new_tokens=8, api_name="/chat"
    )
    body = {"model": server.model, "messages": [{"role": "user", "content": secret_v1}], "max_tokens": 8}
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    v1_reply = answer["choices"][0]["message"]["content"]
    assert reply.strip() and v1_reply.strip()
    assert any(record.name.startswith("httpx") for record in caplog.records)  # the capture works
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for text in (secret_ui, secret_v1, reply.strip(), v1_reply.strip()):
        assert text not in logged, text


def test_app_turns_gradio_analytics_off_unless_the_environment_says_otherwise():
    env = {key: value for key, value in os.environ.items() if key != "GRADIO_ANALYTICS_ENABLED"}
    probe = "import app, gradio as gr; print(gr.Blocks().analytics_enabled)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


class StubService:
    holder, limits, stats = "the holder", "the limits", "the stats"

    def chat(self, message, history, settings):
        yield Reply("", False, 0, 0.0, 1, "greedy", queue_position=1)
        yield Reply("Hel", False, 1, 0.1, 1, "greedy")
        yield Reply("Hello there", True, 2, 0.2, 1, "greedy")


def test_log_prompts_logs_each_prompt_and_its_reply_once(caplog):
    caplog.set_level(logging.INFO, logger="playground.prompts")
    service = LoggedChat(StubService())
    assert service.holder == "the holder"
    replies = list(service.chat("What is up?", [], None))
    assert replies[-1].text == "Hello there"
    messages = [record.getMessage() for record in caplog.records if record.name == "playground.prompts"]
    assert len(messages) == 2
    assert "chat" in messages[0] and "'What is up?'" in messages[0]
    assert "reply" in messages[1] and "'Hello there'" in messages[1]
    assert all(record.levelno == logging.INFO for record in caplog.records)


def test_log_prompts_is_off_unless_asked():
    assert not parse_config([], has_gpu=False, env={}).server.log_prompts
    assert parse_config(["--log-prompts"], has_gpu=False, env={}).server.log_prompts
    assert parse_config([], has_gpu=False, env={"PLAYGROUND_LOG_PROMPTS": "1"}).server.log_prompts


# ----------------------------------------------------------------------------- model code


def capture_from_pretrained(monkeypatch) -> list[tuple[str, object]]:
    """(class, trust_remote_code) of every from_pretrained call our loaders make; the loads go ahead."""
    import transformers

    seen = []
    names = [
        "AutoConfig",
        "AutoTokenizer",
        "AutoProcessor",
        "AutoModelForCausalLM",
        "AutoModelForImageTextToText",
    ]
    for name in names:
        cls = getattr(transformers, name)
        original = cls.from_pretrained

        def recording(*args, _name=name, _original=original, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") in (
                "backend.models.loading",
                "backend.models.vision_loading",
            ):
                seen.append((_name, kwargs.get("trust_remote_code", "not passed")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    return seen


def test_remote_code_is_off_by_default_everywhere():
    config = parse_config([], has_gpu=False, env={})
    assert not config.placement.trust_remote_code
    assert ModelSpec("any/model").trust_remote_code is False
    from app import model_spec

    assert model_spec(config, config.model, config.quantization).trust_remote_code is False
    on = parse_config(["--trust-remote-code"], has_gpu=False, env={})
    assert model_spec(on, on.model, on.quantization).trust_remote_code is True
    assert parse_config(
        [], has_gpu=False, env={"PLAYGROUND_TRUST_REMOTE_CODE": "true"}
    ).placement.trust_remote_code


def test_loaders_pass_trust_remote_code_from_the_spec(monkeypatch, caplog, demo_text_dir, demo_vision_dirs):
    seen = capture_from_pretrained(monkeypatch)
    load_text_model(ModelSpec(str(demo_text_dir), dtype="float32"))
    assert seen == [("AutoConfig", False), ("AutoTokenizer", False), ("AutoModelForCausalLM", False)]
    assert "trust_remote_code is ON" not in caplog.text

    seen.clear()
    load_vision_model(ModelSpec(str(demo_vision_dirs["demo:tiny-llava"]), dtype="float32"))
    assert seen == [("AutoConfig", False), ("AutoProcessor", False), ("AutoModelForImageTextToText", False)]

    seen.clear()
    with caplog.at_level(logging.WARNING):
        load_text_model(ModelSpec(str(demo_text_dir), dtype="float32", trust_remote_code=True))
    assert [trust for _, trust in seen] == [True, True, True]
    assert "trust_remote_code is ON" in caplog.text
