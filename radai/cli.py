"""The `radai` command."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from radai.settings import Settings

log = logging.getLogger("radai")


def _database(settings: Settings, *, keyed: bool = True):  # noqa: ANN202
    """The migrated database; with `keyed`, this process's audit entries are keyed too."""
    from db.session import Database

    settings.ensure_dirs()
    db = Database(settings.db_url)
    db.upgrade()
    if keyed:
        from db import audit

        audit.configure(_audit_keys(settings))
    return db


def _audit_keys(settings: Settings, *, create: bool = True):  # noqa: ANN202
    from db.audit_keys import AuditKeyError, AuditKeys

    try:
        return AuditKeys.load(
            settings.audit_key_path, settings.audit_checkpoint_path, create=create
        )
    except (AuditKeyError, OSError) as exc:
        raise SystemExit(f"radai: audit key: {exc}") from None


def _check_audit_key(db) -> None:  # noqa: ANN001
    """Refuse to start a process whose audit key cannot continue the trail."""
    from db import audit

    try:
        with db.session() as s:
            audit.check_keys(s)
    except audit.AuditKeyError as exc:
        raise SystemExit(f"radai: {exc}") from None


def _node_config(settings: Settings):  # noqa: ANN202
    from dicom_node.server import NodeConfig

    tls_cert, tls_key, tls_ca = settings.tls_paths
    return NodeConfig(
        ae_title=settings.ae_title,
        host=settings.dicom_host,
        port=settings.dicom_port,
        allowed_calling_aets=settings.calling_aets,
        max_instance_bytes=int(settings.max_instance_mb * 1024 * 1024),
        min_free_disk_mb=settings.min_free_disk_mb,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        allowed_networks=settings.networks,
        shared_port=settings.node_processes > 1,
    )


def _node_service(settings: Settings):  # noqa: ANN202
    from db.outbox_tasks import TaskName
    from dicom_node.archive import Archive
    from dicom_node.dispatcher import celery_publisher
    from dicom_node.service import NodeService

    db = _database(settings)
    _check_audit_key(db)
    return NodeService(
        db,
        Archive(settings.archive_dir, settings.quarantine_dir),
        _node_config(settings),
        stable_seconds=settings.stable_seconds,
        publish=celery_publisher(
            settings.celery_broker_url,
            settings.queue,
            {str(TaskName.EXPORT_OUTPUT): settings.io_queue},
        ),
        checkpoint_seconds=settings.audit_checkpoint_seconds,
        queued_timeout=settings.queued_timeout,
    )


class _NodeWithDicomWeb:
    """The node service and, on RADAI_DICOMWEB_PORT, DICOMweb in the same process: STOW-RS
    stores through the node's own C-STORE path (`DicomNode.store`) and its locks."""

    def __init__(self, service, web, listeners=None) -> None:  # noqa: ANN001
        self.service = service
        self.web = web
        self.listeners = listeners  # dicom_node.listeners.Listeners, RADAI_NODE_PROCESSES > 1

    @property
    def port(self) -> int:
        return self.service.port

    def start(self) -> None:
        self.service.start()
        if self.web is not None:
            try:
                self.web.start()
            except OSError as exc:
                self.service.stop()
                raise SystemExit(f"radai: DICOMweb cannot listen: {exc}") from None
        if self.listeners is not None:
            self.listeners.start()  # after the node: its port is bound, its journal replayed

    def stop(self) -> None:
        if self.listeners is not None:
            self.listeners.stop()
        if self.web is not None:
            self.web.stop()
        self.service.stop()

    def wait(self) -> None:
        self.service.wait()


def _node_with_dicomweb(settings: Settings) -> _NodeWithDicomWeb:
    service = _node_service(settings)
    listeners = None
    if settings.node_processes > 1:
        from dicom_node.listeners import Listeners

        listeners = Listeners(
            lambda index: [sys.executable, "-m", "radai", "node", "--listener", str(index)],
            settings.node_processes - 1,
        )
    if settings.dicomweb_port == 0:
        return _NodeWithDicomWeb(service, None, listeners)
    from dicomweb.app import Service
    from dicomweb.server import DicomWebServer

    tls_cert, tls_key, tls_ca = settings.tls_paths
    web = DicomWebServer(
        Service(
            service.db,
            service.node.store,
            anonymous=settings.dicomweb_anonymous,
            public_url=settings.dicomweb_public_url.strip() or None,
        ),
        settings.dicomweb_host,
        settings.dicomweb_port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        extra_routes=_viewer_routes(settings),
    )
    return _NodeWithDicomWeb(service, web, listeners)


def _ohif_folder(settings: Settings) -> Path:
    from viewer import ohif

    return Path(settings.ohif_dir).expanduser() if settings.ohif_dir.strip() else ohif.DEFAULT_DIR


def _viewer_routes(settings: Settings) -> list:
    """OHIF beside DICOMweb when setup fetched it; without it DICOMweb runs alone (logged)."""
    from viewer import ohif

    folder = _ohif_folder(settings)
    dist = ohif.dist_of(folder)
    if dist is None:
        log.info("OHIF viewer off: no OHIF build in %s (scripts/setup.sh fetches it)", folder)
        return []
    log.info("OHIF viewer %s beside DICOMweb at /viewer", ohif.OHIF_VERSION)
    return ohif.routes(dist)


def _serve_until_signal(service) -> int:  # noqa: ANN001
    def _stop(signum, _frame):  # noqa: ANN001
        log.info("signal %d: stopping", signum)
        service.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    service.start()
    service.wait()
    return 0


