"""The LitServe API: classifier tasks that share one backbone, answered in mixed-task batches.

LitServe's dynamic batching (``max_batch_size``, ``batch_timeout``) gathers requests of any task; ``predict`` runs
them in one forward pass (:func:`visionlora.lora.adapter_batch`): the base layers once for the whole batch, each
task's low-rank branch and head on its own samples. Endpoints: ``POST /predict``, ``GET /tasks`` (the tasks and
their labels), ``GET /health`` (LitServe's). Requests are checked before they are queued
(:mod:`visionlora.serve.requests`).
"""

from __future__ import annotations

from collections.abc import Sequence

import litserve as ls
import torch
from fastapi import HTTPException
from PIL import Image
from torch import nn

from visionlora.lora import adapter_batch

from .batch_log import describe_batch
from .requests import Limits, RequestCheck, RequestError, parse_request
from .tasks import ServedTask, TaskSpec, build_tasks

PREDICT_PATH = "/predict"
TASKS_PATH = "/tasks"

Item = tuple[str, torch.Tensor, int]  # (task, preprocessed image, top_k)


@torch.no_grad()
def classify_mixed(model: nn.Module, tasks: dict[str, ServedTask], items: Sequence[Item]) -> list[dict]:
    """Answers for ``items`` of any tasks, in order: one mixed-task forward pass per input size (normally one).

    Returns:
        ``{"task", "label", "probability", "top_k": [[label, probability], ...]}`` per item.
    """
    answers: list[dict | None] = [None] * len(items)
    by_shape: dict[tuple, list[int]] = {}
    for position, (_, image, _) in enumerate(items):
        by_shape.setdefault(tuple(image.shape), []).append(position)
    device = next(model.parameters()).device
    for positions in by_shape.values():
        names = [items[i][0] for i in positions]
        x = torch.stack([items[i][1] for i in positions]).to(device)
        with adapter_batch(model, names) as batch:
            logits = model(x)
        for i, row in zip(positions, batch.split(logits), strict=True):
            task, _, top_k = items[i]
            answers[i] = _answer(tasks[task], row.float().softmax(dim=0).cpu(), top_k)
    return answers


def _answer(task: ServedTask, probabilities: torch.Tensor, top_k: int) -> dict:
    values, indices = probabilities.topk(top_k)
    ranked = [[task.label_names[i], p] for i, p in zip(indices.tolist(), values.tolist(), strict=True)]
    return {"task": task.name, "label": ranked[0][0], "probability": ranked[0][1], "top_k": ranked}


class MultiTaskClassifierAPI(ls.LitAPI):
    """Every task's adapter and head on one base model, built in the inference worker (``setup``).

    Args:
        specs: The resolved tasks (:func:`visionlora.serve.tasks.resolve_tasks`).
        limits: Image limits of a request.
        max_batch_size: Requests per mixed-task forward pass, at most.
        batch_timeout: Seconds to wait for a batch to fill.
        log_batches: Print one line per forward pass: its size and requests per task (``batch of 8: a=5 b=3``).
    """

    def __init__(self, specs: list[TaskSpec], limits: Limits, max_batch_size: int = 16,
                 batch_timeout: float = 0.01, log_batches: bool = False) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.log_batches = log_batches
        self.specs = specs
        self.limits = limits
        self.task_classes = {spec.name: spec.num_classes for spec in specs}

    def setup(self, device: str) -> None:
        self.model, served = build_tasks(self.specs, device)
        self.tasks = {task.name: task for task in served}
        self.transforms = {task.name: task.transform() for task in served}

    def decode_request(self, request: dict) -> Item:
        try:
            parsed = parse_request(request, self.task_classes, self.limits)
        except RequestError as error:  # RequestCheck refused it already; this fails the batch it is in
            raise HTTPException(error.status, error.message) from None
        return parsed.task, self.transforms[parsed.task](Image.fromarray(parsed.image)), parsed.top_k

    def batch(self, inputs: list[Item]) -> list[Item]:
        return list(inputs)

    def predict(self, inputs: list[Item]) -> list[dict]:
        if self.log_batches:
            print(describe_batch([task for task, _, _ in inputs]), flush=True)
        return classify_mixed(self.model, self.tasks, inputs)

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output

    def encode_response(self, output: dict) -> dict:
        return output


def build_server(specs: list[TaskSpec], served: list[ServedTask], limits: Limits, max_batch_size: int = 16,
                 batch_timeout: float = 0.01, accelerator: str = "auto", timeout: float = 30.0,
                 log_batches: bool = False) -> ls.LitServer:
    """A LitServer for ``specs`` with the request check and ``GET /tasks``; ``served`` gives the tasks' labels.

    The model is built in the inference worker; ``served`` (from a check build in the launching process) lists
    what ``GET /tasks`` answers.
    """
    api = MultiTaskClassifierAPI(specs, limits, max_batch_size, batch_timeout, log_batches)
    check = (RequestCheck, {"task_classes": api.task_classes, "limits": limits, "path": PREDICT_PATH})
    server = ls.LitServer(api, accelerator=accelerator, timeout=timeout, middlewares=[check])
    listing = {"tasks": [{"name": task.name, "num_classes": task.num_classes, "labels": task.label_names}
                         for task in served]}

    async def list_tasks() -> dict:
        return listing

    server.app.add_api_route(TASKS_PATH, list_tasks, methods=["GET"])
    return server
