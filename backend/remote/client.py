"""A small client for OpenAI-compatible servers: JSON, server-sent events, and their errors as ours.

Used by remote mode (backend.remote.service). httpx only; the official `openai` package is a test
dependency, and its retries and types would hide what the UI needs to say when the server refuses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

from backend.errors import BackendError, BadInput, ContextOverflow, ModelNotReady, ServerBusy, UserError

CONNECT_SECONDS = 5.0
READ_SECONDS = 600.0  # a beam search answers only when it is done


def api_base(url: str) -> str:
    """Accept http://host:8000 and http://host:8000/v1 alike."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def iter_sse(lines: Iterable[str]) -> Iterator[str]:
    """The data of each server-sent event (multi-line data joined by newlines); comments skipped."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def remote_error(status: int | None, body: Any, base: str) -> Exception:
    """The backend's error (OpenAI shape or not) as the typed error our UI and API report."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"message": body.get("detail") if isinstance(body, dict) else body}
    message = str(error.get("message") or "no details given").strip()
    code = error.get("code")
    if status in (401, 403):
        return BackendError(
            f"The backend server {base} refused this app (HTTP {status}): {message} Check --backend-api-key."
        )
    if status == 429 or code == "server_busy":
        return ServerBusy(f"The backend server is busy: {message}")
    if status == 503 or code == "model_not_ready":
        return ModelNotReady(f"The backend server is not ready: {message}")
    if code == "context_length_exceeded":
        return ContextOverflow(message)
    if status is not None and 400 <= status < 500:
        return BadInput(f"The backend server refused the request: {message}")
    return BackendError(f"The backend server failed{f' (HTTP {status})' if status else ''}: {message}")


class OpenAIClient:
    """One connection pool to `base_url`; thread-safe, like httpx.Client."""

    def __init__(
        self, base_url: str, api_key: str | None = None, transport: httpx.BaseTransport | None = None
    ):
        self.base = api_base(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base,
            headers=headers,
            timeout=httpx.Timeout(READ_SECONDS, connect=CONNECT_SECONDS),
            transport=transport,
        )

    def get_json(self, path: str) -> Any:
        try:
            response = self._http.get(path, timeout=CONNECT_SECONDS)
        except httpx.TransportError as error:
            raise self.unreachable(error) from None
        return self._json(response)

    def post_json(self, path: str, payload: dict) -> Any:
        try:
            response = self._http.post(path, json=payload)
        except httpx.TransportError as error:
            raise self.unreachable(error) from None
        return self._json(response)

    def open_stream(self, path: str, payload: dict) -> httpx.Response:
        """POST and return the response once its headers arrive; a refusal raises here, typed."""
        request = self._http.build_request("POST", path, json=payload)
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as error:
            raise self.unreachable(error) from None
        if response.status_code >= 400:
            try:
                response.read()
            finally:
                response.close()
            raise remote_error(response.status_code, _body(response), self.base)
        return response

    def events(self, response: httpx.Response) -> Iterator[dict]:
        """The JSON events of a streamed response until [DONE]; an error event raises, typed."""
        try:
            for data in iter_sse(response.iter_lines()):
                if data.strip() == "[DONE]":
                    return
                event = json.loads(data)
                if isinstance(event, dict) and event.get("error"):
                    raise remote_error(None, event, self.base)
                yield event
        except httpx.TransportError as error:
            raise BackendError(f"The connection to the backend server broke: {error}") from None
        except json.JSONDecodeError as error:
            raise BackendError(f"The backend server sent an event that is not JSON: {error}") from None

    def unreachable(self, error: Exception) -> UserError:
        return ModelNotReady(
            f"The backend server {self.base} cannot be reached ({type(error).__name__}: {error})."
        )

    def close(self) -> None:
        self._http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise remote_error(response.status_code, _body(response), self.base)
        try:
            return response.json()
        except ValueError as error:
            raise BackendError(
                f"The backend server answered with something that is not JSON: {error}"
            ) from None


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]
