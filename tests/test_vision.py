from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from backend.decode.image_prompts import caption_prompt, encode_image_prompt, render_llava_chat
from backend.decode.vision_replies import caption_stream, chat_with_image_stream, image_prefill
from backend.errors import BadImage, ContextOverflow, UserError
from backend.models.demo_text import MARKER_FILE
from backend.models.demo_vision import (
    DEMO_BLIP2,
    DEMO_INSTRUCTBLIP,
    DEMO_LLAVA,
    build_demo_vision_model,
    demo_vision_model_dir,
)
from backend.models.loading import ModelSpec
from backend.models.vision_loading import LoadedVision, UnsupportedModel, detect_family, load_vision_model
from backend.prompting import Turn
from backend.replies import Reply
from backend.settings import GenerationSettings, ServerLimits, request_settings

FAMILY = {DEMO_BLIP2: "blip-2", DEMO_INSTRUCTBLIP: "instructblip", DEMO_LLAVA: "llava"}
GREEDY = GenerationSettings(seed=0, mode="greedy", repetition_penalty=1.0, max_new_tokens=8)
SAMPLE = GenerationSettings(seed=7, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12)


def gradient() -> Image.Image:
    pixels = (np.arange(32 * 32 * 3).reshape(32, 32, 3) * 7 % 255).astype("uint8")
    return Image.fromarray(pixels)


def red() -> Image.Image:
    return Image.new("RGB", (50, 40), (200, 10, 10))


@pytest.fixture(scope="session")
def loaded(demo_vision_dirs: dict[str, Path]) -> dict[str, LoadedVision]:
    """Every demo vision model, fp32 and unquantized, loaded through load_vision_model from its directory."""
    return {
        name: load_vision_model(ModelSpec(str(path), dtype="float32"))
        for name, path in demo_vision_dirs.items()
    }


def first_logits(model: LoadedVision, image: Image.Image, prompt: str) -> torch.Tensor:
    return image_prefill(model, encode_image_prompt(model, image, prompt)).prefill().logits[0, -1]


def reply(stream) -> Reply:
    replies = list(stream)
    assert replies and replies[-1].done and all(not r.done for r in replies[:-1])
    return replies[-1]


# ----------------------------------------------------------------------------- demo models


