"""What every route shares: the settings, the loaded model and its engine, metrics and the drain state.

The model may load in the background (the CLI does this so /health answers at once and /ready turns
200 when loading ends); until then API calls get 503. Draining is graceful shutdown: new API calls
get 503 while the ones in flight finish.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from medgem.pipeline import Pipeline, add_draft
from medgem.serve.backend import Backend
from medgem.serve.errors import APIError
from medgem.serve.metrics import Metrics
from medgem.serve.reasoning import model_thinks
from medgem.serve.settings import ServeSettings

if TYPE_CHECKING:
    from medgem.siglip import SiglipEncoder

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "gemma-3-270m"


def model_id(settings: ServeSettings) -> str:
    """The id clients send as `model`: --model-name, else the checkpoint's folder or file stem."""
    if settings.model_name:
        return settings.model_name
    if settings.model is None:
        return EMBEDDED_MODEL_ID
    path = Path(settings.model)
    return path.stem if path.suffix == ".gguf" else path.name or settings.model


def load_models(settings: ServeSettings) -> tuple[Pipeline, SiglipEncoder | None]:
    """The models the settings name (the CLI's background load and every Ray replica)."""
    import medgem

    pipe = medgem.load(settings.model, mmproj=settings.mmproj, dtype=settings.dtype, device=settings.device,
                       quant=settings.quant)
    if settings.compile:
        pipe.compile()
    if settings.draft:
        add_draft(pipe, settings.draft, settings.draft_tokens, dtype=settings.dtype, device=settings.device,
                  quant=settings.quant)
    if settings.embedding_model is None:
        return pipe, None
    return pipe, medgem.load_siglip(settings.embedding_model, dtype=settings.dtype, device=settings.device)


class Runtime:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.model_id = model_id(settings)
        self.created = int(time.time())
        self.metrics = Metrics()
        self.pipe: Pipeline | None = None
        self.embedder: SiglipEncoder | None = None
        self.embedding_id = Path(settings.embedding_model).name if settings.embedding_model else None
        self.backend: Backend | None = None
        self.thinking = False
        self.load_error: str | None = None
        self.draining = False
        self.in_flight = 0

    # -- loading --------------------------------------------------------------------------------------
    def attach(self, pipe: Pipeline, embedder: SiglipEncoder | None = None) -> None:
        """Serve a loaded pipeline (and embedding encoder): start the engine."""
        self.thinking = model_thinks(pipe.config, self.settings.thinking)
        self.backend = Backend(pipe, self.settings)
        self.metrics.watch_engine(self.backend.metrics)
        self.embedder = embedder
        if embedder is not None:
            self.embedding_id = self.embedding_id or embedder.source
        self.pipe = pipe
        log.info("serving %s as %r (images: %s, thinking mode: %s, embeddings: %s)", pipe.source, self.model_id,
                 pipe.supports_images, self.thinking, self.embedding_id)

    def load_in_background(self) -> None:
        def load() -> None:
            try:
                self.attach(*load_models(self.settings))
            except Exception as exc:  # noqa: BLE001 - reported by /ready and every API call
                self.load_error = f"{type(exc).__name__}: {exc}"
                log.error("model failed to load: %s", self.load_error)

        threading.Thread(target=load, name="medgem-load", daemon=True).start()

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    # -- state for routes -----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.pipe is not None and not self.draining

    def _check_up(self) -> None:
        if self.load_error:
            raise APIError(503, f"the model failed to load ({self.load_error})", code="model_load_failed")
        if self.pipe is None or self.backend is None:
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})

    def _unknown(self) -> APIError:
        served = " and ".join(repr(m) for m in (self.model_id, self.embedding_id) if m)
        return APIError(404, f"model not found; this server serves {served} (see GET /v1/models)", param="model",
                        code="model_not_found")

    def pipeline(self, requested_model: str) -> Pipeline:
        """The generation pipeline, if the request names it and it is up."""
        self._check_up()
        if requested_model == self.embedding_id:
            raise APIError(400, f"{self.embedding_id!r} is an embedding model; use /v1/embeddings", param="model",
                           code="wrong_model_type")
        if requested_model != self.model_id:
            raise self._unknown()
        return self.pipe

    def encoder(self, requested_model: str) -> SiglipEncoder:
        """The embedding encoder, if the request names it and it is up."""
        self._check_up()
        if requested_model == self.model_id:
            raise APIError(400, f"model {self.model_id!r} has no embedding tower; start the server with "
                                "--embedding-model (a MedSigLIP folder) and ask that model", param="model",
                           code="embeddings_not_supported")
        if self.embedder is None or requested_model != self.embedding_id:
            raise self._unknown()
        return self.embedder
