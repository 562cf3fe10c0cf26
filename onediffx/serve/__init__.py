"""``onediffx serve``: the assembled pipeline behind an OpenAI-style HTTP images API.

``app`` holds the FastAPI routes, ``schemas`` the request and response models (their bounds are
the server's ``serve.*`` limits, so the OpenAPI page shows what is allowed), ``scheduler`` the
bounded queue that batches compatible requests, ``replicas`` one assembled pipeline per device with
its worker thread, ``metrics`` the Prometheus metrics, ``ray_engine`` the Ray Serve deployment.
"""