def test_demo_dirs_are_complete_hf_dirs(demo_vision_dirs: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    for name, path in demo_vision_dirs.items():
        marker = json.loads((path / MARKER_FILE).read_text())
        assert marker == {"demo": True, "kind": "vision", "name": name, "version": 1}
        assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert tokenizer.convert_tokens_to_ids("<image>") == 1000
        assert tokenizer.added_tokens_decoder[1000].special
        assert tokenizer.decode([65, 1000, 66], skip_special_tokens=True) == tokenizer.decode([65, 66])
    assert "<image>" in (demo_vision_dirs[DEMO_LLAVA] / "chat_template.jinja").read_text()


def test_build_is_deterministic_and_keeps_global_rng(
    demo_vision_dirs: dict[str, Path], tmp_path: Path
) -> None:
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    again = build_demo_vision_model(DEMO_LLAVA, tmp_path / "again")
    assert torch.equal(before, torch.random.get_rng_state())
    for file in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (again / file).read_bytes() == (demo_vision_dirs[DEMO_LLAVA] / file).read_bytes(), file


def test_loaded_through_auto_classes(loaded: dict[str, LoadedVision]) -> None:
    for name, model in loaded.items():
        assert model.family == FAMILY[name] and model.is_demo and model.dtype == torch.float32
        assert model.plan.device_map == {"": "cpu"} and model.tokenizer is model.processor.tokenizer
        assert model.context_window == 512


def test_linear_inputs_are_multiples_of_64(loaded: dict[str, LoadedVision]) -> None:
    for model in loaded.values():
        sizes = {m.in_features for m in model.model.modules() if isinstance(m, torch.nn.Linear)}
        assert sizes and all(size % 64 == 0 for size in sizes)


def test_demo_name_loads_from_the_cache(demo_vision_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAYGROUND_CACHE", str(demo_vision_cache))

    def fail(*_):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr("backend.models.demo_vision.build_demo_vision_model", fail)
    model = load_vision_model(ModelSpec(DEMO_LLAVA, dtype="float32"))
    assert model.is_demo and model.family == "llava"
    assert model.path == demo_vision_model_dir(DEMO_LLAVA, demo_vision_cache)
    with pytest.raises(ValueError, match="unknown demo vision model"):
        demo_vision_model_dir("demo:nope", demo_vision_cache)


# ----------------------------------------------------------------------------- family


def test_detect_family_from_model_type() -> None:
    from transformers import Blip2Config, InstructBlipConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    assert detect_family(Blip2Config()) == "blip-2"
    assert detect_family(InstructBlipConfig()) == "instructblip"
    assert detect_family(LlavaConfig()) == "llava"
    assert detect_family(LlavaNextConfig()) == "llava_next"
    assert detect_family({"model_type": "llava"}) == "llava"
    with pytest.raises(UnsupportedModel, match="'llama'") as error:
        detect_family(LlamaConfig())
    assert isinstance(error.value, UserError) and isinstance(error.value, ValueError)


def test_detect_family_ignores_the_name(demo_vision_dirs: dict[str, Path], tmp_path: Path) -> None:
    renamed = tmp_path / "llava-1.5-7b-hf"
    shutil.copytree(demo_vision_dirs[DEMO_BLIP2], renamed)
    model = load_vision_model(ModelSpec(str(renamed), dtype="float32"))
    assert model.family == "blip-2"


def test_gpu_plan_for_a_vision_config_needs_no_weights() -> None:
    from transformers import AutoModelForImageTextToText, LlavaConfig

    from backend.placement.planner import plan_device_map

    budgets = {0: 2 * 2**30, 1: 2 * 2**30}
    plan = plan_device_map(
        LlavaConfig(), "4bit", torch.float16, budgets, 64 * 2**30, 2048, 1, AutoModelForImageTextToText
    )
    assert plan.device_map["model.vision_tower"] == 0
    assert {0, 1} <= set(plan.device_map.values())


# ----------------------------------------------------------------------------- prompts


def test_caption_prompts(loaded: dict[str, LoadedVision]) -> None:
    blip, instruct, llava = (loaded[n].processor for n in (DEMO_BLIP2, DEMO_INSTRUCTBLIP, DEMO_LLAVA))
    assert caption_prompt("blip-2", blip, "") == ""
    assert caption_prompt("blip-2", blip, " how many? ") == "Question: how many? Answer:"
    assert caption_prompt("instructblip", instruct, "") == "A short image description:"
    assert caption_prompt("instructblip", instruct, "Why?") == "Why?"
    assert caption_prompt("llava", llava, "") == "USER: <image>\nDescribe the image.\nASSISTANT:"
    assert caption_prompt("llava", llava, "What is red?").endswith("What is red?\nASSISTANT:")


def test_llava_chat_puts_the_image_in_the_first_user_turn(loaded: dict[str, LoadedVision]) -> None:
    history = [Turn("What is it?", "A thing."), Turn("Big?", "Small.")]
    text = render_llava_chat(loaded[DEMO_LLAVA].processor, "Be brief.", history, "Colour?")
    assert text == (
        "Be brief.\n\nUSER: <image>\nWhat is it?\nASSISTANT: A thing.</s>\n"
        "USER: Big?\nASSISTANT: Small.</s>\nUSER: Colour?\nASSISTANT:"
    )
    inputs = encode_image_prompt(loaded[DEMO_LLAVA], gradient(), text)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(1000) == 16 and ids.count(loaded[DEMO_LLAVA].tokenizer.bos_token_id) == 1


def test_llava_without_chat_template_uses_vicuna_v1_explicitly() -> None:
    processor = SimpleNamespace(chat_template=None, image_token="<image>")
    assert render_llava_chat(processor, "Sys.", [], "Hi?") == "Sys. USER: <image>\nHi? ASSISTANT:"
    text = render_llava_chat(processor, "Sys.", [Turn("Hi?", "Yo.")], "More?")
    assert text.startswith("Sys. USER: <image>\nHi? ASSISTANT: Yo.</s>") and text.count("<image>") == 1
    assert text.endswith("USER: More? ASSISTANT:")


# ----------------------------------------------------------------------------- the image reaches the model


@pytest.mark.parametrize("name", [DEMO_BLIP2, DEMO_INSTRUCTBLIP, DEMO_LLAVA])
def test_image_changes_first_step_logits(loaded: dict[str, LoadedVision], name: str) -> None:
    model = loaded[name]
    prompt = caption_prompt(model.family, model.processor, "what is it?")
    first, same, other = (first_logits(model, image, prompt) for image in (gradient(), gradient(), red()))
    assert torch.equal(first, same)
    assert (first - other).abs().max() > 1e-3
    # Our merge of image features equals the model's own forward pass.
    with torch.inference_mode():
        reference = model.model(**encode_image_prompt(model, gradient(), prompt)).logits[0, -1]
    torch.testing.assert_close(first, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [DEMO_BLIP2, DEMO_INSTRUCTBLIP, DEMO_LLAVA])
def test_greedy_caption_is_the_argmax_continuation(loaded: dict[str, LoadedVision], name: str) -> None:
    from backend.decode.generation import padded_token_ids

    model = loaded[name]
    final = reply(caption_stream(model, gradient(), "what is it?", GREEDY))
    inputs = encode_image_prompt(
        model, gradient(), caption_prompt(model.family, model.processor, "what is it?")
    )
    with torch.inference_mode():
        output = model.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=GREEDY.max_new_tokens,
            suppress_tokens=padded_token_ids(model.model, model.tokenizer),  # as our sampler masks them
        )
    expected = output[0, inputs["input_ids"].shape[-1] :].tolist()
    assert [token.id for token in final.tokens] == expected[: len(final.tokens)]
    assert final.finish_reason == "eos" or len(final.tokens) == GREEDY.max_new_tokens


def test_flan_t5_blip2_streams_its_decoder(loaded: dict[str, LoadedVision]) -> None:
    """Encoder-decoder LM: the greedy decoder stream equals generate() (penalty on decoder ids only)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config

    demo = loaded[DEMO_BLIP2]
    tokenizer = demo.tokenizer
    text = T5Config(
        vocab_size=1024,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Blip2Config(
        vision_config=demo.model.config.vision_config.to_dict(),
        qformer_config=demo.model.config.qformer_config.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=8,
        image_token_index=1000,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        blip = Blip2ForConditionalGeneration(config).eval()
    model = replace(demo, model=blip)
    settings = replace(GREEDY, repetition_penalty=2.0, max_new_tokens=6)
    final = reply(caption_stream(model, gradient(), "what?", settings))
    inputs = encode_image_prompt(model, gradient(), "Question: what? Answer:")
    with torch.inference_mode():
        output = blip.generate(
            **inputs,
            do_sample=False,
            repetition_penalty=2.0,
            max_new_tokens=6,
            suppress_tokens=list(range(len(tokenizer), 1024)),
        )
    assert [t.id for t in final.tokens] == output[0, 1:].tolist()
    beam = reply(
        caption_stream(model, gradient(), "what?", GenerationSettings(mode="beam", max_new_tokens=4))
    )
    assert beam.new_tokens <= 4


def test_llava_next_streams_like_generate(loaded: dict[str, LoadedVision]) -> None:
    """LLaVA-NeXT: several crops per image and image_sizes pass through the same prefill."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    demo = loaded[DEMO_LLAVA]
    grid = [[32, 32], [32, 64], [64, 32]]
    config = LlavaNextConfig(
        vision_config=demo.model.config.vision_config.to_dict(),
        text_config=demo.model.config.text_config.to_dict(),
        image_token_index=1000,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=grid,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        llava_next = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=grid
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=demo.tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=demo.processor.chat_template,
    )
    model = replace(demo, model=llava_next, processor=processor, family="llava_next")
    prompt = caption_prompt("llava_next", processor, "what?")
    assert (first_logits(model, gradient(), prompt) - first_logits(model, red(), prompt)).abs().max() > 1e-3
    final = reply(caption_stream(model, red(), "what?", GREEDY))
    inputs = encode_image_prompt(model, red(), prompt)
    assert inputs["pixel_values"].dim() == 5 and "image_sizes" in inputs
    with torch.inference_mode():
        output = llava_next.generate(
            **inputs, do_sample=False, max_new_tokens=8, suppress_tokens=list(range(1001, 1024))
        )
    assert [t.id for t in final.tokens] == output[0, inputs["input_ids"].shape[-1] :].tolist()[
        : len(final.tokens)
    ]


# ----------------------------------------------------------------------------- streaming behaviour


@pytest.mark.parametrize("name", [DEMO_BLIP2, DEMO_LLAVA])
def test_seeded_sampling_is_reproducible(loaded: dict[str, LoadedVision], name: str) -> None:
    model = loaded[name]
    torch.manual_seed(99)
    rng = torch.random.get_rng_state()
    first = reply(caption_stream(model, gradient(), "", SAMPLE))
    assert torch.equal(rng, torch.random.get_rng_state())  # a per-request generator, not the global RNG
    again = reply(caption_stream(model, gradient(), "", SAMPLE))
    other = reply(caption_stream(model, gradient(), "", replace(SAMPLE, seed=8)))
    ids = [t.id for t in first.tokens]
    assert (again.text, [t.id for t in again.tokens]) == (first.text, ids)
    assert [t.id for t in other.tokens] != ids
    assert (first.seed, other.seed, first.mode) == (7, 8, "sample")


def test_a_seed_drawn_at_the_edge_is_the_one_reported(loaded: dict[str, LoadedVision]) -> None:
    settings = request_settings({"seed": -1, "max_new_tokens": 2}, ServerLimits())
    assert settings.seed >= 0
    assert reply(caption_stream(loaded[DEMO_BLIP2], gradient(), "", settings)).seed == settings.seed


@pytest.mark.parametrize("name", [DEMO_BLIP2, DEMO_LLAVA])
def test_stop_words_cut_the_caption(loaded: dict[str, LoadedVision], name: str) -> None:
    model = loaded[name]
    raw = "".join(token.text for token in reply(caption_stream(model, gradient(), "what?", GREEDY)).tokens)
    word = next(raw[i : i + 3] for i in range(3, len(raw)) if "\ufffd" not in raw[i : i + 3])
    settings = replace(GREEDY, stop_words=(word,))
    replies = list(caption_stream(model, gradient(), "what?", settings))
    assert replies[-1].text == raw[: raw.find(word)].lstrip()
    assert replies[-1].finish_reason == "stop_word"
    assert all(word not in r.text for r in replies)


def test_closing_the_stream_cancels(loaded: dict[str, LoadedVision]) -> None:
    stream = caption_stream(loaded[DEMO_LLAVA], gradient(), "", GenerationSettings(seed=1, max_new_tokens=50))
    assert next(stream).new_tokens == 1
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)


