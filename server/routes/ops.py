"""Operations: liveness, readiness, metrics, model information."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from server.deps import EngineDep, MetricsDep, ServiceDep
from server.engine.core import EngineState
from server.errors import ErrorResponse, unavailable

router = APIRouter(tags=["operations"])


class HealthResponse(BaseModel):
    status: str
    engine: str


class ReadyResponse(BaseModel):
    status: str
    model: str
    slots: int
    slots_busy: int
    queue_depth: int


class InfoResponse(BaseModel):
    model: str
    file: str  # the GGUF's file name; never its directory, which tells clients about the host
    description: str
    architecture: str
    n_params: int
    size_bytes: int  # of the GGUF file, as `verify` and `ls -l` count it
    tensor_bytes: int  # of the weights inside it, as llama.cpp counts them
    n_ctx_train: int
    ctx_size: int
    slot_ctx: int
    parallel: int
    chat_template: str | None
    auth_required: bool


def _file_size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:  # replaced or removed since it was loaded; the loaded copy still serves
        return 0


@router.get("/health", response_model=HealthResponse, responses={503: {"model": ErrorResponse}})
async def health(engine: EngineDep) -> HealthResponse:
    """Liveness: the process answers and its engine is alive (loading counts as alive): 503 when the model
    failed to load, the engine thread crashed or ended, or it has had work and made no progress for
    ``WATCHDOG_TIMEOUT_S`` (a hung decode), so the liveness probe restarts the pod."""
    problem = engine.health_problem()
    if problem is not None:
        raise unavailable(problem, code="engine_failed")
    if engine.state is EngineState.FAILED:
        raise unavailable(f"engine failed: {engine.load_error}", code="engine_failed")
    return HealthResponse(status="ok", engine=engine.state.value)


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}})
async def ready(engine: EngineDep, service: ServiceDep) -> ReadyResponse:
    """Readiness: 200 once the model is loaded and requests are taken; 503 before, and while shutting down."""
    if engine.state is not EngineState.READY or engine.draining:
        raise unavailable(engine.not_ready_reason(), code="draining" if engine.draining else engine.state.value)
    return ReadyResponse(
        status="ready",
        model=service.model_name,
        slots=engine.settings.parallel,
        slots_busy=engine.busy_slots(),
        queue_depth=engine.queue_depth(),
    )


@router.get("/info", response_model=InfoResponse, responses={503: {"model": ErrorResponse}})
async def info(engine: EngineDep, service: ServiceDep, request: Request) -> InfoResponse:
    """The loaded model and how the server runs it."""
    if engine.info is None:
        raise unavailable(engine.not_ready_reason(), code=engine.state.value)
    i = engine.info
    s = engine.settings
    return InfoResponse(
        model=service.model_name, file=Path(i.path).name, description=i.description, architecture=i.architecture,
        n_params=i.n_params, size_bytes=_file_size(i.path), tensor_bytes=i.size_bytes,
        n_ctx_train=i.n_ctx_train, ctx_size=s.ctx_size,
        slot_ctx=engine.slot_ctx, parallel=s.parallel, chat_template=i.chat_template,
        auth_required=request.app.state.key_checker.enabled,
    )


class LoadResponse(BaseModel):
    load: int  # requests running or waiting for a slot


@router.get("/get_load", response_model=LoadResponse)
async def get_load(engine: EngineDep) -> LoadResponse:
    """The requests this replica holds (running and queued), as vllm-router's ``power_of_two`` policy reads it
    (SGLang's route of that name): a router sends the next request to the less loaded of two replicas."""
    return LoadResponse(load=engine.in_flight())


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(m: MetricsDep) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
