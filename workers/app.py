"""The Celery application of radai's workers and the runtime its tasks use.

`configure` is called by the process that starts a worker (the `radai worker` command) with plain
values; tasks then reach the database and folders through `runtime()`. Two queues keep heavy
inference apart from I/O: `TaskName.PROCESS_STUDY` goes to the pipeline queue, exports to the I/O
queue, so a GPU worker consumes only GPU work.

Cores: a pipeline worker process registers on its host (`workers/host_share.py`, with
`WorkerConfig.run_dir`) and, at the start of each study, `share_cores` gives torch the host's
cores divided by the worker processes alive there then (unless `RADAI_TORCH_THREADS` is set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery
from celery.signals import worker_process_init

from db.outbox_tasks import TaskName
from db.session import Database
from dicom_io.archive import ArchiveClient, ArchiveSettings, SeriesCache
from ml.runtime.registry import CAD_OUTLINER, CAD_RERANKER, DEFAULT_REFS
from workers.host_share import HostRegistry, host_cores
from workers.models import set_torch_threads, torch_threads

app = Celery("radai", include=["workers.tasks"])
log = logging.getLogger("radai.worker")


@dataclass
class WorkerConfig:
    database_url: str
    broker_url: str
    home: Path
    pipeline_queue: str = "radai.pipeline"
    io_queue: str = "radai.io"
    device: str = "auto"  # auto | cpu | cuda
    pipeline: str = "baseline"  # models | cad | baseline (RADAI_PIPELINE; radai/settings.py's)
    segment_model: str = DEFAULT_REFS["segment"]
    screen_model: str = DEFAULT_REFS["screen"]
    cad_model: str = DEFAULT_REFS["cad"]
    cad_outliner: str = CAD_OUTLINER  # "classical": the local density outline
    cad_reranker: str = CAD_RERANKER  # "none": the classifier's scores as they are
    malignancy_model: str = DEFAULT_REFS["malignancy"]  # "none": no malignancy score
    export_to: list[tuple[str, str, int]] = field(default_factory=list)
    visibility_timeout: int = 900
    lease_seconds: float = 60.0  # a running job's lease (db/leases.py), renewed every third
    export_max_attempts: int = 8
    export_timeout: float = 10.0
    calling_aet: str = "RADAI"
    export_backoff_cap: float = 300.0
    # Formatted destinations (AET@HOST:PORT) whose exports are de-identified copies.
    deidentified: set[str] = field(default_factory=set)
    torch_threads: int = 0  # per process; 0: the host's cores shared among its worker processes
    processes: int = 1  # pool processes of this worker (Celery's --concurrency)
    # Where this host's pipeline worker processes register (workers/host_share.py) so that the
    # cores are divided among all of them; None: among this worker's own `processes` only.
    run_dir: Path | None = None
    infer_batch: int = 0  # slices per inference batch; 0: by device (ml/runtime/inference.py)
    # PACS nodes searched for a study's prior when the database has none (RADAI_PRIOR_SOURCES).
    prior_sources: list[tuple[str, str, int]] = field(default_factory=list)
    prior_cache_mb: float = 2048.0
    # Set: series come by WADO-RS from this DICOMweb root and results go back by STOW-RS, so the
    # worker needs no access to the node's files (RADAI_ARCHIVE_URL).
    archive_url: str = ""
    archive_token: str = ""
    archive_verify: bool | str = True
    archive_cache_mb: float = 2048.0

    @property
    def outputs_dir(self) -> Path:
        return self.home / "outputs"

    @property
    def prior_cache_dir(self) -> Path:
        return self.home / "prior-cache"

    @property
    def archive_cache_dir(self) -> Path:
        return self.home / "archive-cache"

    def archive(self) -> ArchiveClient | None:
        if not self.archive_url:
            return None
        cache = SeriesCache(self.archive_cache_dir, int(self.archive_cache_mb * 1024 * 1024))
        settings = ArchiveSettings(self.archive_url, self.archive_token, self.archive_verify)
        return ArchiveClient(settings, cache)


@dataclass
class Runtime:
    config: WorkerConfig
    db: Database
    archive: ArchiveClient | None = None


_runtime: Runtime | None = None
_host: HostRegistry | None = None


def configure(config: WorkerConfig) -> Celery:
    global _runtime, _host
    app.conf.update(
        broker_url=config.broker_url,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=config.pipeline_queue,
        task_routes={
            str(TaskName.PROCESS_STUDY): {"queue": config.pipeline_queue},
            str(TaskName.EXPORT_OUTPUT): {"queue": config.io_queue},
        },
        broker_transport_options=_transport_options(config),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_ignore_result=True,
    )
    config.outputs_dir.mkdir(parents=True, exist_ok=True)
    _runtime = Runtime(config=config, db=Database(config.database_url), archive=config.archive())
    if _host is not None:
        _host.leave()  # configured again (tests): the earlier registration goes
    _host = HostRegistry(config.run_dir) if config.run_dir is not None else None
    # The solo pool runs tasks in this process; a prefork pool's children register themselves.
    share_cores(register=config.processes == 1)
    return app


@dataclass(frozen=True)
class CoreShare:
    threads: int
    processes: int  # worker processes counted on this host (or this worker's pool)
    cores: int

    def __str__(self) -> str:
        return (
            f"torch threads {self.threads} ({self.processes} worker process(es) on this host, "
            f"{self.cores} core(s))"
        )


def share_cores(register: bool = True) -> CoreShare:
    """Give this process's torch (and SimpleITK) its share of the host's cores now: the cores
    divided by the worker processes registered and alive on this host (this one included,
    `register`ed first), or by this worker's pool size without a registry; `RADAI_TORCH_THREADS`
    wins. Called at the start of each study, so a worker that started or died since counts."""
    config = runtime().config
    processes = config.processes
    if _host is not None:
        try:
            if register:
                _host.ensure()
            processes = max(1, _host.live())
        except OSError:  # an unwritable folder: fall back to the pool's own size
            log.warning("cannot count worker processes in %s", _host.folder, exc_info=True)
    cores = host_cores()
    share = CoreShare(torch_threads(config.torch_threads, processes, cores), processes, cores)
    set_torch_threads(share.threads)
    return share


def _transport_options(config: WorkerConfig) -> dict:
    if not config.broker_url.startswith(("redis://", "rediss://")):
        return {}  # kombu's SQLAlchemy transport passes its options to create_engine()
    # A task of a worker killed mid-study returns to the queue after the visibility timeout;
    # kombu looks for such tasks only every interval x throttle seconds (100 s by default).
    vt = config.visibility_timeout
    return {
        "visibility_timeout": vt,
        "unacked_restore_interval": max(1, min(10, vt // 2)),
        "unacked_restore_throttle": 1,
    }


def runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("workers.app.configure() was not called in this process")
    return _runtime


@worker_process_init.connect
def _fresh_connections_after_fork(**_kwargs: object) -> None:
    # Pooled database connections must not be shared across a fork.
    if _runtime is not None:
        _runtime.db.engine.dispose(close=False)
        config = _runtime.config
        _runtime.archive = config.archive()  # nor an HTTP session's pooled connections
        share_cores()  # registers this pool process on the host first