@pytest.mark.parametrize("name", [DEMO_BLIP2, DEMO_INSTRUCTBLIP, DEMO_LLAVA])
def test_beam_gives_one_final_reply(
    loaded: dict[str, LoadedVision], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = loaded[name].model
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kwargs: calls.append(kwargs) or generate(**kwargs))
    settings = GenerationSettings(mode="beam", num_beams=3, max_new_tokens=6)
    stream = caption_stream(loaded[name], gradient(), "", settings)
    assert not calls  # lazy, like the streamed modes
    replies = list(stream)
    assert calls[0]["generation_config"].num_beams == 3 and "pixel_values" in calls[0]
    assert len(replies) == 1 and replies[0].done and replies[0].mode == "beam"
    assert 0 < replies[0].new_tokens <= 6 or replies[0].finish_reason == "eos"


def test_oversized_question_raises_before_streaming(loaded: dict[str, LoadedVision]) -> None:
    question = "tell me more " * 400
    for model in loaded.values():
        with pytest.raises(ContextOverflow, match="context"):
            caption_stream(model, gradient(), question, GREEDY)
    with pytest.raises(ContextOverflow):
        chat_with_image_stream(loaded[DEMO_LLAVA], gradient(), [], question, GREEDY)


def test_not_an_image_is_bad_image(loaded: dict[str, LoadedVision]) -> None:
    with pytest.raises(BadImage):
        caption_stream(loaded[DEMO_BLIP2], None, "", GREEDY)