def cmd_node(args: argparse.Namespace, settings: Settings) -> int:
    from radai import logs

    if args.listener is not None:
        logs.configure(settings.log_level, settings.log_dir, f"node-{args.listener}")
        return _serve_listener(settings, args.listener)
    logs.configure(settings.log_level, settings.log_dir, "node")
    return _serve_until_signal(_node_with_dicomweb(settings))


def _serve_listener(settings: Settings, index: int) -> int:
    """One of RADAI_NODE_PROCESSES: the node's receiving part only, started by the full node."""
    import dataclasses
    import os
    import threading

    from dicom_node.archive import Archive
    from dicom_node.listeners import serve_listener
    from dicom_node.server import DicomNode

    db = _database(settings)
    _check_audit_key(db)
    config = dataclasses.replace(
        _node_config(settings), shared_port=True, journal_folder=f".journal-{index}"
    )
    node = DicomNode(db, Archive(settings.archive_dir, settings.quarantine_dir), config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    serve_listener(node, stop, os.getppid())
    return 0


def _worker_config(settings: Settings):  # noqa: ANN202
    from dicom_io.destinations import format_destination
    from workers.app import WorkerConfig

    return WorkerConfig(
        database_url=settings.db_url,
        broker_url=settings.celery_broker_url,
        home=settings.home_dir,
        pipeline_queue=settings.queue,
        io_queue=settings.io_queue,
        device=settings.device,
        pipeline=settings.pipeline,
        segment_model=settings.segment_model,
        screen_model=settings.screen_model,
        cad_model=settings.cad_model,
        cad_outliner=settings.cad_outliner,
        cad_reranker=settings.cad_reranker,
        malignancy_model=settings.malignancy_model,
        export_to=settings.destinations,
        deidentified={format_destination(d) for d in settings.deidentified_destinations},
        visibility_timeout=settings.visibility_timeout,
        lease_seconds=settings.lease_seconds,
        calling_aet=settings.ae_title,
        torch_threads=settings.torch_threads,
        infer_batch=settings.infer_batch,
        prior_sources=settings.prior_destinations,
        prior_cache_mb=settings.prior_cache_mb,
        archive_url=settings.archive_url.strip(),
        archive_token=settings.archive_bearer,
        archive_verify=settings.archive_tls_verify,
        archive_cache_mb=settings.archive_cache_mb,
    )


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from radai import logs

    db = _database(settings)
    _check_audit_key(db)
    logs.configure(settings.log_level, settings.log_dir, "worker")
    _check_models(settings)
    from celery.signals import worker_shutdown

    from workers import host_share
    from workers.app import configure

    # The node signs checkpoints on its interval; a worker adds one when it stops cleanly.
    worker_shutdown.connect(lambda **_: _checkpoint_quietly(db), weak=False)
    config = _worker_config(settings)
    config.processes = args.concurrency
    queues = args.queues or f"{settings.queue},{settings.io_queue}"
    if settings.queue in queues.split(","):  # an I/O-only worker runs no models: not counted
        config.run_dir = (
            Path(settings.worker_run_dir) if settings.worker_run_dir else host_share.default_dir()
        )
    _reap_quietly(db, settings.queued_timeout)
    app = configure(config)
    argv = [
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(args.concurrency),
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    argv += ["--pool", "solo"] if args.concurrency == 1 else ["--pool", "prefork"]
    if args.name:
        argv += ["--hostname", args.name]
    app.worker_main(argv)
    return 0


def _reap_quietly(db, queued_timeout: float) -> None:  # noqa: ANN001
    """A worker starting after a crash queues again the studies whose workers were lost, even
    where no node runs its reaper (db/leases.py)."""
    from db import leases

    try:
        requeued = leases.reap(db, actor="reaper:worker", queued_timeout=queued_timeout)
    except Exception:  # noqa: BLE001 - the node's loop reaps too; starting matters more
        log.warning("reaping lapsed leases at start failed", exc_info=True)
        return
    if requeued:
        log.info("queued again %d studies whose worker was lost", len(requeued))


def _check_models(settings: Settings) -> None:
    """Fail at start, not on the first study, when a configured model cannot be found."""
    from ml.runtime import registry

    refs = [settings.segment_model, settings.screen_model] if settings.pipeline == "models" else []
    if settings.pipeline == "cad":
        refs.append(settings.cad_model)
        if settings.cad_outliner.lower() != "classical":  # no U-Net to check
            refs.append(settings.cad_outliner)
        if settings.cad_reranker.lower() != "none":
            refs.append(settings.cad_reranker)
    if settings.malignancy_model.lower() not in ("", "none"):
        refs.append(settings.malignancy_model)
    for ref in refs:
        try:
            registry.check(ref)
        except registry.ModelError as exc:
            raise SystemExit(f"radai: bad model setting: {exc}") from None


DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "samples"
# The shared data folder of this workplace (README: `radai train --data DIR`).
REAL_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    from ml.runtime import registry

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.registry) if args.registry else registry.MODELS_DIR
    if args.task == "malignancy":  # real LIDC crops and their readers' ratings, no folds
        from ml.training import malignancy

        print(f"training malignancy on the LIDC readers' ratings in {args.data} into {root}")
        for path in malignancy.train_and_register(
            Path(args.data), root=root, max_steps=args.steps, progress=not args.quiet
        ):
            print(f"wrote {path}")
        return 0
    if args.task == "outline":  # real LIDC crops and their readers' outlines, no folds
        from ml.training import nodule_outline

        print(f"training the nodule outline U-Net on the LIDC readers' outlines in {args.data}")
        for path in nodule_outline.train_and_register(
            Path(args.data),
            root=root,
            steps=args.steps or nodule_outline.STEPS,
            progress=not args.quiet,
        ):
            print(f"wrote {path}")
        return 0
    if args.task == "cad":
        return _train_cad(args, settings, root)
    if args.task == "cad-rerank":
        return _train_cad_rerank(args, settings, root)
    device = args.device or settings.device
    if args.source == "synthetic":
        return _train_synthetic(args, root)
    from ml.data.backgrounds import ANATOMIES
    from ml.training import real_training
    from ml.training.segmenter import device_of

    anatomies = args.anatomies or list(ANATOMIES)
    unknown = [a for a in anatomies if a not in ANATOMIES]
    if unknown:
        raise SystemExit(f"radai train: unknown anatomies {unknown}; known: {list(ANATOMIES)}")
    try:
        device_of(device)
    except ValueError as exc:
        raise SystemExit(f"radai train: {exc}") from None
    data = Path(args.data)
    cache = Path(args.cache) if args.cache else Path(settings.home) / "cache" / "real-studies"
    print(
        f"training {args.task} on real LIDC nodules in the anatomies {', '.join(anatomies)} "
        f"from {data} into {root} on {device} "
        f"({'with' if args.folds else 'without'} leave-one-anatomy-out folds; cache {cache})"
    )
    common = {
        "root": root,
        "anatomies": anatomies,
        "folds": args.folds,
        "cache": cache,
        "device": device,
        "progress": not args.quiet,
    }
    if args.studies:
        common["per_anatomy"] = args.studies
    try:
        if args.task == "screen":
            written = real_training.train_screener(
                data,
                version=args.version or registry.SCREENER_VERSION,
                segmenter_version=args.segmenter_version or registry.SEGMENTER_VERSION,
                steps=args.steps or real_training.scr.STEPS,
                **common,
            )
        else:
            written = real_training.train_segmenter(
                data,
                version=args.version or registry.SEGMENTER_VERSION,
                steps=args.steps or real_training.SEG_STEPS,
                **common,
            )
    except (FileNotFoundError, ValueError, registry.ModelError) as exc:
        raise SystemExit(f"radai train: {exc}") from None
    for path in written:
        print(f"wrote {path}")
    return 0


def _train_cad(args: argparse.Namespace, settings: Settings, root: Path) -> int:
    """The nodule CAD's candidate classifier: samples made (or reused) from the real data, then
    the shipped model and, with --folds, the anatomy-group fold models."""
    from ml.data.backgrounds import ANATOMIES
    from ml.runtime.cad import CAD_VERSION
    from ml.training import cad

    anatomies = args.anatomies or list(ANATOMIES)
    unknown = [a for a in anatomies if a not in ANATOMIES]
    if unknown:
        raise SystemExit(f"radai train: unknown anatomies {unknown}; known: {list(ANATOMIES)}")
    samples_dir = Path(args.cache) if args.cache else Path(settings.home) / "cache" / "cad-samples"
    print(
        f"training cad on real LIDC nodules in the anatomies {', '.join(anatomies)} from "
        f"{args.data} into {root} (samples in {samples_dir})"
    )
    try:
        samples = cad.build_samples(
            Path(args.data),
            samples_dir,
            anatomies,
            args.studies or cad.TRAIN_STUDIES,
            cad.VALIDATION_STUDIES,
        )
        written = cad.train_and_register(
            samples,
            root=root,
            version=args.version or CAD_VERSION,
            folds=args.folds,
            steps=args.steps or cad.STEPS,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"radai train: {exc}") from None
    for path in written:
        print(f"wrote {path}")
    return 0


def _train_cad_rerank(args: argparse.Namespace, settings: Settings, root: Path) -> int:
    """The nodule CAD's second stage: the whole CAD run (or its outlines reused) on validation
    composites of each anatomy with the fold classifiers, then every recipe fitted and compared
    leave one anatomy out, and the best registered if it beats the classifier."""
    from ml.data.backgrounds import ANATOMIES
    from ml.runtime import registry
    from ml.training import cad_outlines, cad_rerank

    anatomies = args.anatomies or list(ANATOMIES)
    unknown = [a for a in anatomies if a not in ANATOMIES]
    if unknown:
        raise SystemExit(f"radai train: unknown anatomies {unknown}; known: {list(ANATOMIES)}")
    cache = Path(args.cache) if args.cache else Path(settings.home) / "cache" / "cad-outlines"
    out = Path(settings.home) / "cad-rerank-validation.json"
    classical = registry.CAD_OUTLINER == registry.CLASSICAL_OUTLINE
    print(
        f"fitting the nodule CAD's second stage on validation outlines from {args.data} into "
        f"{root} (outlines in {cache}, tables in {out})"
    )
    try:
        paths = cad_outlines.collect(
            Path(args.data),
            cache,
            anatomies,
            args.studies or cad_outlines.STUDIES_PER_ANATOMY,
            outliner=None if classical else registry.CAD_OUTLINER,
        )
        cad_rerank.fit_and_register(paths, out, root=root, outliner=registry.CAD_OUTLINER)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"radai train: {exc}") from None
    return 0


