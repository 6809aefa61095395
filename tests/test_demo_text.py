from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backend.models.demo_text import (
    DEMO_TEXT_MODEL,
    MARKER_FILE,
    build_demo_text_model,
    demo_text_model_dir,
    is_demo_model_dir,
)

TRICKY = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\ttabbed\n\n",
    "naïve café — résumé, Zürich",
    "日本語のテキスト、中文文本",
    "emoji: 🦊🐱‍👤👍🏽 and flags 🇫🇷",
    "def f(x):\n    return {'a': [x, x ** 2]}  # code",
    "USER: hi\nASSISTANT: hello</s>",
    "\x00\x01 control \u200b zero-width",
]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What colour is the cat?"},
    {"role": "assistant", "content": "Orange."},
    {"role": "user", "content": [{"type": "text", "text": "And the dog?"}]},
]


def test_public_name() -> None:
    assert DEMO_TEXT_MODEL == "demo:tiny-llama-chat"


def test_build_is_deterministic_and_keeps_global_rng(demo_text_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    other = build_demo_text_model(tmp_path / "again")
    assert torch.equal(before, torch.random.get_rng_state())
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (other / name).read_bytes() == (demo_text_dir / name).read_bytes(), name


def test_marker_file(demo_text_dir: Path) -> None:
    assert is_demo_model_dir(demo_text_dir)
    marker = json.loads((demo_text_dir / MARKER_FILE).read_text())
    assert marker == {"demo": True, "kind": "text", "version": 1}
    assert (demo_text_dir / "model.safetensors").is_file()
    assert not is_demo_model_dir(demo_text_dir.parent)


def test_cache_reuse_does_not_rebuild(demo_text_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_root = demo_text_dir.parent.parent
    mtime = (demo_text_dir / "model.safetensors").stat().st_mtime_ns

    def fail(_: Path) -> Path:
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr("backend.models.demo_text.build_demo_text_model", fail)
    assert demo_text_model_dir(cache_root) == demo_text_dir
    assert (demo_text_dir / "model.safetensors").stat().st_mtime_ns == mtime
    monkeypatch.setenv("PLAYGROUND_CACHE", str(cache_root))
    assert demo_text_model_dir() == demo_text_dir


def test_half_built_dir_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "demo" / "tiny-llama-chat-v1"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{ truncated")
    assert not is_demo_model_dir(broken)
    calls: list[Path] = []

    def fake_build(target: Path) -> Path:  # the real build is covered elsewhere; keep this test fast
        calls.append(target)
        (target / "config.json").write_text("{}")
        (target / MARKER_FILE).write_text("{}")
        return target

    monkeypatch.setattr("backend.models.demo_text.build_demo_text_model", fake_build)
    assert demo_text_model_dir(tmp_path) == broken
    assert len(calls) == 1 and calls[0] != broken  # built elsewhere, then moved into place
    assert is_demo_model_dir(broken)
    assert (broken / "config.json").read_text() == "{}"
    assert sorted(p.name for p in broken.parent.iterdir()) == [broken.name]  # no temp dir left


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(target: Path) -> Path:
        (target / "partial").write_text("x")
        raise RuntimeError("interrupted")

    monkeypatch.setattr("backend.models.demo_text.build_demo_text_model", boom)
    with pytest.raises(RuntimeError):
        demo_text_model_dir(tmp_path)
    assert list((tmp_path / "demo").iterdir()) == []


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_round_trip(demo_tokenizer, text: str) -> None:
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    assert demo_tokenizer.unk_token_id not in ids
    assert demo_tokenizer.decode(ids) == text
    with_bos = demo_tokenizer.encode(text)
    assert with_bos == [demo_tokenizer.bos_token_id, *ids]


def test_special_tokens(demo_tokenizer) -> None:
    tok = demo_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id}) == 4
    assert tok.padding_side == "left"
    assert 900 <= len(tok) <= 1100
    ids = tok("hello")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_chat_template_renders_roles(demo_tokenizer) -> None:
    text = demo_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s>You are terse.\n\n"
        "USER: What colour is the cat?\n"
        "ASSISTANT: Orange.</s>\n"
        "USER: And the dog?\n"
        "ASSISTANT:"
    )
    no_prompt = demo_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert no_prompt == text.removesuffix("ASSISTANT:")


def test_chat_template_rejects_unknown_role(demo_tokenizer) -> None:
    with pytest.raises(Exception, match="Unsupported role"):
        demo_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_template_adds_bos_once(demo_tokenizer) -> None:
    tok = demo_tokenizer
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # tokenize=True must follow the same convention (no second BOS from the post-processor).
    direct = tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert list(direct["input_ids"]) == ids
    assert tok.decode(ids) == text


def test_model_config(demo_model, demo_tokenizer) -> None:
    cfg = demo_model.config
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= len(demo_tokenizer)
    assert not cfg.tie_word_embeddings
    assert demo_model.dtype == torch.float32
    for module in demo_model.modules():
        if isinstance(module, torch.nn.Linear):
            assert module.in_features % 64 == 0, module
    gen = demo_model.generation_config
    assert gen.eos_token_id == demo_tokenizer.eos_token_id
    assert gen.bos_token_id == demo_tokenizer.bos_token_id
    assert gen.pad_token_id == demo_tokenizer.pad_token_id


def test_model_generates(demo_model, demo_tokenizer) -> None:
    tok = demo_tokenizer
    text = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    inputs = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = demo_model.generate(**inputs, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert new.shape[0] == 5
    assert isinstance(tok.decode(new, skip_special_tokens=True), str)


def test_batch_generation_left_padding(demo_model, demo_tokenizer) -> None:
    batch = demo_tokenizer(
        ["short", "a much longer prompt about a red fox"], return_tensors="pt", padding=True
    )
    assert batch["input_ids"][0, 0] == demo_tokenizer.pad_token_id  # left padded
    with torch.no_grad():
        out = demo_model.generate(**batch, do_sample=False, max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_lost_race_uses_winners_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "demo" / "tiny-llama-chat-v1"

    def build_while_other_process_wins(tmp: Path) -> Path:
        (tmp / MARKER_FILE).write_text("{}")
        target.mkdir()  # another process finishes first
        (target / MARKER_FILE).write_text('{"winner": true}')
        return tmp

    monkeypatch.setattr("backend.models.demo_text.build_demo_text_model", build_while_other_process_wins)
    assert demo_text_model_dir(tmp_path) == target
    assert json.loads((target / MARKER_FILE).read_text()) == {"winner": True}
    assert [p.name for p in target.parent.iterdir()] == [target.name]