# ----------------------------------------------------------------------------- visual chat


def test_llava_chat_keeps_the_image_in_context(loaded: dict[str, LoadedVision]) -> None:
    model = loaded[DEMO_LLAVA]
    history = [Turn("What is in the picture?", "A pattern.")]
    text = render_llava_chat(model.processor, GREEDY.system_prompt, history, "And its colour?")
    assert text.count("<image>") == 1 and text.index("<image>") < text.index("A pattern.")
    assert (first_logits(model, gradient(), text) - first_logits(model, red(), text)).abs().max() > 1e-3
    final = reply(chat_with_image_stream(model, gradient(), history, "And its colour?", GREEDY))
    assert final.text and final.notice is None


def test_llava_chat_drops_old_turns_but_not_the_image(loaded: dict[str, LoadedVision]) -> None:
    history = [Turn("long " * 150, "ok"), Turn("and?", "fine")]
    settings = replace(GREEDY, max_new_tokens=200)
    final = reply(chat_with_image_stream(loaded[DEMO_LLAVA], gradient(), history, "Colour?", settings))
    assert final.notice and "1 oldest turn" in final.notice


def test_chat_needs_llava(loaded: dict[str, LoadedVision]) -> None:
    with pytest.raises(UnsupportedModel, match="LLaVA"):
        chat_with_image_stream(loaded[DEMO_BLIP2], gradient(), [], "hi", GREEDY)


