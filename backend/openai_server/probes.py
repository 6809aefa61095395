"""GET /health and GET /metrics: for a Space, an orchestrator, a load balancer and an operator.

No API key on either, as with vLLM and TGI: they say whether the model is ready and how busy the server
is, never what anyone asked.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from backend.contracts import ChatBackend
from backend.metrics import CONTENT_TYPE, Metrics


def build_probe_router(chat: ChatBackend, metrics: Metrics | None) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    def health() -> JSONResponse:
        """200 when the chat model answers; 503 with the reason (loading, switching, failed) otherwise."""
        status = chat.holder.status()
        body = {"status": "ok" if status.state == "ready" else status.state, "model": chat.holder.loaded_name}
        if status.state != "ready":
            body["reason"] = status.stage
        return JSONResponse(body, status_code=200 if status.state == "ready" else 503)

    if metrics is not None:

        @router.get("/metrics")
        def prometheus() -> Response:
            return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return router
