"""``aftertune answer-server``: answers over HTTP from a pulled bundle, hot-swapped.

``POST /v1/answer`` takes one record ``{task, instruction, input}`` or ``{"records": [...]}``
and answers ``{answer, version, answer_id}`` for each (``{"answers": [...]}`` for a batch).
``POST /v1/feedback`` takes ``{answer_id, correction}`` or ``{answer_id, rating}`` and pushes
a record to the daemon's feedback stream (answer_feedback.py). ``/healthz``, ``/readyz`` and
``/metrics`` as the daemon has them. The bundle is ``hot_swap.BundleSlot``'s: each request
answers with the bundle it found when it began. No torch on this path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import prometheus_client
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from aftertune.daemon.answer_feedback import FeedbackSink, feedback_record
from aftertune.daemon.answer_log import AnswerLog
from aftertune.daemon.answer_metrics import AnswerMetrics
from aftertune.daemon.errors import RedisUnavailable
from aftertune.daemon.hot_swap import BundleSlot
from aftertune.daemon.server import _bearer_check
from aftertune.store.errors import BundleError

if TYPE_CHECKING:
    from aftertune.daemon.shadow import Shadow

MAX_TEXT_CHARS = 16_384  # one instruction, input or correction


@dataclass(frozen=True)
class AnswerLimits:
    """What one request may hold."""

    max_body_bytes: int = 1 << 20
    max_batch: int = 256
    batch_size: int = 32  # records per ONNX call within a request

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024 or self.max_batch < 1 or self.batch_size < 1:
            raise ValueError("max_body_bytes must be at least 1024, max_batch and batch_size 1")


def _problem(code: int, detail: str) -> HTTPException:
    return HTTPException(code, detail)


async def _json_body(request: Request, limit: int) -> Any:
    """The request's JSON, refused past ``limit`` bytes (413) before it is all read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _problem(413, f"request body is {declared} bytes; the limit is {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _problem(413, f"request body is over the limit of {limit} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _problem(400, f"request body is not valid JSON ({exc})") from None


def _text(obj: dict[str, Any], name: str, where: str, *, required: bool) -> str:
    value = obj.get(name, None if required else "")
    if value is None and required:
        raise _problem(422, f"{where}: field '{name}' is missing")
    if not isinstance(value, str):
        raise _problem(422, f"{where}: field '{name}' must be a string")
    if len(value) > MAX_TEXT_CHARS:
        raise _problem(422, f"{where}: field '{name}' is over {MAX_TEXT_CHARS} characters")
    if required and not value.strip():
        raise _problem(422, f"{where}: field '{name}' must not be empty")
    return value


def _question(obj: Any, where: str) -> tuple[str | None, str, str]:
    """(task, instruction, input) of one record, or a 422 naming the field."""
    if not isinstance(obj, dict):
        raise _problem(422, f"{where} must be a JSON object {{task, instruction, input}}")
    unknown = sorted(set(obj) - {"task", "instruction", "input"})
    if unknown:
        raise _problem(422, f"{where}: unknown field '{unknown[0]}' (task, instruction, input)")
    task = obj.get("task")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise _problem(422, f"{where}: field 'task' must be a non-empty string")
    return (
        task,
        _text(obj, "instruction", where, required=True),
        _text(obj, "input", where, required=False),
    )


def build_answer_app(
    slot: BundleSlot,
    answers: AnswerLog,
    metrics: AnswerMetrics,
    *,
    token: str | None = None,
    limits: AnswerLimits | None = None,
    feedback: FeedbackSink | None = None,
    shadow: Shadow | None = None,
) -> FastAPI:
    """The answer server's app; ``token`` guards /v1 and /metrics when set; ``shadow``
    (daemon/shadow.py) is offered what was served and told of feedback, off the request path."""
    if token == "":
        raise ValueError("token must not be empty; leave it unset to serve without one")
    limits = limits or AnswerLimits()
    app = FastAPI(title="aftertune answers", docs_url=None, redoc_url=None, openapi_url=None)
    guarded = [Depends(_bearer_check(token))]
    app.include_router(_probes(slot))
    app.include_router(_metrics(metrics), dependencies=guarded)
    routes = _answer_routes(slot, answers, metrics, limits, feedback, shadow)
    app.include_router(routes, prefix="/v1", dependencies=guarded)
    return app


def _probes(slot: BundleSlot) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        # The slot never exists without a verified bundle: ready means it answers.
        return JSONResponse({"status": "ready", "version": slot.bundle.version})

    return router


