"""Typed FastAPI dependencies: what routes get from the app's state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.embeddings import EmbeddingService
from server.engine.core import Engine
from server.metrics import Metrics
from server.serving import GenerationService


async def get_service(request: Request) -> GenerationService:
    return request.app.state.service  # type: ignore[no-any-return]


async def get_embeddings(request: Request) -> EmbeddingService:
    return request.app.state.embeddings  # type: ignore[no-any-return]


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


ServiceDep = Annotated[GenerationService, Depends(get_service)]
EmbeddingsDep = Annotated[EmbeddingService, Depends(get_embeddings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
