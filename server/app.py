"""The FastAPI application: ``create_app(settings)`` builds it; the engine lives in its lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from server import __version__
from server.api.anthropic import router as anthropic
from server.api.embeddings import router as embeddings
from server.api.ollama import router as ollama
from server.api.responses import router as responses
from server.body_limit import BodyLimitMiddleware
from server.docs import ASSETS_URL, assets_dir, docs_urls, install_docs
from server.embeddings import EmbeddingService
from server.engine.core import Engine, EngineState
from server.errors import install_error_handlers
from server.json_body import JsonBodyMiddleware
from server.metrics import HttpMetricsMiddleware, Metrics
from server.model_files import check_gguf, resolve_model_path
from server.request_log import RequestLogMiddleware
from server.routes import native, openai, ops, tokenize, ui
from server.security import (
    ApiKeyMiddleware,
    BrowserGuardMiddleware,
    KeyChecker,
    PageHeadersMiddleware,
    PublicPaths,
    served_hosts,
)
from server.serving import GenerationService
from server.settings import Settings

log = logging.getLogger(__name__)

MEASURE_GRACE_S = 10.0


def _public_paths(app: FastAPI, settings: Settings, docs_assets: Path | None) -> PublicPaths:
    """What answers without a key: the operations router (probes, Prometheus, /info), the playground, the docs and
    their static files, read from the routers that serve them (none takes path parameters). Every other route
    needs one."""
    exact = {route.path for route in ops.router.routes if isinstance(route, APIRoute)}
    prefixes: tuple[str, ...] = ()
    if settings.ui:
        exact |= {route.path for route in ui.router.routes if isinstance(route, APIRoute)}
        prefixes += ("/static/",)
    if docs_assets is not None:
        exact |= {"/docs", "/redoc"}
        prefixes += (ASSETS_URL + "/",)
    exact |= {url for url in (app.openapi_url, app.docs_url, app.redoc_url) if url}
    # Ollama's probe: its clients check a server with HEAD / (or GET /, the playground's page when it is on)
    # before sending their key, if they have one.
    return PublicPaths(exact, prefixes, frozenset({("HEAD", "/"), ("GET", "/")}))


def model_name(settings: Settings, path: Path) -> str:
    return settings.served_model_name[0] if settings.served_model_name else path.name.removesuffix(".gguf")


def create_app(settings: Settings, *, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """Build the app. The model loads on the engine thread after start-up, so ``/health`` answers at once
    and ``/ready`` turns 200 when it is loaded. If loading fails, ``on_fatal`` is called with the reason
    (the CLI stops the server and exits non-zero)."""
    path = resolve_model_path(settings.model_path)
    if settings.embedding_model_path is not None:
        check_gguf(settings.embedding_model_path.expanduser())
    key_checker = KeyChecker(settings.api_keys())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        engine = Engine(settings, metrics, str(path))
        app.state.settings = settings
        app.state.key_checker = key_checker
        app.state.metrics = metrics
        app.state.engine = engine
        app.state.service = GenerationService(engine, settings, model_name(settings, path))
        app.state.embeddings = EmbeddingService(engine, settings, model_name(settings, path))
        metrics.bind_model(_model_labels(engine, settings, model_name(settings, path)))
        engine.start()
        watcher = asyncio.create_task(_watch_load(engine, on_fatal))
        measure = asyncio.create_task(_measure_vocab_when_loaded(engine, app.state.service))
        try:
            yield
        finally:
            watcher.cancel()
            # Its work runs in a thread on the model's vocabulary (measuring it, trying the chat template): let it
            # end before the engine frees the model, or the process can crash on its way out.
            await asyncio.wait({measure}, timeout=MEASURE_GRACE_S)
            measure.cancel()
            await asyncio.to_thread(engine.stop)

    docs_assets = assets_dir()  # Swagger UI and ReDoc served from the package, not a CDN
    app = FastAPI(
        title="llama-inference",
        version=__version__,
        description="CPU inference for LLaMA-family GGUF models on llama.cpp, with continuous batching.",
        lifespan=lifespan,
        redirect_slashes=False,  # a redirect would be built from the client's Host header
        **docs_urls(docs_assets),  # type: ignore[arg-type]
    )
    app.state.key_checker = key_checker
    app.state.settings = settings
    # Innermost: the key is checked before anything reads the body, after CORS has answered preflights.
    app.add_middleware(ApiKeyMiddleware, checker=key_checker, public=_public_paths(app, settings, docs_assets))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
            allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type", "X-API-Key"],
        )
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Outside CORS and the JSON body rewrite: it sees the Host, Origin and Content-Type the client sent.
    app.add_middleware(BrowserGuardMiddleware, allowed_hosts=served_hosts(settings),
                       cors_origins=settings.cors_origins)
    app.add_middleware(PageHeadersMiddleware)
    app.add_middleware(RequestLogMiddleware)
    app.add_middleware(HttpMetricsMiddleware)
    install_error_handlers(app)
    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(embeddings.router)
    app.include_router(anthropic.router)
    app.include_router(ollama.router)
    app.include_router(ollama.probe)
    if not settings.ui:
        app.include_router(ollama.probe_get)
    app.include_router(responses.router)
    app.include_router(tokenize.router)
    app.include_router(ops.router)
    install_docs(app, docs_assets)
    if settings.ui:
        app.include_router(ui.router)
        app.mount("/static", StaticFiles(directory=ui.STATIC_DIR), name="static")
    return app


def _model_labels(engine: Engine, settings: Settings, name: str) -> Callable[[], dict[str, str]]:
    """The labels of ``llama_model_info``; the quantization and KV-cache type are read once the model loaded."""
    known: dict[str, str] = {}

    def labels() -> dict[str, str]:
        if not known and engine.state is EngineState.READY and engine.model is not None:
            import gguf

            file_type = engine.model.meta("general.file_type")
            try:
                known["quantization"] = gguf.LlamaFileType(int(file_type or -1)).name.removeprefix("MOSTLY_")
            except ValueError:
                known["quantization"] = "unknown"
            known["cache_type"] = str(getattr(engine, "cache_type", settings.cache_type))
        return {"model": name, "quantization": known.get("quantization", ""), "ctx_size": str(settings.ctx_size),
                "slots": str(settings.parallel), "cache_type": known.get("cache_type", ""), "version": __version__}

    return labels


async def _measure_vocab_when_loaded(engine: Engine, service: GenerationService) -> None:
    """The prompt-size check needs the vocabulary's longest token: read once the model is loaded, so that a
    burst of first requests does not wait for it."""
    await asyncio.to_thread(engine.loaded.wait)
    if engine.state is EngineState.READY:
        await service.vocab_facts()


async def _watch_load(engine: Engine, on_fatal: Callable[[str], None] | None) -> None:
    await asyncio.to_thread(engine.loaded.wait)
    if engine.state is EngineState.FAILED and on_fatal is not None:
        on_fatal(engine.load_error or "model failed to load")
        return
    while not engine.ended.is_set():  # polled: a thread blocked on it would hold up the loop's shutdown
        await asyncio.sleep(0.25)
    if engine.crashed is not None and on_fatal is not None:
        on_fatal(f"the engine crashed: {engine.crashed}")