def _metrics(metrics: AnswerMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    def metrics_text() -> Response:
        return Response(
            prometheus_client.generate_latest(metrics.registry),
            media_type=prometheus_client.CONTENT_TYPE_LATEST,
        )

    return router


def _counted(metrics: AnswerMetrics, endpoint: str) -> Callable[[int], None]:
    return lambda code: metrics.requests.labels(endpoint, str(code)).inc()


def _answer_routes(
    slot: BundleSlot,
    answers: AnswerLog,
    metrics: AnswerMetrics,
    limits: AnswerLimits,
    feedback: FeedbackSink | None,
    shadow: Shadow | None = None,
) -> APIRouter:
    router = APIRouter()

    @router.post("/answer")
    async def answer(request: Request) -> JSONResponse:
        count = _counted(metrics, "answer")
        started = time.perf_counter()
        try:
            body = await _json_body(request, limits.max_body_bytes)
            batch = isinstance(body, dict) and "records" in body
            questions = (
                _questions(body, limits.max_batch) if batch else [_question(body, "the record")]
            )
            bundle = slot.bundle  # this request's bundle, whatever a swap does meanwhile
            try:
                if bundle.holds_gil and len(questions) == 1:
                    # Nothing would run beside it anyway: answered here, without the two
                    # thread hand-offs (measured on the tiny bundle: 0.68-0.74x of raw ->
                    # 0.80x, docs/benchmarks.md). A batch still goes to a worker thread,
                    # where the loop gets its turns between tokens.
                    given = bundle.answer_many(questions, limits.batch_size)
                else:
                    given = await run_in_threadpool(
                        bundle.answer_many, questions, limits.batch_size
                    )
            except BundleError as exc:
                raise _problem(400, str(exc)) from None
        except HTTPException as exc:
            count(exc.status_code)
            raise
        served = [
            answers.remember(task, instruction, input, text, bundle.version)
            for (task, instruction, input), text in zip(questions, given, strict=True)
        ]
        out = [{"answer": s.answer, "version": s.version, "answer_id": s.answer_id} for s in served]
        if shadow is not None:
            shadow.offer(served)  # a coin flip and a put_nowait per record, no more
        metrics.latency.observe(time.perf_counter() - started)
        metrics.answers.inc(len(out))
        count(200)
        return JSONResponse({"answers": out} if batch else out[0])

    _add_feedback_route(router, answers, metrics, limits, feedback, shadow)
    return router


def _add_feedback_route(
    router: APIRouter,
    answers: AnswerLog,
    metrics: AnswerMetrics,
    limits: AnswerLimits,
    feedback: FeedbackSink | None,
    shadow: Shadow | None = None,
) -> None:
    @router.post("/feedback")
    async def give_feedback(request: Request) -> JSONResponse:
        count = _counted(metrics, "feedback")
        try:
            if feedback is None:
                raise _problem(
                    503,
                    "feedback is off: start the answer server with the daemon's Redis "
                    "(--redis-url or AFTERTUNE_REDIS__URL) to send it to the feedback stream",
                )
            body = await _json_body(request, limits.max_body_bytes)
            record, kind = _feedback(body, answers)
            try:
                await run_in_threadpool(feedback.push, record)
            except RedisUnavailable as exc:
                raise _problem(503, str(exc)) from None
        except HTTPException as exc:
            count(exc.status_code)
            raise
        metrics.feedback.labels(kind).inc()
        if shadow is not None:
            correction = record["output"] if kind == "correction" else None
            shadow.feedback(record["answer_id"], correction, record.get("rating"))
        count(202)
        return JSONResponse({"status": "accepted", "kind": kind, "record": record}, status_code=202)


def _questions(body: dict[str, Any], max_batch: int) -> list[tuple[str | None, str, str]]:
    records = body["records"]
    if set(body) != {"records"}:
        raise _problem(422, 'a batch is {"records": [...]} and nothing else')
    if not isinstance(records, list) or not records:
        raise _problem(422, "'records' must be a non-empty array of {task, instruction, input}")
    if len(records) > max_batch:
        raise _problem(
            413, f"{len(records)} records in one batch; the limit is {max_batch}: split it"
        )
    return [_question(r, f"records[{i}]") for i, r in enumerate(records)]


def _feedback(body: Any, answers: AnswerLog) -> tuple[dict[str, Any], str]:
    """The feedback record for ``body`` and its kind (correction, up, down), or a 4xx."""
    if not isinstance(body, dict):
        raise _problem(422, "feedback must be {answer_id, correction} or {answer_id, rating}")
    unknown = sorted(set(body) - {"answer_id", "correction", "rating"})
    if unknown:
        raise _problem(422, f"unknown field '{unknown[0]}' (answer_id, correction, rating)")
    answer_id = body.get("answer_id")
    if not isinstance(answer_id, str) or not answer_id:
        raise _problem(422, "field 'answer_id' is missing: give the id /v1/answer returned")
    if ("correction" in body) == ("rating" in body):
        raise _problem(422, "give either 'correction' (the right answer) or 'rating' (up/down)")
    correction = None
    rating = body.get("rating")
    if "correction" in body:
        correction = _text(body, "correction", "feedback", required=True)
    elif rating not in ("up", "down"):
        raise _problem(422, 'field \'rating\' must be "up" or "down"')
    served = answers.find(answer_id)
    if served is None:
        raise _problem(
            404,
            f"no answer {answer_id!r} here: unknown, or older than the answer server keeps "
            f"ids ({answers.ttl_s:g} s, the newest {answers.max_answers}); send the record "
            "with its output to the feedback stream instead",
        )
    if served.task is None:
        raise _problem(
            422, "that answer was asked without a task; feedback needs one: ask with 'task'"
        )
    record = feedback_record(served, correction=correction, rating=rating)
    return record, "correction" if correction is not None else str(rating)
