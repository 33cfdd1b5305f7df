"""`cttriage` command line: run the service's processes, make phantoms, push studies."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from app.errors import TYPED_ERRORS, ConfigurationError, CtTriageError
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


#: Exit status of a process refused at start because the database schema is missing or old.
EXIT_NOT_MIGRATED = 2


def _schema_refusal(command: str, settings: Settings) -> int | None:
    """One line and EXIT_NOT_MIGRATED when the database lacks the schema (`dicom` and `worker`
    do not migrate by themselves; `serve` and `api` do), else None."""
    from app.db.migrate import schema_problem

    problem = schema_problem(settings.sqlalchemy_url)
    if problem is None:
        return None
    print(f"cttriage {command}: {problem}; run `cttriage migrate` first", file=sys.stderr)
    return EXIT_NOT_MIGRATED


def cmd_dicom(args: argparse.Namespace) -> int:
    from app.embedded import serve_dicom, serve_listener_child

    settings = _settings()
    if args.listen_fd is not None:  # one of the listener processes of `dicom` or `serve`
        serve_listener_child(settings, args.listen_fd)
        return 0
    refused = _schema_refusal("dicom", settings)
    if refused is not None:
        return refused
    serve_dicom(settings, args.processes)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from app.embedded import worker_command

    settings = _settings()
    refused = _schema_refusal("worker", settings)
    if refused is not None:
        return refused
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
    from models.phantom import PhantomSpec
    from models.phantom_dicom import write_phantom

    slice_spacing = args.slice_spacing or CHEST_COVERAGE_MM / args.slices
    spec = PhantomSpec(slices=args.slices, rows=args.size, columns=args.size, pixel_spacing=args.pixel_spacing,
                       slice_spacing=slice_spacing, severity_left=args.severity_left,
                       severity_right=args.severity_right, seed=args.seed)
    truth = write_phantom(Path(args.out), spec)
    print(json.dumps(truth, indent=2, default=str))
    return 0


def cmd_implant(args: argparse.Namespace) -> int:
    """Copy a real series with ground glass of known volume added to one lung, plus truth.json."""
    from app.implant_io import implant_series, read_series, write_implanted

    source = Path(args.series)
    if not 0.0 <= args.hu_min <= args.hu_max:
        print(f"cttriage implant: need 0 <= --hu-min <= --hu-max, got {args.hu_min} and {args.hu_max}", file=sys.stderr)
        return 2
    try:
        datasets = read_series(source)
        result = implant_series(datasets, lung=args.lung, fraction=args.fraction, seed=args.seed,
                                hu_range=(args.hu_min, args.hu_max))
    except TYPED_ERRORS + (ValueError,) as exc:  # unreadable input, not one series, no lungs, too big a fraction
        print(f"cttriage implant: {source}: {exc}", file=sys.stderr)
        return 2
    truth = write_implanted(result, Path(args.out), source)
    print(json.dumps(truth, indent=2))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from app.dicom.push import AssociationFailed, failure_summary, part10_files, push_files

    missing = [path for path in args.paths if not Path(path).exists()]
    if missing:
        print(f"no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    files = part10_files([Path(path) for path in args.paths])
    if not files:
        print("no DICOM files found (Part 10 files, any name, folders searched at any depth)", file=sys.stderr)
        return 2
    try:
        statuses = push_files(files, host=args.host, port=args.port, called_aet=args.aet,
                              calling_aet=args.calling_aet)
    except AssociationFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    failed = [s for s in statuses if s != 0]
    print(f"sent {len(statuses)} instances, {len(failed)} failed" + (f": {failure_summary(failed)}" if failed else ""))
    return 1 if failed else 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from models.commands import DataSource, architecture_for, network_lung_source, paper_options, train_command
    from models.datasets import DatasetError
    from models.exit_codes import EXIT_DATA, EXIT_NON_FINITE, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
    from models.training import NonFiniteError, TrainingDataError

    configure_logging(get_settings().log_level, False)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"cttriage train: --device {args.device} but CUDA is not available to this process", file=sys.stderr)
        return EXIT_USAGE
    source = DataSource(data=Path(args.data) if args.data else None, labels=Path(args.labels) if args.labels else None,
                        phantoms=args.phantoms, seed=args.seed)
    architecture = architecture_for(args.network, args.variant, args.levels, args.base_channels, args.max_channels)
    options = paper_options(args.network, steps=args.steps, batch_size=args.batch_size,
                            slices_per_series=args.slices_per_series, validate_every=args.validate_every,
                            seed=args.seed, device=args.device, log_every=args.log_every)
    try:
        lung_source = network_lung_source(Path(args.lungs_model), args.device) if args.lungs_model else None
        report = train_command(args.network, source, Path(args.out), args.version, options,
                               architecture=architecture, val_size=args.val_size, training_data=args.training_data,
                               lung_source=lung_source, max_skipped=args.max_skipped)
    except DatasetError as exc:
        print(f"cttriage train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDataError as exc:
        print(f"cttriage train: {exc}", file=sys.stderr)
        return EXIT_DATA
    except NonFiniteError as exc:
        print(f"cttriage train: {exc}", file=sys.stderr)
        return EXIT_NON_FINITE
    return EXIT_OK if report.checkpoint is not None else EXIT_PARTIAL


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.commands import DataSource, evaluate_command
    from models.datasets import DatasetError
    from models.exit_codes import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
    from models.inference import InferenceOptions, TriageNetworks
    from models.model_store import bundle_paths, resolve_bundle

    settings = get_settings()
    configure_logging(settings.log_level, False)
    source = DataSource(data=Path(args.data) if args.data else None, labels=Path(args.labels) if args.labels else None,
                        phantoms=args.phantoms, seed=args.seed)
    paths = (bundle_paths(args.model) if args.model
             else resolve_bundle(settings.model_path, settings.model_dir, settings.model_version))
    networks = None
    if paths is not None:
        device = args.device or settings.device
        networks = TriageNetworks.from_bundle(paths, InferenceOptions(device=device, threads=settings.torch_threads))
    elif args.no_threshold:
        print("no model configured (--model, CTTRIAGE_MODEL_PATH or CTTRIAGE_MODEL_DIR) and --no-threshold given",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        report = evaluate_command(source, networks, include_threshold=not args.no_threshold,
                                  severe_percent=args.severe_percent, inplane_spacing_mm=settings.inplane_spacing_mm,
                                  json_path=Path(args.json) if args.json else None)
    except DatasetError as exc:
        print(f"cttriage evaluate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if report["failed"]:
        print(f"cttriage evaluate: {report['failed']} series failed (named in the table above)", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def cmd_data(args: argparse.Namespace) -> int:
    """Convert a public data set's layout into the training layout, with a summary of what was skipped."""
    from models.dataset_converters import CONVERTERS, ConversionError
    from models.exit_codes import EXIT_OK, EXIT_USAGE

    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        print(f"cttriage data: {src} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    options: dict[str, bool | str] = {"verify": args.verify}
    if args.dataset == "mosmed":
        options["ct0_cohort"] = args.ct0_cohort
    try:
        summary = CONVERTERS[args.dataset](src, out, **options)
    except ConversionError as exc:
        print(f"cttriage data: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print("\n".join(summary.lines()))
    if summary.series == 0:
        print(f"cttriage data: no series taken from {src}", file=sys.stderr)
        return EXIT_USAGE
    print(f"next: cttriage train multitask --data {out} --out MODELS --version v1 (see models/README.md)")
    return EXIT_OK


def _add_data_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`data`: public data sets into the training layout (models/dataset_converters.py)."""
    from models.exit_codes import exit_codes_help

    data = sub.add_parser(
        "data", help="convert MosMedData, MedSeg or LUNA16 into the training layout (images/, labels.csv, ...)",
        description="Reads the public layout in SRC and writes OUT/images, OUT/lungs, OUT/lesions and "
                    "OUT/labels.csv, printing what was taken, skipped and why (see models/README.md).",
        epilog=exit_codes_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_argument("dataset", choices=["mosmed", "medseg", "luna16"])
    data.add_argument("src", help="the data set as downloaded (mosmed: the folder holding studies/ and masks/)")
    data.add_argument("out", help="a new folder for the training layout")
    data.add_argument("--verify", action="store_true", help="decompress every image (finds truncated files now)")
    data.add_argument("--ct0-cohort", choices=["other", "normal"], default="other",
                      help="mosmed: cohort of CT-0 studies (no signs of viral pneumonia; default other)")
    data.set_defaults(func=cmd_data)


def _add_model_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`train` and `evaluate`: the networks of Goncharov et al. 2021 (see models/README.md)."""

    def data_arguments(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--data", help="dataset folder: images/, lungs/, lesions/, labels.csv")
        group.add_argument("--phantoms", type=int, default=0, help="generate this many synthetic series instead")
        p.add_argument("--labels", help="labels CSV (default DATA/labels.csv)")
        p.add_argument("--seed", type=int, default=0)

    from models.exit_codes import exit_codes_help

    train = sub.add_parser("train", help="train the lungs or the multitask network (section 4 of the paper)",
                           epilog=exit_codes_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("network", choices=["lungs", "multitask"])
    data_arguments(train)
    train.add_argument("--out", required=True, help="model directory: writes OUT/VERSION/{lungs,multitask}.pt")
    train.add_argument("--version", required=True, help="model version name stored with every result")
    train.add_argument("--training-data", help="description stored in the checkpoint (default: from the data)")
    train.add_argument("--variant", default="spatial-1", help="multitask: spatial-1 (default), spatial-L or latent")
    train.add_argument("--levels", type=int, default=7)
    train.add_argument("--base-channels", type=int, default=8)
    train.add_argument("--max-channels", type=int, default=512)
    train.add_argument("--steps", type=int, help="batches (default: the paper's 16000 lungs / 30000 multitask)")
    train.add_argument("--batch-size", type=int, help="slices (lungs, 30) or series (multitask, 5) per batch")
    train.add_argument("--slices-per-series", type=int, help="multitask: slices kept per series (32)")
    train.add_argument("--validate-every", type=int)
    train.add_argument("--val-size", type=int, default=30, help="validation series (section 4.4: 30)")
    train.add_argument("--lungs-model", help="multitask: crop every series to this lungs.pt's lungs (the paper's way)")
    train.add_argument("--device", default="cpu", help="cpu or cuda:N (on CUDA: bf16 autocast, see models/README.md)")
    train.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    train.add_argument("--max-skipped", type=int, default=10,
                       help="unreadable series skipped (each named) before the run stops with status 3 (10)")
    train.add_argument("--log-every", type=int, help="progress line every N steps (steps/s, ETA, loss, validation)")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="Table-3 metrics of the threshold method and the configured networks",
                              epilog=exit_codes_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    data_arguments(evaluate)
    evaluate.add_argument("--model", help="model bundle directory (default: CTTRIAGE_MODEL_PATH/_DIR/_VERSION)")
    evaluate.add_argument("--no-threshold", action="store_true", help="leave out the threshold baseline")
    evaluate.add_argument("--severe-percent", type=float, default=50.0, help="true severity counted as severe")
    evaluate.add_argument("--device", help="cpu or cuda:N (default CTTRIAGE_DEVICE)")
    evaluate.add_argument("--json", help="write every metric and per-series outcome here")
    evaluate.set_defaults(func=cmd_evaluate)


def cmd_score(args: argparse.Namespace) -> int:
    """Score DICOM folders or NIfTI files offline, with the pipeline the workers run."""
    from app.series_selection import SeriesCriteria
    from models.predictor import predictor_for
    from worker.batch_scoring import batch_items, format_table, score_all, write_csv
    from worker.networks import load_networks

    settings = get_settings()
    configure_logging("WARNING", False)
    items = batch_items(Path(p) for p in args.paths)
    if not items:
        print("no DICOM study or NIfTI file found", file=sys.stderr)
        return 2
    predictor = predictor_for(load_networks(settings), settings.inplane_spacing_mm)

    def progress(done: int, total: int, item: object) -> None:
        bar = "#" * int(30 * done / total)
        print(f"\r[{bar:<30}] {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    rows = score_all(items, predictor, criteria=SeriesCriteria.from_settings(settings), progress=progress)
    if args.csv == "-":
        write_csv(rows, sys.stdout)
    else:
        print(format_table(rows))
        if args.csv:
            with open(args.csv, "w", newline="") as out:
                write_csv(rows, out)
    return 0 if all(r.state == "scored" for r in rows) else 1


def cmd_users(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app.db.models import ApiKey
    from app.db.session import make_session_factory
    from app.security import Role, create_api_key, revoke_api_key

    if args.action in ("add", "revoke") and not args.name.strip():
        print(f"cttriage users {args.action} needs a NAME", file=sys.stderr)
        return 2
    factory = make_session_factory(_settings())
    with factory.begin() as session:
        if args.action == "add":
            key = create_api_key(session, args.name, Role(args.role))
            print(f"API key for {args.name} ({args.role}), shown once: {key}")
        elif args.action == "revoke":
            revoke_api_key(session, args.name)
            print(f"revoked {args.name}")
        else:
            for row in session.execute(select(ApiKey).order_by(ApiKey.name)).scalars():
                state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
                print(f"{row.name}\t{row.role}\t{state}\tcreated {row.created_at:%Y-%m-%d}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cttriage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run everything on this machine (SQLite, in-process worker)")
    serve.add_argument("--demo", action="store_true", help="push a generated phantom study and print its score")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("api", help="run the HTTP API only").set_defaults(func=cmd_api)
    dicom = sub.add_parser("dicom", help="run the DICOM listener processes and the study assembler")
    dicom.add_argument("--processes", type=positive_int, default=None,
                       help="listener processes sharing the port (default CTTRIAGE_DICOM_PROCESSES; 0 there: "
                            "one per core, at most 4)")
    dicom.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)  # a listener child
    dicom.set_defaults(func=cmd_dicom)

    worker = sub.add_parser("worker", help="run a Celery scoring worker")
    worker.add_argument("--device", default="cpu", help="cpu or cuda:N")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--queues", default="", help="comma-separated; default: scoring queue and 'default'")
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("migrate", help="bring the database schema to head").set_defaults(func=cmd_migrate)

    phantom = sub.add_parser("phantom", help="write a synthetic chest CT series with ground truth")
    phantom.add_argument("out")
    phantom.add_argument("--slices", type=positive_int, default=64)
    phantom.add_argument("--size", type=positive_int, default=512, help="rows and columns")
    phantom.add_argument("--pixel-spacing", type=float, default=0.7)
    phantom.add_argument("--slice-spacing", type=float, default=None,
                         help=f"mm; default: {CHEST_COVERAGE_MM:.0f} mm of chest divided by --slices (the service "
                              "scores series covering CTTRIAGE_MIN_COVERAGE_MM, 150 mm)")
    phantom.add_argument("--severity-left", type=float, default=0.0)
    phantom.add_argument("--severity-right", type=float, default=0.0)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.set_defaults(func=cmd_phantom)

    implant = sub.add_parser("implant", help="copy a real series with ground glass of known volume in one lung")
    implant.add_argument("series", help="folder of one DICOM series (a chest CT)")
    implant.add_argument("out", help="folder for the new series and truth.json")
    implant.add_argument("--fraction", type=fraction_of_lung, required=True, help="share of the lung, 0..1")
    implant.add_argument("--lung", choices=["left", "right"], required=True, help="the patient's left or right")
    implant.add_argument("--seed", type=int, default=0, help="where the region lies and its texture")
    implant.add_argument("--hu-min", type=float, default=250.0, help="HU added to aerated lung, at least")
    implant.add_argument("--hu-max", type=float, default=350.0, help="HU added to aerated lung, at most")
    implant.set_defaults(func=cmd_implant)

    score = sub.add_parser("score", help="score DICOM folders or NIfTI files offline (table or CSV)")
    score.add_argument("paths", nargs="+", help="folders of DICOM files (any depth) or .nii/.nii.gz files")
    score.add_argument("--csv", help="also write a CSV here ('-': CSV on stdout instead of the table)")
    score.set_defaults(func=cmd_score)

    users = sub.add_parser("users", help="API keys: add (shown once), list, revoke")
    users.add_argument("action", choices=["add", "list", "revoke"])
    users.add_argument("name", nargs="?", default="", help="who the key is for (add, revoke)")
    users.add_argument("--role", choices=["radiologist", "admin"], default="radiologist")
    users.set_defaults(func=cmd_users)

    push = sub.add_parser("push", help="send DICOM files or folders to a listener (C-STORE)")
    push.add_argument("paths", nargs="+")
    push.add_argument("--host", default="127.0.0.1")
    push.add_argument("--port", type=int, default=11112)
    push.add_argument("--aet", default="CTTRIAGE", help="called AE title")
    push.add_argument("--calling-aet", default="CTTRIAGE_CLI")
    push.set_defaults(func=cmd_push)
    _add_model_commands(sub)
    _add_data_command(sub)
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def fraction_of_lung(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (0.2 is 20 %), not {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigurationError as exc:  # a setting the service must not start with: one line, status 2
        print(f"cttriage {args.command}: {exc}", file=sys.stderr)
        return 2
    except CtTriageError as exc:  # a refusal the user can act on (a duplicate key, an unknown name): one line
        print(f"cttriage {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
