"""The server's --log-batches lines read back as written, other log lines skipped, inconsistent lines refused."""

from __future__ import annotations

import pytest

from visionlora.serve.batch_log import describe_batch, read_batch_log


def test_lines_round_trip_and_other_lines_are_skipped():
    first, second = describe_batch(["a", "b", "a", "a"]), describe_batch(["c"])
    assert first == "batch of 4: a=3 b=1"
    log = f"INFO: Uvicorn running\n{first}\nbatch of requests: text\n{second}\n"
    assert read_batch_log(log) == [{"a": 3, "b": 1}, {"c": 1}]


def test_a_line_whose_counts_do_not_add_up_is_refused():
    with pytest.raises(ValueError, match="do not add up: 'batch of 5: a=3 b=1'"):
        read_batch_log("batch of 5: a=3 b=1")