def _train_synthetic(args: argparse.Namespace, root: Path) -> int:
    """The earlier recipe: synthetic lesions drawn into lung1 and lung2 (data/samples)."""
    from ml.training import screener, segmenter

    data = Path(args.data) if args.data != str(REAL_DATA_DIR) else DATA_DIR
    print(
        f"training {args.task} on semi-synthetic data from {data} into {root} "
        f"({'with' if not args.no_folds else 'without'} leave-one-patient-out folds)"
    )
    if args.task == "screen":
        written = screener.train_and_register(
            data,
            root=root,
            studies=args.studies or screener.STUDIES,
            steps=args.steps or screener.STEPS,
            folds=not args.no_folds,
            progress=not args.quiet,
        )
    else:
        written = segmenter.train_and_register(
            args.task,
            data,
            root=root,
            steps=args.steps,
            folds=not args.no_folds,
            progress=not args.quiet,
        )
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    from ml.evaluation import evaluate as evaluation
    from ml.runtime import registry

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.registry) if args.registry else registry.MODELS_DIR
    out = Path(args.out)
    if args.unseen:
        return _evaluate_unseen(args, root, out)
    if args.followup:
        return _evaluate_followup(args, out)
    results = evaluation.evaluate(
        Path(args.data),
        out,
        root=root,
        n_per_case=args.studies,
        robust_per_case=args.robust,
        progress=lambda msg: print(msg, flush=True),
        update_cards=not args.no_cards,
    )
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'} ({results['seconds']:.0f} s)")
    return 0