# ----------------------------------------------------------------------------- quantization


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
@pytest.mark.parametrize("name", [DEMO_BLIP2, DEMO_LLAVA])
def test_quantized_vision_models_caption(
    demo_vision_dirs: dict[str, Path], name: str, quantization: str
) -> None:
    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 warns on every matmul
    model = load_vision_model(ModelSpec(str(demo_vision_dirs[name]), quantization=quantization))
    kind = bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt
    assert any(isinstance(m, kind) for m in model.language_model.modules())
    assert not isinstance(model.model.get_output_embeddings(), kind)  # the head stays full precision
    if model.family == "blip-2":
        assert not any(isinstance(m, kind) for m in model.model.qformer.modules())
        assert model.model.query_tokens.dtype.is_floating_point
    for settings in (SAMPLE, GenerationSettings(mode="beam", num_beams=2, max_new_tokens=4)):
        assert reply(caption_stream(model, gradient(), "what?", settings)).new_tokens > 0


# ----------------------------------------------------------------------------- several images


def test_llava_chat_places_each_image_in_the_turn_that_sent_it(loaded: dict[str, LoadedVision]) -> None:
    model = loaded[DEMO_LLAVA]
    history = [Turn("Compare these.", "Alike."), Turn("Big?", "Small.")]
    text = render_llava_chat(model.processor, "", history, "And this one?", [2, 0, 1])
    assert text == (
        "USER: <image>\n<image>\nCompare these.\nASSISTANT: Alike.</s>\n"
        "USER: Big?\nASSISTANT: Small.</s>\nUSER: <image>\nAnd this one?\nASSISTANT:"
    )
    plain = SimpleNamespace(chat_template=None, image_token="<image>")
    vicuna = render_llava_chat(plain, "Sys.", history, "And this one?", [2, 0, 1])
    assert vicuna.startswith("Sys. USER: <image>\n<image>\nCompare these. ASSISTANT: Alike.</s>USER: Big?")
    assert vicuna.endswith("USER: <image>\nAnd this one? ASSISTANT:")
    inputs = encode_image_prompt(model, [red(), gradient(), gradient()], text)
    assert inputs["input_ids"][0].tolist().count(1000) == 3 * 16  # one block of 16 image tokens each
    # In the order sent: the processor pairs the i-th image with the i-th placeholder.
    own = model.processor(images=[red(), gradient(), gradient()], text=text, return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], own["pixel_values"])


def test_llava_chat_drops_old_turns_with_their_images(loaded: dict[str, LoadedVision]) -> None:
    from backend.images import ConversationImages

    history = [Turn("long " * 150, "ok"), Turn("and?", "fine")]
    settings = replace(GREEDY, max_new_tokens=200)
    images = ConversationImages.of([(gradient(),), (), (red(), gradient())])
    final = reply(chat_with_image_stream(loaded[DEMO_LLAVA], images, history, "Colour?", settings))
    assert final.notice == (
        "The 1 oldest turn was left out to fit the model's context window, and 1 image with it."
    )
    kept = ConversationImages.of([(), (red(), gradient())])
    alone = reply(chat_with_image_stream(loaded[DEMO_LLAVA], kept, history[1:], "Colour?", settings))
    assert (final.text, final.prompt_tokens) == (alone.text, alone.prompt_tokens)
