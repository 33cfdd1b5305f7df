"""`cttriage` command line: run the service's processes, make phantoms, push studies."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from app.logging_setup import configure_logging
from app.settings import Settings, get_settings

#: Cranio-caudal coverage of a chest CT; the phantom's default slice spacing spreads --slices over it.
CHEST_COVERAGE_MM = 320.0


def _settings() -> Settings:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    from app.demo import run_demo
    from app.embedded import serve_embedded

    settings = _settings()
    on_ready = (lambda: run_demo(settings)) if args.demo else None
    serve_embedded(settings, on_ready=on_ready)
    return 0


def cmd_api(_args: argparse.Namespace) -> int:
    from app.embedded import serve_api

    serve_api(_settings())
    return 0


def cmd_dicom(_args: argparse.Namespace) -> int:
    from app.embedded import serve_dicom

    serve_dicom(_settings())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from app.embedded import worker_command

    settings = _settings()
    os.environ["CTTRIAGE_DEVICE"] = args.device
    queues = args.queues.split(",") if args.queues else [settings.scoring_queue, "default"]
    command = worker_command(settings, args.concurrency, queues, args.device)
    os.execv(command[0], command)
    return 0  # pragma: no cover - execv does not return


def cmd_migrate(_args: argparse.Namespace) -> int:
    from app.db.migrate import upgrade_to_head

    upgrade_to_head(_settings().sqlalchemy_url)
    print("database schema is at head")
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from models.phantom import PhantomSpec, write_phantom

    slice_spacing = args.slice_spacing or CHEST_COVERAGE_MM / args.slices
    spec = PhantomSpec(slices=args.slices, rows=args.size, columns=args.size, pixel_spacing=args.pixel_spacing,
                       slice_spacing=slice_spacing, severity_left=args.severity_left,
                       severity_right=args.severity_right, seed=args.seed)
    truth = write_phantom(Path(args.out), spec)
    print(json.dumps(truth, indent=2, default=str))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from app.dicom.push import push_files

    files = sorted(p for path in args.paths for p in (Path(path).rglob("*.dcm") if Path(path).is_dir() else [Path(path)]))
    statuses = push_files(files, host=args.host, port=args.port, called_aet=args.aet, calling_aet=args.calling_aet)
    failed = [s for s in statuses if s != 0]
    print(f"sent {len(statuses)} instances, {len(failed)} failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cttriage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run everything on this machine (SQLite, in-process worker)")
    serve.add_argument("--demo", action="store_true", help="push a generated phantom study and print its score")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("api", help="run the HTTP API only").set_defaults(func=cmd_api)
    sub.add_parser("dicom", help="run the DICOM listener and study assembler").set_defaults(func=cmd_dicom)

    worker = sub.add_parser("worker", help="run a Celery scoring worker")
    worker.add_argument("--device", default="cpu", help="cpu or cuda:N")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--queues", default="", help="comma-separated; default: scoring queue and 'default'")
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("migrate", help="bring the database schema to head").set_defaults(func=cmd_migrate)

    phantom = sub.add_parser("phantom", help="write a synthetic chest CT series with ground truth")
    phantom.add_argument("out")
    phantom.add_argument("--slices", type=int, default=64)
    phantom.add_argument("--size", type=int, default=512, help="rows and columns")
    phantom.add_argument("--pixel-spacing", type=float, default=0.7)
    phantom.add_argument("--slice-spacing", type=float, default=None,
                         help=f"mm; default: {CHEST_COVERAGE_MM:.0f} mm of chest divided by --slices")
    phantom.add_argument("--severity-left", type=float, default=0.0)
    phantom.add_argument("--severity-right", type=float, default=0.0)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.set_defaults(func=cmd_phantom)

    push = sub.add_parser("push", help="send DICOM files or folders to a listener (C-STORE)")
    push.add_argument("paths", nargs="+")
    push.add_argument("--host", default="127.0.0.1")
    push.add_argument("--port", type=int, default=11112)
    push.add_argument("--aet", default="CTTRIAGE", help="called AE title")
    push.add_argument("--calling-aet", default="CTTRIAGE_CLI")
    push.set_defaults(func=cmd_push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