def _evaluate_unseen(args: argparse.Namespace, root: Path, out: Path) -> int:
    """The evaluation on unseen patients (real LIDC test nodules in held-out anatomy); its
    section of the report is replaced, the other tables stay."""
    from ml.evaluation import report, unseen

    methods = unseen.standard_methods(root)
    if args.methods:
        unknown = [m for m in args.methods if m not in methods]
        if unknown:
            raise SystemExit(f"radai evaluate: unknown methods {unknown}; known: {list(methods)}")
        methods = {m: methods[m] for m in args.methods}
    results, _ = unseen.run(
        Path(args.data),
        methods,
        k=args.unseen_studies,
        robust_k=args.unseen_robust,
        progress=lambda msg: print(msg, flush=True),
    )
    earlier = out / report.UNSEEN_JSON
    if args.methods and earlier.is_file():
        try:
            results = unseen.carry_over(results, json.loads(earlier.read_text()))
        except ValueError as exc:
            print(f"radai evaluate: earlier results not carried over: {exc}")
    path = report.write_unseen(out, results)
    print(results["verdict"]["sentence"])
    print(f"report: {path} ({results['seconds']:.0f} s)")
    return 0


def _evaluate_followup(args: argparse.Namespace, out: Path) -> int:
    """The follow-up validation on real CT pairs (known deformation, real LIDC nodules at two
    sizes); its section of the report is replaced, the other tables stay."""
    from ml.evaluation import followup_real, report

    anatomies = args.followup_anatomies or list(followup_real.ANATOMIES)
    results = followup_real.run(
        Path(args.data),
        anatomies,
        pairs_per_anatomy=args.followup_pairs,
        baseline=not args.followup_no_baseline,
        threads=args.followup_threads,
        progress=lambda msg: print(msg, flush=True),
    )
    path = report.write_followup(out, results)
    for t in results["targets"]:
        print(f"{'met' if t['met'] else 'NOT met'}: {t['target']} ({t['value']})")
    print(f"report: {path} ({results['seconds']:.0f} s)")
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from ml.runtime import registry

    for card in registry.available():
        ev = card.get("evaluation", {}).get("synthetic_held_out_patient", {})
        figures = ", ".join(f"{k} {v[0]:.3f}" for k, v in ev.items() if v and v[0] is not None)
        print(
            f"{card['name']}@{card['version']}  task={card['task']}  sha256={card['sha256'][:12]}"
        )
        if figures:
            print(f"    synthetic held-out: {figures}")
    print(
        f"configured: pipeline={settings.pipeline} segment={settings.segment_model} "
        f"screen={settings.screen_model} cad={settings.cad_model} "
        f"cad-outliner={settings.cad_outliner} cad-reranker={settings.cad_reranker} "
        f"malignancy={settings.malignancy_model}"
    )
    return 0


