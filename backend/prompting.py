"""Turn a conversation into prompt token ids that fit the context window.

The tokenizer's chat_template when it has one; otherwise Vicuna v1.1, said explicitly,
never guessed from the model's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

from backend.errors import ContextOverflow

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    dropped_turns: int  # oldest turns left out to fit the context window
    template: str  # "chat_template", "vicuna_v1.1" or "raw"


def with_image_description(description: str, message: str) -> str:
    """How a caption enters the text model's conversation (the caption -> chat pipeline)."""
    return f"[Image description: {description.strip()}]\n{message}"


def vicuna_prompt(system_prompt: str, history: list[Turn], message: str) -> str:
    """Vicuna v1.1: "SYSTEM USER: x ASSISTANT: y</s>USER: ..." (FastChat's conversation.py)."""
    text = f"{system_prompt.strip() or VICUNA_SYSTEM} "
    for turn in history:
        text += f"USER: {turn.user} ASSISTANT: {turn.assistant}</s>"  # no space after </s>, as in FastChat
    return f"{text}USER: {message} ASSISTANT:"


def chat_messages(system_prompt: str, history: list[Turn], message: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for turn in history:
        messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
    return messages + [{"role": "user", "content": message}]


def render_chat(tokenizer, system_prompt: str, history: list[Turn], message: str) -> tuple[str, str]:
    """Prompt text and which template made it."""
    if not getattr(tokenizer, "chat_template", None):
        return vicuna_prompt(system_prompt, history, message), "vicuna_v1.1"
    messages = chat_messages(system_prompt, history, message)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        # Some templates (Gemma, Mistral v1) refuse a system role: fold it into the first user turn.
        merged = chat_messages("", history, message)
        if system_prompt.strip():
            merged[0] = {"role": "user", "content": f"{system_prompt.strip()}\n\n{merged[0]['content']}"}
        text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    return text, "chat_template"


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Encode a rendered prompt with exactly one BOS, whether or not the template wrote it."""
    bos = tokenizer.bos_token
    has_bos = bool(bos) and text.startswith(bos)
    return tokenizer(text, add_special_tokens=not has_bos)["input_ids"]


def build_chat_prompt(
    tokenizer, system_prompt: str, history: list[Turn], message: str, budget: int
) -> Prompt:
    """Drop the oldest turns until the prompt fits in `budget` tokens (context minus reply room)."""
    for dropped in range(len(history) + 1):
        text, template = render_chat(tokenizer, system_prompt, history[dropped:], message)
        ids = encode_rendered(tokenizer, text)
        if len(ids) <= budget:
            return Prompt(ids, dropped, template)
    raise ContextOverflow(
        f"The message needs {len(ids)} tokens but only {budget} fit in the context window after room "
        "for the reply. Shorten the message or system prompt, or lower max_new_tokens."
    )


def build_raw_prompt(tokenizer, text: str, budget: int) -> Prompt:
    """Raw completion: the text as given, BOS as the tokenizer adds it."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) > budget:
        raise ContextOverflow(
            f"The text is {len(ids)} tokens but only {budget} fit in the context window after room "
            "for the continuation. Shorten it or lower max_new_tokens."
        )
    return Prompt(ids, 0, "raw")


def prompt_budget(context_window: int, max_new_tokens: int) -> int:
    """Tokens left for the prompt once the reply's room is kept free."""
    budget = context_window - max_new_tokens
    if budget <= 0:
        raise ContextOverflow(
            f"max_new_tokens ({max_new_tokens}) leaves no room for the prompt in this model's "
            f"{context_window}-token context window; lower it."
        )
    return budget
