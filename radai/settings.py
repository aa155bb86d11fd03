"""The one settings object, read from `RADAI_*` environment variables."""

from __future__ import annotations

import ipaddress
from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dicom_io.destinations import Destination, parse_destination

# The analyser workers run unless RADAI_PIPELINE says otherwise: the one docs/models/report.md
# shows better on patients the models never saw. On 2026-11-30 that is the classical baseline:
# the models beat it on 2 of 12 rows (CPM 0.06 vs 0.08; 18 vs 1 false calls on a normal CT).
DEFAULT_PIPELINE = "baseline"


def _canonical(destination: Destination) -> Destination:
    # Host names compare case-insensitively: the same destination written two ways must match.
    aet, host, port = destination
    return Destination(aet, host.lower(), port)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RADAI_", extra="ignore")

    home: Path = Field(default=Path("./var"), description="database, archive, outputs and logs")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty: SQLite in home")
    broker_url: str = Field(default="", description="Celery broker; empty: SQLite broker in home")
    ae_title: str = "RADAI"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    allowed_calling_aets: str = Field(default="", description="comma list; empty accepts any")
    stable_seconds: float = 5.0
    export_to: str = Field(default="", description="comma list of AET@HOST:PORT")
    export_deidentified: str = Field(
        default="", description="comma list of RADAI_EXPORT_TO destinations sent de-identified"
    )
    prior_sources: str = Field(
        default="", description="comma list of AET@HOST:PORT searched for priors (C-FIND, C-GET)"
    )
    prior_cache_mb: float = Field(
        default=2048.0, gt=0, description="the cache of retrieved priors in home holds at most this"
    )
    dashboard_port: int = 8501
    dicomweb_port: int = Field(
        default=8080, ge=0, le=65535, description="DICOMweb (/dicomweb) beside the node; 0: off"
    )
    dicomweb_host: str = Field(default="0.0.0.0", description="address DICOMweb listens on")
    dicomweb_anonymous: bool = Field(
        default=False, description="let requests without a token search and retrieve (never store)"
    )
    dicomweb_public_url: str = Field(
        default="",
        description="the service root as clients see it behind a proxy; empty: as reached",
    )
    ohif_dir: str = Field(
        default="", description="OHIF's unpacked package (scripts/setup.sh); empty: var/ohif"
    )
    viewer_url: str = Field(
        default="",
        description="OHIF's address as browsers see it, for the dashboard's links; empty: the "
        "dashboard's host on RADAI_DICOMWEB_PORT",
    )
    max_instance_mb: float = Field(default=512.0, description="larger instances are refused")
    min_free_disk_mb: float = Field(default=1024.0, description="refuse instances below this")
    node_processes: int = Field(
        default=1,
        ge=1,
        le=32,
        description="processes receiving on the DICOM port (SO_REUSEPORT): more use more cores "
        "for concurrent senders; each takes up to 32 associations",
    )
    queue: str = Field(default="radai.pipeline", description="Celery queue of process_study")
    io_queue: str = Field(default="radai.io", description="Celery queue of exports")
    device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$")
    pipeline: str = Field(
        default=DEFAULT_PIPELINE,
        pattern="^(models|cad|baseline)$",
        description="the analyser the workers run (docs/models/report.md says which is better)",
    )
    segment_model: str = Field(
        default="radai-lung-lesion-unet@1.0.0",
        description="NAME@VERSION in ml/models, or torchscript:PATH with PATH.json beside it",
    )
    screen_model: str = Field(
        default="radai-lesion-screen-cnn@2.0.0",
        description="NAME@VERSION in ml/models, or torchscript:PATH with PATH.json beside it",
    )
    cad_model: str = Field(
        default="radai-nodule-cad-cnn@2.2.0",
        description="NAME@VERSION of the nodule CAD's candidate classifier (RADAI_PIPELINE=cad); "
        "NAME@VERSION#holdout-ANATOMY runs a fold model of the evaluation",
    )
    cad_outliner: str = Field(
        default="radai-nodule-outline-unet@1.0.0",
        description="NAME@VERSION of the U-Net that draws the nodule CAD's outlines of 18 mm and "
        "more (RADAI_PIPELINE=cad; smaller ones keep the classical outline); classical: the "
        "local density outline for all",
    )
    cad_reranker: str = Field(
        default="radai-nodule-cad-rerank@1.0.0",
        description="NAME@VERSION of the nodule CAD's second stage, which scores each outlined "
        "nodule again from its shape, density and the classifier's score (RADAI_PIPELINE=cad); "
        "none: the classifier's scores as they are",
    )
    malignancy_model: str = Field(
        default="radai-nodule-malignancy-cnn@1.0.0",
        description="NAME@VERSION of the per-lesion malignancy model; none: no score",
    )
    visibility_timeout: int = Field(default=900, description="s before an unacked task returns")
    lease_seconds: float = Field(
        default=60.0, ge=3, description="a running job's lease; a lost worker's study is requeued"
    )
    queued_timeout: float = Field(
        default=900.0,
        ge=10,
        description="s a study may stay QUEUED unstarted before its message is presumed lost",
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="torch threads per worker process; 0: the host's cores / its live worker "
        "processes (counted in worker_run_dir at the start of each study)",
    )
    worker_run_dir: str = Field(
        default="",
        description="host-local folder where pipeline worker processes register to share the "
        "cores; empty: $TMPDIR/radai-workers-UID",
    )
    infer_batch: int = Field(
        default=0,
        ge=0,
        description="slices per inference batch of the models pipeline; 0: by device (CPU 16, "
        "CUDA 64)",
    )
    archive_url: str = Field(
        default="",
        description="DICOMweb root; set: workers read series by WADO-RS and STOW results there",
    )
    archive_token: str = Field(default="", description="bearer token for RADAI_ARCHIVE_URL")
    archive_token_file: str = Field(
        default="", description="file holding the bearer token (instead of RADAI_ARCHIVE_TOKEN)"
    )
    archive_verify: str = Field(
        default="true", description="TLS to the archive: true, false, or a CA bundle's path"
    )
    archive_cache_mb: float = Field(
        default=2048.0, gt=0, description="bound of the worker's WADO-RS cache in RADAI_HOME"
    )
    log_level: str = "INFO"
    tls_cert: str = Field(default="", description="PEM certificate (chain); with tls_key: TLS only")
    tls_key: str = Field(default="", description="PEM private key, unencrypted")
    tls_ca: str = Field(default="", description="PEM CA(s); set: client certificates required")
    tls_required: bool = Field(default=False, description="refuse to start without TLS set up")
    allowed_networks: str = Field(default="", description="comma list of CIDRs; empty: any")
    audit_key_file: str = Field(
        default="", description="HMAC key of the audit trail; empty: RADAI_HOME/audit.key"
    )
    audit_checkpoint_dir: str = Field(
        default="", description="signed audit checkpoints; empty: RADAI_HOME/audit-checkpoints"
    )
    audit_checkpoint_seconds: float = Field(
        default=60.0, gt=0, description="the node signs a checkpoint this often (when changed)"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae_title_fits(cls, value: str) -> str:
        if not 0 < len(value.strip()) <= 16:
            raise ValueError("RADAI_AE_TITLE must be 1 to 16 characters")
        return value.strip()

    @field_validator("export_to", "prior_sources")
    @classmethod
    def _destinations_parse(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            parse_destination(part)
        return value

    @model_validator(mode="after")
    def _deidentified_are_destinations(self) -> Settings:
        configured = {_canonical(d) for d in self.destinations}
        for part in filter(None, (p.strip() for p in self.export_deidentified.split(","))):
            if _canonical(parse_destination(part)) not in configured:
                raise ValueError(
                    f"RADAI_EXPORT_DEIDENTIFIED names {part!r}, which is not in RADAI_EXPORT_TO"
                )
        return self

    @field_validator("allowed_networks")
    @classmethod
    def _networks_parse(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(f"not an IP network in CIDR notation: {part!r}") from None
        return value

    @model_validator(mode="after")
    def _tls_complete(self) -> Settings:
        if bool(self.tls_cert.strip()) != bool(self.tls_key.strip()):
            raise ValueError("RADAI_TLS_CERT and RADAI_TLS_KEY must be set together")
        if self.tls_ca.strip() and not self.tls_cert.strip():
            raise ValueError("RADAI_TLS_CA needs RADAI_TLS_CERT and RADAI_TLS_KEY")
        if self.tls_required and not self.tls_cert.strip():
            raise ValueError("RADAI_TLS_REQUIRED is set but RADAI_TLS_CERT/RADAI_TLS_KEY are not")
        return self

    @cached_property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def archive_dir(self) -> Path:
        return self.home_dir / "archive"

    @property
    def quarantine_dir(self) -> Path:
        return self.home_dir / "quarantine"

    @property
    def outputs_dir(self) -> Path:
        return self.home_dir / "outputs"

    @property
    def archive_cache_dir(self) -> Path:
        return self.home_dir / "archive-cache"

    @property
    def archive_bearer(self) -> str:
        """RADAI_ARCHIVE_TOKEN, else the first line of RADAI_ARCHIVE_TOKEN_FILE, else ""."""
        if self.archive_token.strip():
            return self.archive_token.strip()
        if self.archive_token_file.strip():
            path = Path(self.archive_token_file.strip()).expanduser()
            return path.read_text().strip().splitlines()[0] if path.exists() else ""
        return ""

    @property
    def archive_tls_verify(self) -> bool | str:
        value = self.archive_verify.strip()
        if value.lower() in ("", "1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        return str(Path(value).expanduser())

    @property
    def log_dir(self) -> Path:
        return self.home_dir / "logs"

    @property
    def audit_key_path(self) -> Path:
        if self.audit_key_file.strip():
            return Path(self.audit_key_file.strip()).expanduser().resolve()
        return self.home_dir / "audit.key"

    @property
    def audit_checkpoint_path(self) -> Path:
        if self.audit_checkpoint_dir.strip():
            return Path(self.audit_checkpoint_dir.strip()).expanduser().resolve()
        return self.home_dir / "audit-checkpoints"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'radai.sqlite'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.home_dir / 'broker.sqlite'}"

    @property
    def calling_aets(self) -> list[str]:
        return [a.strip() for a in self.allowed_calling_aets.split(",") if a.strip()]

    @property
    def networks(self) -> list[str]:
        return [n.strip() for n in self.allowed_networks.split(",") if n.strip()]

    @property
    def tls_paths(self) -> tuple[Path | None, Path | None, Path | None]:
        """(certificate, key, CA) as paths, None where unset."""
        return tuple(  # type: ignore[return-value]
            Path(v.strip()).expanduser() if v.strip() else None
            for v in (self.tls_cert, self.tls_key, self.tls_ca)
        )

    @property
    def destinations(self) -> list[Destination]:
        return [parse_destination(p) for p in self.export_to.split(",") if p.strip()]

    @property
    def prior_destinations(self) -> list[Destination]:
        return [parse_destination(p) for p in self.prior_sources.split(",") if p.strip()]

    @property
    def deidentified_destinations(self) -> list[Destination]:
        """The RADAI_EXPORT_DEIDENTIFIED destinations, as parsed from RADAI_EXPORT_TO."""
        wanted = {
            _canonical(parse_destination(p))
            for p in self.export_deidentified.split(",")
            if p.strip()
        }
        return [d for d in self.destinations if _canonical(d) in wanted]

    def ensure_dirs(self) -> None:
        for path in (self.archive_dir, self.quarantine_dir, self.outputs_dir, self.log_dir):
            path.mkdir(parents=True, exist_ok=True)
