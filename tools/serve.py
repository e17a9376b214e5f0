"""Serve classifier tasks that share one base backbone over HTTP, in mixed-task batches (LitServe).

    python tools/serve.py --task digits=runs/default/<time> --task letters=runs/letters/<time>
    python tools/serve.py --task pets=my_adapter --base-weights local-dir:data/weights/my_base --port 8080

Each --task NAME=SOURCE is a classification run trained with method lora (its adapter/, label names and
evaluation transform) or an adapter folder (the base weights from --base-weights or the adapter's own base).
All tasks must share one base (architecture, model_args, weights). Endpoints: POST /predict, GET /tasks,
GET /health. Needs the serve extra: pip install -e ".[serve]". Exit codes: 2 bad tasks or options (one line).
"""

from __future__ import annotations

import argparse
import sys

from visionlora.serve import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Limits, ServeError, parse_task, resolve_tasks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", action="append", required=True, metavar="NAME=SOURCE",
                        help="a task: run directory or adapter folder (repeat for more tasks)")
    parser.add_argument("--base-weights", help="adapter-folder tasks: the base's weights file or local-dir:<folder>")
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"], help="listen address")
    parser.add_argument("--port", type=int, default=8000, help="port (1024-65535)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests per mixed-task forward pass")
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="seconds to wait for a batch to fill")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest image file (413 above)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest width x height (413)")
    parser.add_argument("--log-batches", action="store_true",
                        help="print each forward pass's size and requests per task (batch of 8: a=5 b=3)")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        server, served = build(args)
    except (ServeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(describe(args, served), flush=True)
    server.run(host=args.host, port=args.port, generate_client_file=False)
    return 0


def build(args: argparse.Namespace):
    """Resolve and check the tasks, build the shared model once as a check (freed before serving), the server."""
    if not 1024 <= args.port <= 65535:
        raise ServeError(f"--port must be in [1024, 65535], got {args.port}")
    for flag, value in (("--max-batch-size", args.max_batch_size), ("--max-bytes", args.max_bytes),
                        ("--max-pixels", args.max_pixels)):
        if value < 1:
            raise ServeError(f"{flag} must be >= 1, got {value}")
    specs = resolve_tasks([parse_task(text) for text in args.task], args.base_weights)
    try:
        from visionlora.serve.api import build_server
    except ImportError as error:
        raise ServeError(f"serving needs LitServe ({error}): pip install -e \".[serve]\"") from None
    from visionlora.serve import build_tasks

    _, served = build_tasks(specs)  # every adapter checked against the base before the server starts
    server = build_server(specs, served, Limits(args.max_bytes, args.max_pixels), args.max_batch_size,
                          args.batch_timeout, args.accelerator, log_batches=args.log_batches)
    return server, served


def describe(args: argparse.Namespace, served) -> str:
    host = "127.0.0.1" if args.host == "0.0.0.0" else args.host
    url = f"http://{host}:{args.port}"
    tasks = ", ".join(f"{task.name} ({task.num_classes} classes)" for task in served)
    body = f'{{"task": "{served[0].name}", "image": "\'"$(base64 -w0 image.png)"\'"}}'
    return (f"serving {len(served)} task(s) on one backbone: {tasks}\n{url}/predict  (tasks: {url}/tasks, "
            f"health: {url}/health)\ncurl -s {url}/predict -H 'Content-Type: application/json' -d '{body}'")


if __name__ == "__main__":
    sys.exit(main())
