"""The replica's HTTP API: a FastAPI app whose routes close over one replica (``build_api``).

Bodies are parsed by ``deploy/requests.py`` (strict types, unknown fields
refused, messages that name the field) rather than by FastAPI's own body
validation: every bad body answers 400 with that message, whatever its
Content-Type, and never FastAPI's 422. The models still document the bodies
(OpenAPI at /openapi.json). Errors map to statuses in one place (``guarded``):
``BadRequest`` 400 (``NotFound`` 404), ``NotReady`` 503, anything else 500 with
the traceback in the log, and the replica goes on serving. ``guarded`` also
counts every answer by route, status and latency (``server.answered``); answers
no route gives (404, 405) count under the route ``other``.

``GET /metrics`` answers serving's Prometheus metrics, summed over all replicas
by the registry (deploy/serving_metrics.py): any replica gives the same numbers.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from everlearn.deploy.requests import GenerateRequest, ScoreRequest, parse_request
from everlearn.deploy.serving_metrics import OTHER, exposition

OFF_LOOP_BYTES = 65_536  # bodies longer than this are parsed in a thread, not on the event loop
ARRIVED = "everlearn.arrived"  # scope key: when the request reached the app (perf_counter), for answers no route times
COUNTED = "everlearn.counted"  # scope key: a route counted this answer already (an HTTPException it raised)
log = logging.getLogger(__name__)
Body = TypeVar("Body", bound=BaseModel)
ErrorBody = Callable[[int, str, Exception | None], dict[str, Any]]
Answered = Callable[[str, int, float], None]  # (route's path template, status, seconds)


class Health(BaseModel):
    ok: bool


class VersionInfo(BaseModel):
    version: int | None
    step: int | None
    checkpoint: str | None
    manifest_sha256: str | None
    promoted_unix: float | None
    replica_pid: int
    replica_id: str


class Generated(BaseModel):
    text: str
    version: int | None


class ScoreResult(BaseModel):
    loss: float  # mean next-token loss, nats
    tokens: int  # tokens predicted
    version: int | None


def plain_error(status: int, message: str, exc: Exception | None = None) -> dict[str, Any]:
    return {"error": message}


def guarded(error_body: ErrorBody, answered: Answered) -> type[APIRoute]:
    """A route class that answers every failure of its routes (body parsing included) with ``error_body``'s JSON,
    and tells ``answered`` each answer's route (path template), status and seconds (the replica's counts; for a
    stream, the seconds until its headers)."""

    class Guarded(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()
            path = self.path  # the template, prefix included: a bounded label whatever the URL

            async def route(request: Request) -> Response:
                t0 = time.perf_counter()
                try:
                    response = await handler(request)
                except HTTPException as e:  # answered by the app's handler; counted here, where the route is known
                    request.scope[COUNTED] = True
                    answered(path, e.status_code, time.perf_counter() - t0)
                    raise
                except Exception as e:  # noqa: BLE001 every failure becomes an answer; the replica goes on
                    response = error_response(e, request, error_body)
                answered(path, response.status_code, time.perf_counter() - t0)
                return response

            return route

    return Guarded


class Arrival:
    """ASGI middleware that notes when a request arrived: answers no route gives (404, 405) are timed from it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope[ARRIVED] = time.perf_counter()
        await self.app(scope, receive, send)


def error_response(e: Exception, request: Request, error_body: ErrorBody) -> JSONResponse:
    if isinstance(e, RequestValidationError):
        message = "; ".join(f"'{'.'.join(str(p) for p in err['loc'][1:]) or err['loc'][0]}': {err['msg']}" for err in e.errors())
        return JSONResponse(error_body(400, message, None), status_code=400)
    status = getattr(e, "status", None)
    if isinstance(status, int):  # BadRequest, NotFound, NotReady
        return JSONResponse(error_body(status, str(e), e), status_code=status)
    log.exception("%s %s failed", request.method, request.url.path)
    message = (f"internal error ({type(e).__name__}) while answering {request.method} {request.url.path}; "
               "the replica keeps serving and its log has the traceback")
    return JSONResponse(error_body(500, message, e), status_code=500)


