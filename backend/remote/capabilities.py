"""What an OpenAI-compatible backend server takes, and our settings as its request parameters.

Pure Python: the UI disables the controls a server lacks (RemoteCapabilities.unsupported), and
sampling_payload maps GenerationSettings onto OpenAI's names plus vLLM's extensions.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.errors import InvalidSettings
from backend.settings import GenerationSettings

NAMED_OWNERS = {"vllm", "sglang", "openai", "tgi", "chat-caption-playground"}
# What servers that do not list their extensions (our /v1/models does) are known to take.
KNOWN_SERVERS = {
    "vllm": frozenset({"top_k", "repetition_penalty", "use_beam_search"}),
    "sglang": frozenset({"top_k", "repetition_penalty"}),
}


@dataclass(frozen=True)
class RemoteCapabilities:
    server: str  # the model card's owned_by, e.g. "vllm"
    extensions: frozenset[str]  # non-OpenAI parameters it takes: top_k, use_beam_search, …
    lists_extensions: bool = False  # it said so itself (another playground); otherwise looked up by name

    @classmethod
    def from_model_card(cls, card: dict) -> RemoteCapabilities:
        owner = str(card.get("owned_by") or "")
        # owned_by names the engine for some (vllm, sglang) and says nothing for others (llama.cpp: "me"):
        # then the model's id names the server in messages.
        server = owner if owner.lower() in NAMED_OWNERS else str(card.get("id") or owner or "unknown")
        listed = card.get("extensions")
        if isinstance(listed, list):
            return cls(server, frozenset(str(name) for name in listed), lists_extensions=True)
        return cls(server, KNOWN_SERVERS.get(server.lower(), frozenset()))

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
        """Servers that list their extensions say so; for others it depends on the model (errors tell)."""
        return "image_url" in self.extensions or not self.lists_extensions

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
    return payload, left_out
