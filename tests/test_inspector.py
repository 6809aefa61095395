"""Inspector numbers against an independent computation on the tiny model."""

from __future__ import annotations

import html
import math
import threading

import pytest
import torch

from backend.decode.inspector import Inspector, token_after
from backend.errors import BadInput
from backend.models.holder import ModelHolder
from backend.models.loading import ModelSpec
from backend.prompting import Turn, render_chat
from backend.services.chat import ChatService
from backend.settings import GenerationSettings, ServerLimits
from ui.inspector_tab import with_picked_token
from ui.inspector_view import distribution_html

TEXT = "The weather today is"
PLAIN = GenerationSettings(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def inspector(demo_model, demo_tokenizer):
    return Inspector(demo_model, demo_tokenizer)


@pytest.fixture(scope="module")
def reference(demo_model, demo_tokenizer):
    """Plain softmax of the last-position logits over the tokenizer's tokens (the embedding is padded
    past them), computed here without our code."""
    ids = demo_tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        logits = demo_model(torch.tensor([ids])).logits[0, -1, : len(demo_tokenizer)].double()
    return ids, torch.softmax(logits, dim=-1)


def test_p_raw_is_the_plain_softmax_sorted_descending(inspector, reference):
    ids, probs = reference
    result = inspector.next_tokens(ids, PLAIN, 20)
    expected = torch.topk(probs, 20)
    assert [t.id for t in result.tokens] == expected.indices.tolist()
    assert [t.p_raw for t in result.tokens] == pytest.approx(expected.values.tolist(), rel=1e-4)
    assert result.entropy_raw == pytest.approx(float(-(probs * probs.log()).sum()), rel=1e-4)


def test_top_k_keeps_exactly_k(inspector, reference):
    ids, probs = reference
    result = inspector.next_tokens(
        ids, PLAIN.__class__(**{**PLAIN.to_dict(), "stop_words": (), "top_k": 5}), 20
    )
    kept = [t for t in result.tokens if t.p_final > 0]
    assert [t.id for t in kept] == torch.topk(probs, 5).indices.tolist()
    top5 = torch.topk(probs, 5).values
    assert [t.p_final for t in kept] == pytest.approx((top5 / top5.sum()).tolist(), rel=1e-4)
    assert sum(t.p_final for t in result.tokens) == pytest.approx(1.0, rel=1e-4)


def test_top_p_keeps_the_smallest_set_reaching_p(demo_model, demo_tokenizer):
    inspector = Inspector(demo_model, demo_tokenizer)
    ids = demo_tokenizer(TEXT)["input_ids"]
    # A peaked distribution makes top-p bite: temperature 0.05 sharpens the random model's logits.
    settings = GenerationSettings(temperature=0.05, top_k=0, top_p=0.9, repetition_penalty=1.0)
    # Generation never draws ids past the tokenizer's vocabulary (the embedding is padded to 1024).
    logits = inspector.logits(ids).double()[: len(demo_tokenizer)]
    sharpened = torch.softmax(logits / 0.05, dim=-1)
    ordered = torch.sort(sharpened, descending=True).values
    needed = int((torch.cumsum(ordered, 0) < 0.9).sum()) + 1  # smallest prefix whose sum reaches 0.9
    result = inspector.next_tokens(ids, settings, 100)
    assert sum(t.p_final > 0 for t in result.tokens) == needed


def test_temperature_to_zero_approaches_one_hot(inspector, reference):
    ids, probs = reference
    finals = [
        inspector.next_tokens(ids, GenerationSettings(temperature=t, top_k=0, top_p=1.0), 1).tokens[0].p_final
        for t in (1.0, 0.1, 0.01)
    ]
    assert finals[0] < finals[1] < finals[2]
    greedy = inspector.next_tokens(ids, GenerationSettings(temperature=0.0, top_k=0, top_p=1.0), 3)
    assert [t.p_final for t in greedy.tokens] == [1.0, 0.0, 0.0]
    assert greedy.tokens[0].id == int(probs.argmax())
    assert greedy.entropy_final == 0.0


def test_step_is_argmax_for_greedy_and_seeded_for_sampling(inspector, reference):
    ids, probs = reference
    assert inspector.step(ids, GenerationSettings(mode="greedy")) == int(probs.argmax())
    sampled = {
        inspector.step(ids, GenerationSettings(seed=s, temperature=1.0, top_k=0, top_p=1.0)) for s in range(8)
    }
    assert len(sampled) > 1
    assert inspector.step(ids, GenerationSettings(seed=3)) == inspector.step(ids, GenerationSettings(seed=3))


@pytest.fixture(scope="module")
def service(demo_text_dir):
    holder = ModelHolder(ModelSpec(str(demo_text_dir), dtype="float32"), fallback_to_demo=False)
    holder.load()
    return ChatService(holder, ServerLimits())


def test_service_tokenises_with_bos_as_the_tokenizer_adds_it(service, reference):
    ids, probs = reference
    result = service.next_tokens(TEXT, PLAIN, 3)
    assert [t.id for t in result.tokens] == torch.topk(probs, 3).indices.tolist()
    assert service.text_ids(TEXT) == ids


def test_step_text_appends_one_token(service):
    stepped = service.step_text(TEXT, GenerationSettings(mode="greedy"))
    assert stepped.startswith(TEXT) and len(stepped) > len(TEXT)


def test_chat_context_renders_the_conversation(service):
    history = [Turn("hello", "hi there")]
    context = service.chat_context(history, "Be brief.")
    assert context.endswith("hi there") and "hello" in context and "Be brief." in context
    # Exactly how the model reads the reply once the chat goes on (the space after "ASSISTANT:" too).
    tokenizer = service.holder.get().tokenizer
    assert render_chat(tokenizer, "Be brief.", history, "next")[0].startswith(context)
    with pytest.raises(BadInput, match="chat is empty"):
        service.chat_context([], "")


def test_view_escapes_tokens_and_marks_removed(service):
    result = service.next_tokens(TEXT, GenerationSettings(top_k=2, top_p=1.0), 5).to_dict()
    result["tokens"][0]["text"] = "<img src=x onerror=alert(1)>"
    page = distribution_html(result)
    assert "<img" not in page and "&lt;img" in page
    assert page.count('class="removed"') == 3
    assert not math.isnan(result["entropy_final"])
    assert "source-note" not in page
    remote = {**result, "note": "From the backend server's top 5 <log-probabilities>."}
    assert "top 5 &lt;log-probabilities&gt;" in distribution_html(remote)  # said, and escaped


def test_service_runs_the_forward_pass_on_a_thread_that_ends(service, monkeypatch):
    """A lasting request thread that ran torch would keep an OpenMP team and slow the engine."""
    ran_on = []
    original = Inspector.logits

    def recording(self, *args, **kwargs):
        ran_on.append(threading.current_thread())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Inspector, "logits", recording)
    service.next_tokens("Once upon a", GenerationSettings(), 5)
    service.step_text("Once upon a", GenerationSettings(seed=1))
    assert len(ran_on) == 2
    assert all(thread is not threading.current_thread() and not thread.is_alive() for thread in ran_on)


