"""The server's ``--log-batches`` lines: one per forward pass, ``batch of 8: a=5 b=3`` (requests per task).

Written by the inference worker, read back by the tests and the serving benchmark to see how LitServe's dynamic
batching grouped the requests (how many per pass, and whether a pass mixed tasks).
"""

from __future__ import annotations

from collections.abc import Sequence

PREFIX = "batch of "


def describe_batch(tasks: Sequence[str]) -> str:
    """``batch of 8: a=5 b=3``: a forward pass's size and its requests per task, in order of first appearance."""
    counts = {task: list(tasks).count(task) for task in dict.fromkeys(tasks)}
    return f"{PREFIX}{len(tasks)}: " + " ".join(f"{task}={count}" for task, count in counts.items())


def read_batch_log(text: str) -> list[dict[str, int]]:
    """Requests per task of every pass logged in ``text`` (other lines are skipped)."""
    found = []
    for line in text.splitlines():
        head, sep, counts = line.partition(": ")
        if sep and head.startswith(PREFIX) and head.removeprefix(PREFIX).isdigit():
            batch = {task: int(count) for task, _, count in (item.partition("=") for item in counts.split())}
            if sum(batch.values()) != int(head.removeprefix(PREFIX)):
                raise ValueError(f"a --log-batches line whose counts do not add up: {line!r}")
            found.append(batch)
    return found