def body(model: type[Body], context: Callable[[], dict[str, Any] | None] = lambda: None) -> Any:
    """A dependency that parses the request body into ``model`` with deploy/requests.py's rules and messages."""

    async def parse(request: Request) -> Body:
        raw = await request.body()
        ctx = context()  # before parsing: no model loaded answers 503 whatever the body
        if len(raw) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(parse_request, raw, model, ctx)
        return parse_request(raw, model, ctx)

    return Depends(parse)


def ready(server) -> Callable[[], None]:
    """A ``body`` context that only checks a model is loaded (503 before any parsing)."""

    def check() -> None:
        server.current()

    return check


def documented(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` that documents a body parsed by ``body`` (FastAPI does not see it as one)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def build_api(server) -> FastAPI:
    """The FastAPI app of one replica (``server``: a ``LanguageModelServer``)."""
    from everlearn.deploy.openai_api import openai_router  # it builds on this module
    from everlearn.deploy.openai_schema import openai_error

    app = FastAPI(title="everlearn serving", description="The promoted model, hot-swapped in place.", version="1")
    app.add_middleware(Arrival)
    router = APIRouter(route_class=guarded(plain_error, server.answered))

    def vocab() -> dict[str, Any]:
        return {"vocab_size": getattr(server.current().model.config, "vocab_size", None)}

    @router.get("/healthz", response_model=Health, responses={503: {"description": "no model loaded yet"}})
    async def healthz() -> JSONResponse:
        ok = server.loaded is not None
        return JSONResponse({"ok": ok}, status_code=200 if ok else 503)

    @router.get("/version", response_model=VersionInfo)
    async def version() -> dict[str, Any]:
        return server.version_info()

    @router.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text exposition, summed over all replicas", "content": {CONTENT_TYPE_LATEST: {}}},
        503: {"description": "the serving registry, which holds the totals, cannot be reached"}})
    async def metrics() -> Response:
        try:
            aggregate = await server.registry_metrics()
        except Exception as e:  # noqa: BLE001 a registry restarting or away: say so, the next scrape tries again
            message = (f"the serving registry cannot be reached ({type(e).__name__}: {str(e)[:300]}); it holds the totals "
                       "over all replicas that /metrics shows; try again shortly")
            return JSONResponse(plain_error(503, message), status_code=503)
        return Response(exposition(aggregate), media_type=CONTENT_TYPE_LATEST)

    generate_body, score_body = body(GenerateRequest, vocab), body(ScoreRequest, ready(server))

    @router.post("/generate", response_model=Generated, openapi_extra=documented(GenerateRequest))
    async def generate(req: Annotated[GenerateRequest, generate_body]) -> dict[str, Any]:
        return await server.generate(req)

    @router.post("/score", response_model=ScoreResult, openapi_extra=documented(ScoreRequest))
    async def score(req: Annotated[ScoreRequest, score_body]) -> dict[str, Any]:
        return await server.score(req.text)

    app.include_router(router)
    app.include_router(openai_router(server))

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, e: HTTPException) -> JSONResponse:
        if not request.scope.get(COUNTED):
            arrived = request.scope.get(ARRIVED)
            server.answered(OTHER, e.status_code, 0.0 if arrived is None else time.perf_counter() - arrived)
        message = str(e.detail)
        if e.status_code in (404, 405):
            message = (f"no route {request.method} {request.url.path}; try GET /version, GET /healthz, GET /metrics, "
                       "POST /generate, POST /score, POST /v1/completions, GET /v1/models")
        error_body = openai_error if "/v1/" in request.url.path else plain_error
        return JSONResponse(error_body(e.status_code, message, None), status_code=e.status_code)

    return app