# ----------------------------------------------------------------------------- a click on a listed token


def test_append_token_adds_exactly_the_listed_token(service):
    listed = service.next_tokens(TEXT, PLAIN, 5).tokens
    for token in listed:
        assert service.append_token(TEXT, token.id) == TEXT + token.text, token
    with pytest.raises(BadInput, match="Token id 99999 is not one of this tokenizer's"):
        service.append_token(TEXT, 99999)


def test_a_token_is_appended_as_it_reads_after_the_text():
    """A SentencePiece token decoded alone loses its leading space; after the text it keeps it."""

    class Words:
        words = ["<s>", "Hello", "the"]

        def decode(self, ids, skip_special_tokens=False):
            return " ".join(self.words[i] for i in ids)

    assert Words().decode([2]) == "the"
    assert token_after(Words(), [0, 1], 2) == " the"


def test_a_click_sends_the_rows_id_and_raw_text(service):
    result = service.next_tokens(TEXT, PLAIN, 3).to_dict()
    result["tokens"][1] = {**result["tokens"][1], "id": -1, "text": ' "a" <b>\n'}
    page = distribution_html(result)
    first = result["tokens"][0]
    assert f'data-token-id="{first["id"]}" data-token-text="{html.escape(first["text"], quote=True)}"' in page
    assert 'data-token-id="-1" data-token-text=" &quot;a&quot; &lt;b&gt;\n"' in page
    # What the click handler makes of it: by id where there is one, else (a remote engine's) the text.
    assert with_picked_token(service, TEXT, {"token_id": first["id"], "token_text": "ignored"}) == (
        TEXT + first["text"]
    )
    assert with_picked_token(service, TEXT, {"token_id": -1, "token_text": " more"}) == TEXT + " more"
    for picked in (None, {}, {"token_id": None, "token_text": "x"}, {"token_id": True, "token_text": "x"}):
        with pytest.raises(BadInput, match="came without its id and text"):
            with_picked_token(service, TEXT, picked)


def test_a_listed_token_reads_as_it_would_after_the_text():
    """SentencePiece decodes "▁the" alone as "the": the list shows it after its context, " the"."""

    class Words:
        words = ["<s>", "Hello", "the"]

        def __len__(self):
            return len(self.words)

        def decode(self, ids, skip_special_tokens=False):
            return " ".join(self.words[i] for i in ids)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(3, 2)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.tensor([[[0.0, 1.0, 5.0]]])})()

    listed = Inspector(Model(), Words()).next_tokens([0, 1], PLAIN, 2).tokens
    assert [(token.id, token.text) for token in listed] == [(2, " the"), (1, " Hello")]
