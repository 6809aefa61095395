"""What an OpenAI-compatible backend server takes, and our settings as its request parameters.

Pure Python: the UI disables the controls a server lacks (RemoteCapabilities.unsupported), and
sampling_payload maps GenerationSettings onto OpenAI's names plus vLLM's extensions.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.errors import InvalidSettings
from backend.settings import GenerationSettings

NAMED_OWNERS = {"vllm", "sglang", "openai", "tgi", "chat-caption-playground"}
# llama-cpp-python's server says owned_by "me", llama.cpp's own llama-server "llamacpp".
LLAMA_CPP_OWNERS = {"me", "llamacpp"}
LLAMA_CPP = "llama.cpp"
# What servers that do not list their extensions (our /v1/models does) are known to take.
KNOWN_SERVERS = {
    "vllm": frozenset({"top_k", "repetition_penalty", "use_beam_search"}),
    "sglang": frozenset({"top_k", "repetition_penalty"}),
    LLAMA_CPP: frozenset({"top_k", "repetition_penalty"}),  # the latter as its repeat_penalty
}
# llama.cpp applies samplers of its own unless a request sets them (repeat_penalty 1.1, top_k 40,
# min_p 0.05): sent at these values, the reply is what our settings say.
LLAMA_CPP_NEUTRAL = {"top_k": 0, "repeat_penalty": 1.0, "min_p": 0.0}


@dataclass(frozen=True)
class RemoteCapabilities:
    server: str  # names it in messages: the model card's owned_by (e.g. "vllm"), else the model's id
    extensions: frozenset[str]  # non-OpenAI parameters it takes: top_k, use_beam_search, …
    lists_extensions: bool = False  # it said so itself (another playground); otherwise looked up by name
    engine: str = ""  # which engine, where its card tells: "vllm", "sglang", "llama.cpp"

    @classmethod
    def from_model_card(cls, card: dict) -> RemoteCapabilities:
        owner = str(card.get("owned_by") or "")
        # owned_by names the engine for some (vllm, sglang) and says nothing for others (llama.cpp: "me"):
        # then the model's id names the server in messages.
        server = owner if owner.lower() in NAMED_OWNERS else str(card.get("id") or owner or "unknown")
        engine = LLAMA_CPP if owner.lower() in LLAMA_CPP_OWNERS else owner.lower()
        listed = card.get("extensions")
        if isinstance(listed, list):
            return cls(server, frozenset(str(name) for name in listed), lists_extensions=True, engine=engine)
        return cls(server, KNOWN_SERVERS.get(engine, frozenset()), engine=engine)

    def unsupported(self) -> dict[str, str]:
        """Settings field -> why the UI disables its control ("mode": beam search is not offered)."""
        why = {}
        for name in ("top_k", "repetition_penalty"):
            if name not in self.extensions:
                why[name] = (
                    f"Off: the backend server ({self.server}) does not take {name}, a vLLM extension of "
                    "the OpenAI API."
                )
        if "use_beam_search" not in self.extensions:
            why["num_beams"] = why["mode"] = (
                f"No beam search: the backend server ({self.server}) does not offer vLLM's use_beam_search."
            )
        return why

    @property
    def takes_images(self) -> bool:
        """Servers that list their extensions say so; llama.cpp drops images a text model cannot read
        without a word, so not there; for others it depends on the model (their errors tell)."""
        if self.lists_extensions:
            return "image_url" in self.extensions
        return self.engine != LLAMA_CPP

    def images_off_reason(self) -> str | None:
        """Why images are off in front of this server, for the UI; None when they are on."""
        if self.takes_images:
            return None
        if self.engine == LLAMA_CPP:
            return (
                f"Images are off: the backend server ({self.server}, llama.cpp) does not say whether its "
                "model reads images, and a text model there drops them without a word."
            )
        return f"Images are off: the backend server ({self.server}) does not take images."

    def api_extensions(self, images: bool) -> frozenset[str]:
        """What our own /v1 accepts in remote mode: what we can pass on."""
        ours = {"top_k", "repetition_penalty"} & self.extensions
        if "use_beam_search" in self.extensions:
            ours |= {"use_beam_search", "num_beams"}
        if images:
            ours |= {"image_url"} | ({"image_pipeline"} & self.extensions)
        return frozenset(ours)


UNKNOWN_SERVER = RemoteCapabilities("not reached yet", frozenset())


def sampling_payload(
    settings: GenerationSettings, capabilities: RemoteCapabilities
) -> tuple[dict, list[str]]:
    """Our settings as OpenAI parameters (+ vLLM's extensions the server takes), and those left out."""
    payload: dict = {"max_tokens": settings.max_new_tokens, "seed": settings.seed}
    greedy = settings.mode == "greedy" or settings.temperature == 0
    if settings.mode == "beam":
        if "use_beam_search" not in capabilities.extensions:
            server = capabilities.server
            raise InvalidSettings(
                "mode", f"the backend server ({server}) offers no beam search (vLLM's use_beam_search)"
            )
        # vLLM >= 0.6 takes n as the beam width (and returns n beams, best first).
        payload |= {"use_beam_search": True, "n": settings.num_beams, "temperature": 0.0}
    elif greedy:
        payload["temperature"] = 0.0
    else:
        payload |= {"temperature": settings.temperature, "top_p": settings.top_p}
    if settings.stop_words:
        payload["stop"] = list(settings.stop_words)
    wanted = {"repetition_penalty": settings.repetition_penalty != 1.0}
    wanted["top_k"] = settings.top_k > 0 and settings.mode == "sample" and not greedy
    left_out = []
    for name, used in wanted.items():
        if used and name in capabilities.extensions:
            payload[name] = getattr(settings, name)
        elif used:
            left_out.append(name)
    if capabilities.engine == LLAMA_CPP:  # its own names, and its own samplers set to do nothing
        payload = {**LLAMA_CPP_NEUTRAL, **payload}
        payload["repeat_penalty"] = payload.pop("repetition_penalty", 1.0)
    return payload, left_out