def _spawn(command: list[str]):  # noqa: ANN202
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "radai", *command])


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from radai import logs

    logs.configure(settings.log_level, settings.log_dir, "node")
    service = _node_with_dicomweb(settings)
    children = [_spawn(["worker"]), _spawn(["dashboard"])]
    try:
        return _serve_until_signal(service)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(timeout=30)


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    import os
    from importlib.util import find_spec

    _database(settings)  # create or migrate first: the app itself never changes the schema
    # The ASGI wrapper (dashboard/server.py) puts radai's access rules in front of Streamlit.
    app = find_spec("dashboard.server").origin
    _audit_keys(settings)  # created here: the app only reads them
    env = {
        **os.environ,
        "RADAI_DATABASE_URL": settings.db_url,
        "RADAI_HOME": str(settings.home_dir),
        "RADAI_AUDIT_KEY_FILE": str(settings.audit_key_path),
        "RADAI_AUDIT_CHECKPOINT_DIR": str(settings.audit_checkpoint_path),
    }
    argv = [
        sys.executable, "-m", "streamlit", "run", app,
        "--server.address", args.host,
        "--server.port", str(args.port or settings.dashboard_port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--client.showErrorDetails", "type",
        "--client.toolbarMode", "minimal",
        # The XSRF cookie is also the browser's device token for downloads and the login
        # throttle (dashboard.access): it must be on whatever a config file says.
        "--server.enableXsrfProtection", "true",
    ]  # fmt: skip
    # Replace this process: a signal to `radai dashboard` then reaches Streamlit itself.
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def cmd_user(args: argparse.Namespace, settings: Settings) -> int:
    import getpass

    from db.users import add_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if password != getpass.getpass("password again: "):
            print("radai: the passwords differ", file=sys.stderr)
            return 2
    db = _database(settings)
    try:
        with db.session() as s:
            add_user(s, args.name, args.role, password, actor=f"cli:{args.by}")
    except ValueError as exc:
        print(f"radai: {exc}", file=sys.stderr)
        return 1
    print(f"user {args.name} added with role {args.role}")
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from db import api_tokens

    db = _database(settings)
    actor = f"cli:{getattr(args, 'by', 'admin')}"
    try:
        with db.session() as s:
            if args.token_command == "create":
                token_id, token = api_tokens.create_token(
                    s, args.name, role=args.role, days=args.days, actor=actor
                )
            elif args.token_command == "revoke":
                api_tokens.revoke_token(s, args.id, actor=actor)
            else:
                rows = api_tokens.list_tokens(s)
    except ValueError as exc:
        print(f"radai: {exc}", file=sys.stderr)
        return 1
    if args.token_command == "create":
        print(token)  # alone on stdout, for scripts: TOKEN=$(radai token create NAME)
        print(f"token {token_id} for {args.name}; it is shown only now", file=sys.stderr)
    elif args.token_command == "revoke":
        print(f"token {args.id} revoked")
    else:
        for r in rows:
            state = "revoked" if r["revoked_at"] else f"expires {r['expires_at'] or 'never'}"
            print(f"{r['id']:>5}  {r['user']:<20} {r['role']:<12} {state}")
    return 0


def _demo_user(settings: Settings) -> tuple[str, str]:
    """The demo's radiologist account: made once, its password kept in RADAI_HOME (mode 0600)."""
    import os
    import secrets

    from db.users import add_user

    creds = settings.home_dir / "demo-credentials.txt"
    if creds.exists():
        name, password = creds.read_text().split("\n")[:2]
        return name, password
    name, password = "demo", secrets.token_urlsafe(12)
    with _database(settings).session() as s:
        add_user(s, name, "radiologist", password, actor="cli:demo")
    fd = os.open(creds, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{name}\n{password}\n")
    return name, password


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    from db.requeue import request_retry

    db = _database(settings)
    try:
        with db.session() as s:
            request_retry(s, args.study_uid, actor=f"cli:{args.user}")
    except ValueError as exc:
        print(f"radai: {exc}", file=sys.stderr)
        return 1
    print(f"study {args.study_uid} queued again (published by the node's dispatcher)")
    return 0


def cmd_release(args: argparse.Namespace, settings: Settings) -> int:
    from db.requeue import release

    db = _database(settings)
    try:
        with db.session() as s:
            release(s, args.study_uid, actor=f"cli:{args.user}", reason=args.reason)
    except ValueError as exc:
        print(f"radai: {exc}", file=sys.stderr)
        return 1
    print(f"study {args.study_uid} released and queued (published by the node's dispatcher)")
    return 0


def cmd_measure(args: argparse.Namespace, settings: Settings) -> int:
    import SimpleITK as sitk

    from ml.image.measure import measure_regions

    image = sitk.ReadImage(str(args.image))
    mask = sitk.ReadImage(str(args.mask))
    labels = sitk.GetArrayFromImage(mask).astype("int32")
    hu = sitk.GetArrayFromImage(image)
    if labels.shape != hu.shape:
        print(f"radai: image {hu.shape} and mask {labels.shape} differ in size", file=sys.stderr)
        return 2
    spacing = tuple(reversed(mask.GetSpacing()))
    rows = [m.to_dict() for m in measure_regions(labels, spacing, hu)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no labelled regions")
    for r in rows:
        print(
            f"label {r['label']}: volume {r['voxel_volume_mm3']:.2f} mm3 "
            f"(mesh {r['mesh_volume_mm3']:.2f}), max 3D diameter {r['max_3d_diameter_mm']:.2f} mm, "
            f"max axial diameter {r['max_2d_axial_diameter_mm']:.2f} mm, "
            f"mean {r['mean_hu']:.1f} HU"
        )
    return 0


def _checkpoint_quietly(db) -> None:  # noqa: ANN001
    from db import audit

    try:
        with db.session() as s:
            audit.write_checkpoint(s)
    except Exception:  # noqa: BLE001 - shutting down: say so, do not hang or mask the exit
        log.exception("audit checkpoint at shutdown failed")


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from db import audit

    if args.audit_command == "checkpoint":
        db = _database(settings)
        try:
            with db.session() as s:
                checkpoint = audit.write_checkpoint(s)
        except audit.AuditTampered as exc:
            print(f"radai: no checkpoint signed: {exc}", file=sys.stderr)
            return 1
        if checkpoint is None:
            print("audit trail empty or unchanged since the latest checkpoint: nothing to sign")
        else:
            print(
                f"checkpoint signed: entry {checkpoint.seq}, head {checkpoint.head} "
                f"({settings.audit_checkpoint_path / 'checkpoints.jsonl'})"
            )
        return 0
    from db.audit_keys import AuditKeyError, AuditKeys

    # verify never invents a key: a missing one is a setup error (2), not a broken trail (1)
    try:
        keys = AuditKeys.load(settings.audit_key_path, settings.audit_checkpoint_path, create=False)
    except AuditKeyError as exc:
        print(f"radai: {exc}", file=sys.stderr)
        return 2
    db = _database(settings, keyed=False)
    with db.session() as s:
        report = audit.verify(s, keys)
    if args.json:
        print(json.dumps(_report_dict(report), indent=2))
    elif report.ok:
        latest = report.latest_checkpoint
        print(
            f"audit trail intact: {report.entries} entries ({report.keyed} keyed, "
            f"{report.unkeyed} unkeyed from before keying); {report.checkpoints} signed "
            f"checkpoint{'' if report.checkpoints == 1 else 's'} verified"
            + (f", the latest at entry {latest.seq} ({latest.at})" if latest else "")
        )
    else:
        where = "" if report.broken_at_seq is None else f" at entry {report.broken_at_seq}"
        print(f"audit trail BROKEN{where}: {report.problem}")
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0 if report.ok else 1


def _report_dict(report) -> dict:  # noqa: ANN001
    latest = report.latest_checkpoint
    return {
        "ok": report.ok,
        "entries": report.entries,
        "broken_at_seq": report.broken_at_seq,
        "problem": report.problem,
        "keyed": report.keyed,
        "unkeyed": report.unkeyed,
        "checkpoints": report.checkpoints,
        "latest_checkpoint": None
        if latest is None
        else {"seq": latest.seq, "head": latest.head, "at": latest.at},
        "notes": list(report.notes),
    }


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    _database(settings, keyed=False)
    print(f"database at revision head: {_redact(settings.db_url)}")
    return 0


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_studies(args: argparse.Namespace, settings: Settings) -> int:
    from db.queries import study_summaries

    db = _database(settings)
    with db.session() as s:
        rows = study_summaries(s, limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no studies")
        return 0
    print(f"{'STUDY UID':<66} {'STATE':<15} {'INST':>5} {'PRIO':>4}  ERROR/FLAGS")
    for r in rows:
        prio = "" if r["priority"] is None else r["priority"]
        print(
            f"{r['study_uid']:<66} {r['state']:<15} {r['instances']:>5} {prio:>4}  "
            f"{(r['error'] or '')[:60]}"
        )
        # Every flag on its own line: a later flag never hides an earlier one.
        for flag in r["flags"]:
            print(f"{'':<66} flag {flag['at'] or 'before 0005':<32} {flag['reason']}")
        if r["findings_error"]:
            print(f"{'':<66} findings unreadable: {r['findings_error'][:120]}")
    return 0


def _expand(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return files


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_io.cstore import StoreError, send_files
    from dicom_io.destinations import BadDestination, parse_destination

    try:
        destination = parse_destination(args.to)
    except BadDestination as exc:
        print(f"radai: {exc}", file=sys.stderr)
        return 2
    files = _expand(args.paths)
    if not files:
        print("no files to send", file=sys.stderr)
        return 2
    try:
        results = send_files(
            files, destination, calling_aet=args.calling_aet, timeout=args.timeout, check=False
        )
    except StoreError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.reason}", file=sys.stderr)
    print(f"sent {len(results) - len(failed)} of {len(results)} to {args.to}")
    return 1 if failed else 0


def cmd_sample(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_node.samples import build_sample_studies

    out = Path(args.out) if args.out else settings.home_dir / "samples"
    built = build_sample_studies(out)
    for case, files in built.items():
        print(f"{case}: {len(files)} CT images in {files[0].parent}")
    return 0


def _wait_for_states(settings: Settings, study_uids: list[str], states: set[str], timeout: float):  # noqa: ANN202
    from db.queries import study_summaries

    db = _database(settings)
    deadline = time.monotonic() + timeout
    while True:
        with db.session() as s:
            rows = {r["study_uid"]: r for r in study_summaries(s)}
        wanted = [rows.get(uid) for uid in study_uids]
        if all(r and r["state"] in states for r in wanted) or time.monotonic() > deadline:
            return wanted
        time.sleep(0.5)


def _print_findings(case: str, row: dict | None) -> None:
    from db.findings import Findings

    if row is None:
        print(f"{case}: study missing")
        return
    print(f"{case}: study {row['study_uid']} is {row['state']}", end="")
    if row["error"]:
        print(f" ({row['error']})")
        return
    findings = Findings.from_json(row["findings"])
    if findings is None:
        print(f" ({row['findings_error']})" if row.get("findings_error") else "")
        return
    print(
        f", suspicion {findings.screening_probability:.2f}, priority {row['priority']}, "
        f"lung volume {findings.lung_volume_ml / 1000:.1f} l"
        + (f", analysis {findings.pipeline}" if findings.pipeline else "")
    )
    for lesion in findings.lesions:
        hu = "-" if lesion.mean_hu is None else f"{lesion.mean_hu:.0f}"
        print(
            f"    lesion {lesion.label}: {lesion.volume_mm3 / 1000:.1f} ml, "
            f"max diameter {lesion.max_3d_diameter_mm:.1f} mm "
            f"(axial {lesion.max_2d_axial_diameter_mm:.1f} mm), "
            f"mean {hu} HU, {lesion.location or '-'}"
        )
    for out in row["outputs"]:
        print(f"    {out['modality']}: {out['path']}")


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_io.cstore import send_files
    from dicom_node.samples import SAMPLE_CASES, build_sample_studies, sample_study_uid
    from radai import logs

    logs.configure(settings.log_level, settings.log_dir, "demo")
    service = _node_with_dicomweb(settings)
    service.start()
    children = [_spawn(["worker"])]
    if not args.exit:
        children.append(_spawn(["dashboard"]))
    try:
        built = build_sample_studies(settings.home_dir / "samples")
        for case, files in built.items():
            node = (settings.ae_title, "127.0.0.1", service.port)
            results = send_files(files, node, calling_aet="RADAI_SCU", check=False)
            ok = sum(r.ok for r in results)
            print(f"sent sample study {case}: {ok} of {len(results)} instances stored")
        uids = [sample_study_uid(c) for c in SAMPLE_CASES]
        rows = _wait_for_states(
            settings,
            uids,
            {"DONE", "NOT_APPLICABLE", "FAILED"},
            timeout=settings.stable_seconds + args.timeout,
        )
        print("NOT FOR CLINICAL USE: findings of research software on demo data")
        for case, row in zip(SAMPLE_CASES, rows, strict=True):
            _print_findings(case, row)
        print(f"DICOM node: {settings.ae_title}@127.0.0.1:{service.port}")
        if service.web is not None:
            web = f"http://127.0.0.1:{settings.dicomweb_port}"
            print(f"DICOMweb: {web}/dicomweb (bearer token: radai token create USER)")
            from viewer import ohif

            if ohif.dist_of(_ohif_folder(settings)) is not None:
                print(f"OHIF viewer (from the dashboard's study page): {web}/viewer")
        user, password = _demo_user(settings)
        print(f"dashboard: http://127.0.0.1:{settings.dashboard_port}/")
        print(f"demo login: user {user!r}, password {password!r}")
        if args.exit:
            return 0 if all(r and r["state"] == "DONE" for r in rows) else 1
        print("running; Ctrl-C stops")
        signal.signal(signal.SIGTERM, lambda *_: service.stop())
        try:
            service.wait()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        service.stop()
        for child in children:
            child.terminate()
        for child in children:
            child.wait(timeout=30)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radai",
        description="radai: DICOM AI triage service (research software, NOT FOR CLINICAL USE). "
        "Settings come from RADAI_* environment variables; see README.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "up", help="run the service on embedded defaults: node (with DICOMweb), worker, dashboard"
    )
    node = sub.add_parser(
        "node",
        help="run the DICOM node: listener, study assembly, dispatcher and DICOMweb "
        "(RADAI_DICOMWEB_PORT)",
    )
    # Started by the node itself for RADAI_NODE_PROCESSES > 1, not by hand.
    node.add_argument("--listener", type=int, default=None, help=argparse.SUPPRESS)
    worker = sub.add_parser("worker", help="run a Celery worker for the pipeline and exports")
    worker.add_argument("--queues", default=None, help="comma list (default: both queues)")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--name", default=None, help="Celery node name, e.g. w1@%%h")
    dash = sub.add_parser("dashboard", help="run the clinicians' dashboard (Streamlit)")
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    dash.add_argument("--port", type=int, default=None, help="default RADAI_DASHBOARD_PORT")
    user = sub.add_parser("user", help="dashboard accounts")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    add = user_sub.add_parser("add", help="add a dashboard user (asks for the password twice)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=["radiologist", "admin", "auditor"])
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument("--by", default="admin", help="who adds the user (recorded in the audit log)")
    retry = sub.add_parser("retry", help="queue a FAILED (or any finished) study again")
    retry.add_argument("study_uid")
    retry.add_argument("--user", default="admin")
    rel = sub.add_parser(
        "release", help="let a HELD study (e.g. two patients' instances) be analysed; audited"
    )
    rel.add_argument("study_uid")
    rel.add_argument("--reason", required=True, help="why it may go on (kept in the audit)")
    rel.add_argument("--user", required=True, help="who releases it (kept in the audit)")
    measure = sub.add_parser("measure", help="measure each labelled region of a mask")
    measure.add_argument("image", type=Path, help="volume readable by SimpleITK (NRRD, NIfTI)")
    measure.add_argument("mask", type=Path, help="label map of the same size")
    measure.add_argument("--json", action="store_true")
    tok = sub.add_parser("token", help="bearer tokens for DICOMweb (scripts and workers)")
    tok_sub = tok.add_subparsers(dest="token_command", required=True)
    create = tok_sub.add_parser(
        "create", help="print a new token for USER (stored only as a hash: shown once)"
    )
    create.add_argument("name", metavar="USER")
    create.add_argument(
        "--role",
        choices=["radiologist", "admin", "auditor", "worker"],
        default=None,
        help="what the token may do (default: the user's role; worker: search, retrieve, store)",
    )
    create.add_argument("--days", type=float, default=None, help="expire after this many days")
    create.add_argument("--by", default="admin", help="who issues it (for the audit trail)")
    revoke = tok_sub.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("id", type=int)
    revoke.add_argument("--by", default="admin", help="who revokes it (for the audit trail)")
    tok_sub.add_parser("list", help="list tokens: id, user, role, expiry (never the token)")

    demo = sub.add_parser("demo", help="run node and worker, send the samples, print findings")
    demo.add_argument("--exit", action="store_true", help="stop after printing, for scripts")
    demo.add_argument("--timeout", type=float, default=300, help="seconds to wait for results")

    send = sub.add_parser("send", help="send DICOM files (or folders) with C-STORE")
    send.add_argument("paths", nargs="+")
    send.add_argument("--to", required=True, metavar="AET@HOST:PORT")
    send.add_argument("--calling-aet", default="RADAI_SCU")
    send.add_argument(
        "--timeout", type=float, default=60, help="seconds for any one wait or one file's store"
    )

    aud = sub.add_parser(
        "audit",
        help="verify the audit trail or sign a checkpoint of it",
        description="The audit trail's entries are keyed (HMAC-SHA256, RADAI_AUDIT_KEY_FILE) "
        "and its head is signed into checkpoints outside the database "
        "(RADAI_AUDIT_CHECKPOINT_DIR).",
    )
    aud_sub = aud.add_subparsers(dest="audit_command", required=True)
    ver = aud_sub.add_parser(
        "verify",
        help="check every entry and every signed checkpoint; exit 0 when intact, 1 with the "
        "first bad entry (seq and problem) when not",
    )
    ver.add_argument("--json", action="store_true", help="print the report as JSON")
    aud_sub.add_parser(
        "checkpoint",
        help="check the entries since the latest checkpoint and sign a new one "
        "(the node also does this every RADAI_AUDIT_CHECKPOINT_SECONDS and when it stops)",
    )

    dbp = sub.add_parser("db", help="database maintenance")
    dbp.add_argument("action", choices=["upgrade"])

    studies = sub.add_parser("studies", help="list studies with state and findings")
    studies.add_argument("--json", action="store_true", help="print a JSON list")
    studies.add_argument("--limit", type=int, default=None)

    sample = sub.add_parser("sample", help="build the bundled sample CT studies as DICOM files")
    sample.add_argument("--out", default=None, help="folder (default RADAI_HOME/samples)")

    train = sub.add_parser(
        "train",
        help="train a model: real LIDC nodules in real CTs (default) or the synthetic recipe",
    )
    train.add_argument(
        "task", choices=["segment", "screen", "malignancy", "outline", "cad", "cad-rerank"]
    )
    train.add_argument(
        "--source",
        choices=["real", "synthetic"],
        default="real",
        help="real: LIDC nodules composited into the real anatomies (--data: the shared data "
        "folder); synthetic: the earlier drawn lesions in lung1/lung2 (--data: data/samples)",
    )
    train.add_argument(
        "--steps", type=int, default=None, help="steps of every run (default: the shipped ones')"
    )
    train.add_argument(
        "--anatomies",
        nargs="+",
        default=None,
        help="real: training anatomies (default all six: lung1 lung2 normal001 cap001 cap002 P001)",
    )
    train.add_argument(
        "--folds", action="store_true", help="real: also the leave-one-anatomy-out fold models"
    )
    train.add_argument(
        "--no-folds", action="store_true", help="synthetic: skip the held-out-patient folds"
    )
    train.add_argument(
        "--studies",
        type=int,
        default=None,
        help="real: composited studies per anatomy; synthetic screen: studies (default 160)",
    )
    train.add_argument(
        "--data",
        default=str(REAL_DATA_DIR),
        help="data folder (real: with lidc-nodules/, pyradiomics-ct/, covid-ct-md/)",
    )
    train.add_argument(
        "--cache",
        default=None,
        help="real: composited-study cache (default RADAI_HOME/cache/real-studies)",
    )
    train.add_argument("--registry", default=None, help="model registry (default ml/models)")
    train.add_argument("--version", default=None, help="version to write (default the shipped)")
    train.add_argument(
        "--segmenter-version", default=None, help="screen: the segmenter whose calls it learns"
    )
    train.add_argument(
        "--device", default=None, help="auto, cpu, cuda or cuda:N (default RADAI_DEVICE)"
    )
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate = sub.add_parser("evaluate", help="evaluate models and baseline; write the report")
    evaluate.add_argument("--out", default="docs/models", help="report folder")
    evaluate.add_argument("--studies", type=int, default=20, help="synthetic studies per patient")
    evaluate.add_argument(
        "--robust", type=int, default=6, help="studies per robustness condition (0: none)"
    )
    evaluate.add_argument("--data", default=str(DATA_DIR), help="folder with the NRRD cases")
    evaluate.add_argument("--registry", default=None, help="model registry (default ml/models)")
    evaluate.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    evaluate.add_argument("--no-cards", action="store_true", help="leave the model cards alone")
    evaluate.add_argument(
        "--unseen",
        action="store_true",
        help="only the unseen-patient evaluation (real LIDC test nodules in held-out anatomy, "
        "real CTs as they are); --data is then the folder with lidc-nodules/, pyradiomics-ct/ "
        "and covid-ct-md/",
    )
    evaluate.add_argument(
        "--unseen-studies", type=int, default=5, help="composite studies per anatomy (--unseen)"
    )
    evaluate.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="--unseen: only these pipelines (models, cad, baseline); the others' figures are "
        "carried over from the earlier unseen.json when it scored the same studies",
    )
    evaluate.add_argument(
        "--unseen-robust",
        type=int,
        default=1,
        help="composite studies per anatomy under each robustness condition (--unseen)",
    )
    evaluate.add_argument(
        "--followup",
        action="store_true",
        help="only the follow-up validation: pairs built from each real CT (known breathing-like "
        "deformation, real LIDC validation-split nodules at two sizes); --data is then the "
        "folder with lidc-nodules/, pyradiomics-ct/ and covid-ct-md/; writes followup.json and "
        "its section of report.md",
    )
    evaluate.add_argument(
        "--followup-pairs", type=int, default=2, help="pairs per anatomy (--followup)"
    )
    evaluate.add_argument(
        "--followup-anatomies",
        nargs="+",
        default=None,
        help="anatomies to build pairs from (--followup; default all six)",
    )
    evaluate.add_argument(
        "--followup-threads", type=int, default=2, help="SimpleITK threads (--followup)"
    )
    evaluate.add_argument(
        "--followup-no-baseline",
        action="store_true",
        help="skip the end-to-end run on the baseline's own calls (--followup)",
    )
    sub.add_parser("models", help="list the models in the registry and the configured ones")
    return parser


COMMANDS = {
    "up": cmd_up,
    "worker": cmd_worker,
    "retry": cmd_retry,
    "release": cmd_release,
    "dashboard": cmd_dashboard,
    "user": cmd_user,
    "token": cmd_token,
    "measure": cmd_measure,
    "node": cmd_node,
    "demo": cmd_demo,
    "send": cmd_send,
    "db": cmd_db,
    "audit": cmd_audit,
    "studies": cmd_studies,
    "sample": cmd_sample,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "models": cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        for err in exc.errors():
            name = "RADAI_" + "_".join(map(str, err["loc"])).upper()
            print(f"radai: bad setting {name}: {err['msg']}", file=sys.stderr)
        return 2
    return COMMANDS[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
