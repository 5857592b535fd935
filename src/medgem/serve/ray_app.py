"""`medgem serve --ray --replicas N`: the same app, replicated with Ray Serve.

Each replica is a Ray actor that loads the model and serves `create_app` on it, so the API, limits,
keys, metrics (per replica) and web page are the ones of a single server; Ray's HTTP proxy spreads
requests over the replicas. A replica may hold `max_batch + max_queue` requests, so the proxy hands
the overflow to replicas, whose own bounded queue answers 429. Ray itself is an optional dependency:
`pip install "ray[serve]"`.
"""

from __future__ import annotations

import logging
import threading

from medgem import progress
from medgem.errors import CapabilityError
from medgem.serve.settings import ServeSettings

log = logging.getLogger(__name__)


class MedgemReplica:
    """One replica: load the models, then build the app on them (Ray asks for it after __init__)."""

    def __init__(self, settings: ServeSettings):
        from medgem.serve.app import create_app
        from medgem.serve.runtime import load_models

        self._medgem_app = create_app(settings, *load_models(settings))

    def __serve_build_asgi_app__(self):
        return self._medgem_app


def _serve():
    try:
        from ray import serve
    except ImportError:
        raise CapabilityError('--ray needs Ray Serve: pip install "ray[serve]"') from None
    return serve


def application(settings: ServeSettings, replicas: int, cpus_per_replica: float = 1.0):
    """The Ray Serve application (bind it with `serve.run(app, route_prefix="/")`)."""
    serve = _serve()
    deployment = serve.deployment(
        serve.ingress()(MedgemReplica), name="medgem", num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=settings.max_batch + settings.max_queue,
        health_check_period_s=5,
    )
    return deployment.bind(settings)


def run(settings: ServeSettings, replicas: int, cpus_per_replica: float = 1.0, address: str | None = None) -> None:
    """Start (or join, with `address`) a Ray cluster, deploy, and serve until interrupted (blocking)."""
    import ray

    serve = _serve()
    try:
        with progress.step(f"starting Ray and loading {replicas} replica(s)"):
            ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
            serve.start(http_options={"host": settings.host, "port": settings.port})
            log.info("deploying %d replica(s) on Ray Serve at http://%s:%d", replicas, settings.host, settings.port)
            serve.run(application(settings, replicas, cpus_per_replica), name="medgem", route_prefix="/")
        print(f"medgem: serving on http://{settings.host}:{settings.port} ({replicas} Ray Serve replica(s), "
              "models loaded; Ctrl-C stops)", flush=True)
        threading.Event().wait()  # until interrupted; Ray's own blocking loop prints nothing we need
    finally:
        serve.shutdown()
        ray.shutdown()
