"""Serving classifier tasks that share one base backbone over HTTP (LitServe, the ``serve`` extra).

``tasks`` resolves and checks the tasks (one adapter + head each, one base) and builds the shared model;
``requests`` checks and decodes requests; ``api`` is the LitAPI and the server (``tools/serve.py``). Only
``tasks`` and ``requests`` are imported here, so the start-up checks work without LitServe.
"""

from .requests import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Limits, RequestError, decode_image, parse_request
from .tasks import ServedTask, ServeError, TaskSpec, build_tasks, check_same_base, parse_task, resolve_tasks

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "Limits", "RequestError", "ServeError", "ServedTask",
           "TaskSpec", "build_tasks", "check_same_base", "decode_image", "parse_request", "parse_task",
           "resolve_tasks"]
