"""Offline "demo" text model: a tiny random Llama plus a BPE tokenizer, built locally and deterministically.

It lets the playground (and the tests) run end to end with no network and no downloaded weights.
The output is meaningless text, but every code path (chat template, generation, streaming, stop
words, 4-bit loading) is exercised with a real Hugging Face model directory.

Chat template / BOS convention: the chat template emits ``bos_token`` itself, so text rendered with
``apply_chat_template(..., tokenize=False)`` must be encoded with ``add_special_tokens=False``
(``apply_chat_template(..., tokenize=True)`` already does this). Encoding plain text with
``add_special_tokens=True`` prepends ``<s>`` once via the tokenizer's post-processor.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

DEMO_TEXT_MODEL = "demo:tiny-llama-chat"
MARKER_FILE = "PLAYGROUND_DEMO.json"
_MARKER = {"demo": True, "kind": "text", "version": 1}
_CACHE_SUBDIR = Path("demo") / "tiny-llama-chat-v1"
_CORPUS = Path(__file__).resolve().parents[2] / "assets" / "demo_corpus.txt"
_SEED = 20240611
_VOCAB_SIZE = 1000
_MAX_POSITIONS = 512
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"

# Vicuna-like. Content may be a string or a list of {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (  # no whitespace control ("{%-"): it would also eat the newlines we emit
    "{% macro text(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{% endmacro %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ text(message['content']) }}\n\n"
    "{% elif message['role'] == 'user' %}USER: {{ text(message['content']) }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ text(message['content']) }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

logger = logging.getLogger("backend.models.demo_text")


def _build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space=False so decode(encode(s)) == s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=[BOS, EOS, UNK, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever <unk>
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.read_text(encoding="utf-8").splitlines(keepends=True), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",  # decoder-only batch generation
        model_max_length=_MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )


def _build_model(tokenizer):  # -> transformers.LlamaForCausalLM
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab_size = -(-len(tokenizer) // 64) * 64  # every Linear in/out size a multiple of 64
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # fork_rng restores the caller's CPU RNG; seeding only the CPU generator leaves CUDA RNGs alone.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(_SEED)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    return model


def build_demo_text_model(target_dir: Path) -> Path:
    """Build the demo tokenizer + model into ``target_dir`` (HF format, safetensors). Deterministic."""
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    logger.info("Building demo text model %s into %s", DEMO_TEXT_MODEL, target_dir)
    tokenizer = _build_tokenizer()
    model = _build_model(tokenizer)
    model.save_pretrained(target_dir, safe_serialization=True)
    tokenizer.save_pretrained(target_dir)
    # Written last: its presence means the directory is complete.
    (target_dir / MARKER_FILE).write_text(json.dumps(_MARKER) + "\n", encoding="utf-8")
    return target_dir


def is_demo_model_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MARKER_FILE).is_file()


def default_cache_root() -> Path:
    env = os.environ.get("PLAYGROUND_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "chat-caption-playground"


def demo_text_model_dir(cache_root: Path | None = None) -> Path:
    """Return the cached demo model directory, building it (atomically) on first use."""
    target = Path(cache_root if cache_root is not None else default_cache_root()) / _CACHE_SUBDIR
    return install_atomically(target, build_demo_text_model)


def install_atomically(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, built by `build(folder)` into a temporary sibling and renamed into place.

    A half-built directory never appears under `target`, and of two processes building at once
    one wins the rename and the other uses its result.
    """
    if is_demo_model_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        if target.exists() and not is_demo_model_dir(target):
            shutil.rmtree(target, ignore_errors=True)  # leftover of a non-atomic/interrupted build
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_demo_model_dir(target):  # not a lost race with another builder: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
