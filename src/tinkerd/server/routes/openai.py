"""OpenAI-compatible routes, mounted under `/oai/api/v1` (the hosted prefix) and `/v1`: GET /models,
GET /models/{model}, POST /chat/completions, POST /completions. HTTP only: the work is in
`control.openai_service` (the same sampler queue as the SDK's asample), the checks in `control.openai_requests`."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from tinkerd.control.openai_models import list_models, retrieve_model
from tinkerd.control.openai_requests import OpenAIError
from tinkerd.control.openai_service import chat_completion, text_completion
from tinkerd.control.plane import ControlPlane
from tinkerd.server.auth import bearer_caller
from tinkerd.server.deps import plane

PREFIXES = ("/oai/api/v1", "/v1")
router = APIRouter()


async def json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    return body


def client_gone(request: Request):
    """A coroutine function returning once the client has closed the connection (its body is read already)."""
    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return wait


def respond(answer):
    """A body as JSON, or server-sent events for a stream."""
    if isinstance(answer, dict):
        return answer
    return StreamingResponse(answer, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/models")
async def models(owner: str = Depends(bearer_caller), st: ControlPlane = Depends(plane)):
    return list_models(st, owner, st.started_at)


@router.get("/models/{model:path}")
async def model(model: str, owner: str = Depends(bearer_caller), st: ControlPlane = Depends(plane)):
    return retrieve_model(st, owner, model, st.started_at)


@router.post("/chat/completions")
async def chat_completions(request: Request, owner: str = Depends(bearer_caller), st: ControlPlane = Depends(plane)):
    return respond(await chat_completion(st, owner, await json_body(request), client_gone(request)))


@router.post("/completions")
async def completions(request: Request, owner: str = Depends(bearer_caller), st: ControlPlane = Depends(plane)):
    return respond(await text_completion(st, owner, await json_body(request), client_gone(request)))
