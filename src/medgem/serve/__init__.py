"""medgem's HTTP face: an OpenAI-compatible API and a web page for one loaded model.

Read in this order: settings.py (what can be configured), app.py (the app, middlewares, the
draining server), routes.py (the endpoints), inputs.py (image data URIs -> checked images),
backend.py (the door to the engine's scheduler), reasoning.py (MedGemma 27B's thinking switch),
errors.py (OpenAI-shaped 4xx), metrics.py (Prometheus), ray_app.py (Ray Serve replicas) and
static/ (the page: vanilla JS, no build step).
"""

from medgem.serve.settings import Limits, ServeSettings

__all__ = ["Limits", "ServeSettings"]
