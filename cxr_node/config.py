"""The one typed, frozen Settings object, loaded from YAML with environment overrides.

Precedence, lowest first: built-in defaults < the YAML file < ``CXR_NODE_<SECTION>__<KEY>`` environment
variables < command-line flags (applied by the CLI through :meth:`Settings.with_overrides`).
This module is the only reader of ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cxr_node.errors import ConfigError

ENV_PREFIX = "CXR_NODE_"
ENV_CONFIG = "CXR_NODE_CONFIG"
DEFAULT_CONFIG_PATH = Path("config/node.yaml")

AETitle = Annotated[
    str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]*[^ ][\x20-\x5b\x5d-\x7e]*$")
]
Port = Annotated[int, Field(ge=0, le=65535)]


def _networks(value: list[str]) -> list[str]:
    for item in value:
        ipaddress.ip_network(item, strict=False)  # raises ValueError naming the bad entry
    return value


Networks = Annotated[list[str], AfterValidator(_networks)]
"""An allow-list of IPv4/IPv6 addresses and networks (``node``, ``stow`` and ``hl7_in`` ``allowed_ips``)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Section):
    """DICOM TLS for the SCP (PS3.15 B.1, the BCP 195 profile)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.ca_file to verify clients against")
        return self


class NodeSettings(_Section):
    """The node's Application Entity and the limits at its door."""

    ae_title: AETitle = "CXR_NODE"
    host: str = "0.0.0.0"  # noqa: S104  - a DICOM node listens for the PACS; narrow it in config
    port: Port = 11112
    allowed_calling_aets: list[AETitle] = []
    allowed_ips: Networks = []
    require_called_aet: bool = True
    max_associations: int = Field(default=64, ge=1, le=4096)
    max_associations_per_peer: int = Field(default=16, ge=1, le=4096)
    max_pdu: int = Field(default=262144, ge=0)
    max_instance_mb: float = Field(default=512.0, gt=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    artim_timeout_s: float = Field(default=10.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    receiver_processes: int = Field(default=2, ge=1, le=64)
    max_queue_depth: int = Field(default=5000, ge=1)
    tls: TLSSettings = TLSSettings()

    @property
    def max_instance_bytes(self) -> int:
        """The largest C-STORE data set accepted, in bytes."""
        return int(self.max_instance_mb * 1024 * 1024)


class StorageSettings(_Section):
    """Where the durable state lives and how it is written."""

    root: Path = Path("/var/lib/cxr-node")
    fsync: bool = True
    keep_skipped: bool = False
    max_disk_percent: float = Field(default=90.0, gt=0, le=100)
    retention_days: float = Field(default=30.0, ge=0)
    identifier_key: Path | None = None
    max_jobs: int = Field(default=1_000_000, ge=0)
    database: str = "sqlite"
    database_password_file: Path | None = None
    runtime_dir: Path | None = None

    @field_validator("database")
    @classmethod
    def _database(cls, value: str) -> str:
        if value == "sqlite":
            return value
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("storage.database is `sqlite` or a URL postgresql://user@host:5432/dbname")
        if re.match(r"^[a-z]+://[^/@]*:[^/@]*@", value):
            raise ValueError(
                "storage.database: no password in the URL; put it in storage.database_password_file (mode 0600)"
                " or the environment variable CXR_NODE_DB_PASSWORD"
            )
        return value

    @property
    def shared(self) -> bool:
        """True when the store is a PostgreSQL server shared by several hosts (scale-out)."""
        return self.database != "sqlite"

    @property
    def run_dir(self) -> Path:
        """This host's runtime files (supervisors' pid and ready files, the worker's metrics): ``runtime_dir``,
        else ``root/run``, or ``root/run/<host name>`` when other hosts share the root."""
        if self.runtime_dir is not None:
            return self.runtime_dir
        return self.root / "run" / socket.gethostname() if self.shared else self.root / "run"

    @property
    def identifier_key_file(self) -> Path:
        """The site's key for hashing patient identifiers: ``identifier_key``, else ``root/identifier.key``."""
        return self.identifier_key or self.root / "identifier.key"


class TriageSettings(_Section):
    """Which received instances are analysed; everything else is recorded as skipped with a reason."""

    modalities: list[str] = ["CR", "DX"]
    view_positions: list[str] = ["PA", "AP"]
    accept_missing_view_position: bool = True
    body_parts: list[str] = ["CHEST"]
    accept_missing_body_part: bool = True
    max_dimension: int = Field(default=8192, ge=64)


class Destination(_Section):
    """A peer that receives the node's results: a DICOM AE over DIMSE (C-STORE), or a DICOMweb server
    (STOW-RS) at ``url``; or a RIS that gets the worklist triage (docs/triage-out.md): an HL7 v2 ORU^R01 over
    MLLP to ``host``/``port``, or a FHIR R4 Observation and DiagnosticReport POSTed to the server at ``url``.
    All get the same deliveries: order, retries, dead letters, probes, leases. A triage destination gets one
    message per job whose result qualifies (``send``: positive results only, or all, not analysed included)."""

    TRIAGE_KINDS: ClassVar[dict[str, str]] = {"hl7": "oru", "fhir": "fhir"}
    """The delivery kind of each triage protocol (a row in the deliveries table with no output file)."""
    _HD: ClassVar[str] = r"^[^|^~\\&\x00-\x1f\x7f]+$"  # an HL7 hierarchic designator: no delimiter, printable

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    protocol: Literal["dimse", "dicomweb", "hl7", "fhir"] = "dimse"
    ae_title: AETitle | None = Field(default=None, validate_default=True)
    host: str | None = Field(default=None, validate_default=True)
    port: Port | None = Field(default=None, validate_default=True)
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # dicomweb only: the service's base URL (STOW-RS posts to <url>/studies), how the node authenticates
    url: str | None = None
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = Field(default=None, min_length=1, pattern=r"^[^:\r\n]+$")
    password_file: Path | None = None  # basic: the password, first line; mode 0600 (read at each connection)
    token_file: Path | None = None  # bearer: the token, first line; mode 0600 (read at each connection)
    timeout_s: float | None = Field(default=None, gt=0)  # this destination's timeout (else delivery.timeout_s)
    qa: bool = False  # a QA destination: gets every output in every go-live mode, shadow included (golive)
    # hl7 and fhir only: which results reach the RIS (positive: positive decisions; all: every result, the
    # "not analysed" ones included); hl7 only: MSH-5/MSH-6 of the messages (HD, no HL7 delimiters)
    send: Literal["positive", "all"] | None = None  # None: positive (hl7 and fhir only)
    receiving_application: str | None = Field(default=None, min_length=1, max_length=180, pattern=_HD)
    receiving_facility: str | None = Field(default=None, min_length=1, max_length=180, pattern=_HD)

    @model_validator(mode="before")
    @classmethod
    def _hide_url_password(cls, data: Any) -> Any:
        # a password in the URL is refused below; replaced first so no error message can echo it
        if isinstance(data, dict) and isinstance(data.get("url"), str):
            return {**data, "url": re.sub(r"^([a-zA-Z]+://[^/@:]*):[^/@]*@", r"\1:***@", data["url"])}
        return data

    @field_validator("ae_title", "host", "port")
    @classmethod
    def _needed_by_dimse(cls, value: object, info: ValidationInfo) -> object:
        protocol = info.data.get("protocol")
        if value is None and (protocol == "dimse" or (protocol == "hl7" and info.field_name != "ae_title")):
            raise ValueError(f"a {protocol} destination needs {info.field_name}")
        return value

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", value):
            raise ValueError("expected the service's base URL, http(s)://host[:port]/path, with no query")
        if "@" in value.split("/")[2]:
            raise ValueError("no user or password in the URL: use auth: basic, username and password_file")
        return value.rstrip("/")

    @property
    def sends(self) -> Literal["positive", "all"]:
        """Which results a triage destination gets (``send``, positive by default)."""
        return self.send or "positive"

    @property
    def triage_kind(self) -> str | None:
        """The delivery kind of a triage destination (``oru`` for hl7, ``fhir``); None for a DICOM one."""
        return self.TRIAGE_KINDS.get(self.protocol)

    @model_validator(mode="after")
    def _protocol_keys(self) -> Destination:
        hl7_only = [key for key in ("receiving_application", "receiving_facility") if getattr(self, key)]
        if hl7_only and self.protocol != "hl7":
            raise ValueError(f"{', '.join(hl7_only)}: only for protocol: hl7")
        if self.send is not None and self.triage_kind is None:
            raise ValueError("send: only for protocol: hl7 or fhir (a DICOM destination gets every output)")
        if self.protocol in ("dimse", "hl7"):
            extra = [key for key in ("url", "username", "password_file", "token_file") if getattr(self, key)]
            if extra or self.auth != "none":
                raise ValueError(f"{', '.join(extra) or 'auth'}: only for protocol: dicomweb or fhir")
            if self.protocol == "hl7" and self.ae_title is not None:
                raise ValueError("ae_title: only for protocol: dimse (hl7 names the RIS by receiving_application)")
            if (self.cert_file is None) != (self.key_file is None):
                raise ValueError("cert_file and key_file go together (the node's client certificate)")
            return self
        return self._dicomweb_keys()

    def _dicomweb_keys(self) -> Destination:
        if self.url is None:
            example = "http://pacs:8042/dicom-web" if self.protocol == "dicomweb" else "https://ris.example/fhir"
            raise ValueError(f"protocol: {self.protocol} needs url (the base URL, e.g. {example})")
        if self.protocol == "fhir" and (self.ae_title or self.host or self.port is not None):
            raise ValueError(f"ae_title, host and port: not for protocol: {self.protocol} (it uses url)")
        if self.tls:
            raise ValueError(f"tls: a {self.protocol} destination is encrypted by an https url, not tls: true")
        if (self.ca_file or self.cert_file or self.key_file) and not self.url.startswith("https://"):
            raise ValueError("ca_file, cert_file and key_file need an https url")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (the node's client certificate)")
        needs = {"none": (), "basic": ("username", "password_file"), "bearer": ("token_file",)}[self.auth]
        missing = [key for key in needs if getattr(self, key) is None]
        unused = [k for k in ("username", "password_file", "token_file") if k not in needs and getattr(self, k)]
        if missing or unused:
            wrong = f"needs {', '.join(missing)}" if missing else f"does not use {', '.join(unused)}"
            raise ValueError(f"auth: {self.auth} {wrong}")
        return self


class DeliverySettings(_Section):
    """How results are sent to the destinations: retries with backoff, give-up limits, probing."""

    calling_ae_title: AETitle = "CXR_NODE"
    poll_interval_ms: int = Field(default=500, ge=50, le=60000)
    jobs_per_association: int = Field(default=20, ge=1, le=1000)
    backoff_initial_s: float = Field(default=5.0, gt=0)
    backoff_max_s: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    max_age_hours: float = Field(default=72.0, gt=0)
    probe_interval_s: float = Field(default=300.0, ge=5)
    timeout_s: float = Field(default=30.0, gt=0)
    lease_s: float = Field(default=300.0, ge=10)


class MetricsSettings(_Section):
    """The Prometheus endpoint (/metrics) and the health check (/healthz)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 9464
    stuck_after_s: float = Field(default=600.0, gt=0)


class CandidateSettings(_Section):
    """A candidate model run beside the configured one on the same images (model change control,
    docs/calibration.md): its results are recorded apart, it writes no outputs, and ``cxr-node compare`` reports
    how it differs. ``calibration``: its own site calibration (``cxr-node calibrate --manifest``)."""

    manifest: Path
    calibration: Path | None = None


class ModelSettings(_Section):
    """Which model manifest the worker loads, the site calibration whose operating point replaces the
    manifest's threshold (``cxr-node calibrate``, docs/calibration.md; None: the manifest's threshold), and the
    candidates run beside it in shadow (none by default)."""

    manifest: Path = Path("models/demo/manifest.yaml")
    calibration: Path | None = None
    candidates: tuple[CandidateSettings, ...] = Field(default=(), max_length=4)

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, value: tuple[CandidateSettings, ...], info: ValidationInfo) -> tuple[CandidateSettings, ...]:
        manifests = [candidate.manifest for candidate in value]
        if len(set(manifests)) != len(manifests):
            raise ValueError("a candidate manifest is listed twice")
        if info.data.get("manifest") in manifests:
            raise ValueError("the configured manifest cannot also be a candidate")
        return value


class ComputeSettings(_Section):
    """Where inference runs, and at what precision when that is the CPU."""

    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # auto: bf16 autocast only for a manifest with classifier.cpu_bf16 on a CPU with AMX-BF16, else fp32
    # (cxr_node.infer.device.resolve_cpu_precision)
    cpu_precision: Literal["auto", "bf16", "fp32"] = "auto"


class WorkerSettings(_Section):
    """How the inference worker takes jobs from the queue."""

    batch_size: int = Field(default=8, ge=1, le=256)
    batch_wait_ms: int = Field(default=0, ge=0, le=60000)
    cpu_processes: Literal["auto"] | Annotated[int, Field(ge=0, le=64)] = "auto"
    poll_interval_ms: int = Field(default=250, ge=10, le=60000)
    max_side: int = Field(default=1024, ge=256, le=8192)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    channels_last: bool = True
    max_attempts: int = Field(default=3, ge=1, le=100)
    lease_s: float = Field(default=60.0, ge=5, le=3600)


class SeriesNumbers(_Section):
    """A fixed Series Number per output kind (viewers such as OHIF match SR thumbnails by it)."""

    sr: int = Field(default=9901, ge=1, le=2147483647)
    sc: int = Field(default=9902, ge=1, le=2147483647)
    seg: int = Field(default=9903, ge=1, le=2147483647)
    pr: int = Field(default=9904, ge=1, le=2147483647)


class ResultsSettings(_Section):
    """Which DICOM outputs are written for each analysed image, and how their series are named."""

    structured_report: bool = True
    secondary_capture: bool = True
    segmentation: bool = False
    presentation_state: bool = False
    not_analysed_report: bool = True
    series_description: str = Field(default="AI CXR analysis", pattern=r"^AI", max_length=40)
    series_numbers: SeriesNumbers = SeriesNumbers()
    institution_name: str = Field(default="", max_length=64)


class NeighbourSettings(_Section):
    """The nearest past cases named in the outputs (the paper's retrieval tool)."""

    k: int = Field(default=5, ge=0, le=50)
    identifiers: Literal["uids", "case_number"] = "uids"
    library_only: bool = False


class DomainSettings(_Section):
    """The out-of-domain gate: what happens to an image unlike those the model was validated on (docs/domain.md).

    ``refuse``: not analysed, with the score and the bound as the reason; ``flag``: analysed, and the outputs say
    it is outside the validated domain; ``off``: not checked. A model without a domain description is never
    checked (the worker warns at start-up). ``pass_rate`` overrides the description's own calibration: the share
    of the model's validation images that pass.
    """

    gate: Literal["refuse", "flag", "off"] = "refuse"
    pass_rate: float | None = Field(default=None, gt=0.0, le=1.0)


class GoLiveSettings(_Section):
    """Staged go-live (docs/operations.md): the mode a model version starts in when the jobs store has no record
    of it yet. ``shadow``: outputs go to QA destinations only; ``supervised``: to every destination, marked for QA
    review; ``live``: as they are. Going live is an operator's step (``cxr-node mode set live``), never this key."""

    initial_mode: Literal["shadow", "supervised"] = "supervised"


class StowSettings(_Section):
    """DICOMweb in: the optional STOW-RS endpoint (``POST {base_path}/studies[/{study}]``) of the receivers, with
    the SCP's checks, bounds and durability (docs/dicomweb.md). Off by default; loopback by default."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 8080
    base_path: str = Field(default="/dicomweb", pattern=r"^(/[A-Za-z0-9._~-]+)*$", max_length=200)
    tls: TLSSettings = TLSSettings()
    token_file: Path | None = None  # bearer token, first line, at least 16 characters; mode 0600
    allowed_ips: Networks = []
    max_body_mb: float = Field(default=1024.0, gt=0)
    max_instances: int = Field(default=1000, ge=1, le=100_000)
    max_connections: int = Field(default=32, ge=1, le=4096)
    max_connections_per_peer: int = Field(default=8, ge=1, le=4096)
    header_timeout_s: float = Field(default=10.0, gt=0)  # TLS handshake, request line and headers
    idle_timeout_s: float = Field(default=30.0, gt=0)  # most silence while the body arrives
    request_timeout_s: float = Field(default=600.0, gt=0)  # the whole body

    @model_validator(mode="after")
    def _authenticated_off_loopback(self) -> StowSettings:
        if self.enabled and not _loopback(self.host) and self.token_file is None and not self.tls.require_client_cert:
            raise ValueError("stow.host is not a loopback address: set stow.token_file or stow.tls.require_client_cert")
        return self

    @property
    def max_body_bytes(self) -> int:
        """The largest request body accepted, in bytes."""
        return int(self.max_body_mb * 1024 * 1024)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class MonitoringSettings(_Section):
    """Performance over time (docs/monitoring.md): the sender's monitoring job recomputes the figures of
    ``cxr-node report`` over a rolling window every ``interval_minutes``, sets the ``cxr_node_monitor_*`` gauges and
    raises an alarm (the ``monitor.alarm`` event and ``cxr_node_monitor_alarm{check}``) when the scores drift from
    the reference or a metric's whole confidence interval lies beyond its bound.

    The reference distribution of the scores is the window ``baseline_since``..``baseline_until`` (dates, UTC; both
    or neither), else the first ``baseline_days`` days of the data in the store. ``model`` (``name/version``) is the
    model judged; None: the one with the most results in the window. A bound of 0 (the ``min_*`` keys) or 1 (the
    ``max_*_rate`` keys) turns its check off.
    """

    enabled: bool = True
    interval_minutes: float = Field(default=60.0, ge=1.0, le=1440.0)
    window_days: float = Field(default=28.0, gt=0.0, le=3660.0)
    model: str | None = Field(default=None, pattern=r"^[^/\s]+/[^/\s]+$")
    baseline_since: date | None = None
    baseline_until: date | None = None
    baseline_days: float = Field(default=28.0, gt=0.0, le=3660.0)
    bins: int = Field(default=10, ge=2, le=100)
    resamples: int = Field(default=500, ge=10, le=100_000)
    min_images: int = Field(default=50, ge=1)
    min_reference_images: int = Field(default=100, ge=1)
    min_labelled_cases: int = Field(default=30, ge=1)
    psi_max: float = Field(default=0.25, gt=0.0)
    ks_max: float = Field(default=0.2, gt=0.0, le=1.0)
    min_sensitivity: float = Field(default=0.8, ge=0.0, le=1.0)
    min_specificity: float = Field(default=0.5, ge=0.0, le=1.0)
    min_auc: float = Field(default=0.7, ge=0.0, le=1.0)
    max_out_of_domain_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    max_not_analysed_rate: float = Field(default=0.2, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _baseline_pair(self) -> MonitoringSettings:
        if (self.baseline_since is None) != (self.baseline_until is None):
            raise ValueError("monitoring.baseline_since and baseline_until go together: give both or neither")
        since, until = self.baseline_since, self.baseline_until
        if since is not None and until is not None and until <= since:
            raise ValueError("monitoring.baseline_until must be after baseline_since")
        return self


class OutcomeSettings(_Section):
    """Ground truth in (docs/outcomes.md): the file mapping the sites' coded values and words to positive,
    negative and not assessable."""

    mapping: Path | None = None


class Hl7InSettings(_Section):
    """HL7 v2 in: the optional ORU^R01 listener over MLLP in the receivers (docs/outcomes.md), acknowledging a
    message only after its findings are committed. Off by default; loopback by default."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 2575
    allowed_ips: Networks = []
    tls: TLSSettings = TLSSettings()
    max_message_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    max_connections: int = Field(default=16, ge=1, le=4096)
    max_connections_per_peer: int = Field(default=4, ge=1, le=4096)
    timeout_s: float = Field(default=30.0, gt=0)  # most silence on a connection, and the TLS handshake
    message_timeout_s: float = Field(default=60.0, gt=0)  # one message, from its first byte to its last
    accession_fields: list[Annotated[str, Field(pattern=r"^(OBR|ORC)-[0-9]{1,2}$")]] = Field(
        default=["OBR-3", "OBR-2", "ORC-3", "ORC-2"], min_length=1
    )

    @model_validator(mode="after")
    def _restricted_off_loopback(self) -> Hl7InSettings:
        if self.enabled and not _loopback(self.host) and not self.allowed_ips and not self.tls.require_client_cert:
            raise ValueError("hl7_in.host is not a loopback address: set hl7_in.allowed_ips or tls.require_client_cert")
        return self


class LoggingSettings(_Section):
    """Log level and rendering (JSON for journald, console for a terminal)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class Settings(_Section):
    """Everything the node is configured with; built once by :func:`load_settings`."""

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    triage: TriageSettings = TriageSettings()
    destinations: list[Destination] = []
    delivery: DeliverySettings = DeliverySettings()
    models: ModelSettings = ModelSettings()
    compute: ComputeSettings = ComputeSettings()
    worker: WorkerSettings = WorkerSettings()
    results: ResultsSettings = ResultsSettings()
    neighbours: NeighbourSettings = NeighbourSettings()
    domain: DomainSettings = DomainSettings()
    golive: GoLiveSettings = GoLiveSettings()
    metrics: MetricsSettings = MetricsSettings()
    stow: StowSettings = StowSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    outcomes: OutcomeSettings = OutcomeSettings()
    hl7_in: Hl7InSettings = Hl7InSettings()
    logging: LoggingSettings = LoggingSettings()
    source: str = Field(default="<defaults>", exclude=True)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """Return a copy with dotted-key ``overrides`` (e.g. ``{"node.port": 0}``) applied and validated."""
        data = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            _set_dotted(data, dotted.split("."), value)
        return _validate(data, self.source)


SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def systemd_environment() -> dict[str, str]:
    """The variables systemd passes a ``Type=notify`` service (for :mod:`cxr_node.notify`)."""
    return {name: os.environ[name] for name in SYSTEMD_VARIABLES if name in os.environ}


def export_metrics_dir(folder: Path) -> None:
    """Point this process's future children at ``folder`` for prometheus_client's multiprocess metrics."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def config_path(explicit: str | Path | None = None) -> Path:
    """Return the config file to read: ``explicit``, else ``$CXR_NODE_CONFIG``, else config/node.yaml."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(ENV_CONFIG, DEFAULT_CONFIG_PATH))


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load, merge and validate the configuration.

    Parameters
    ----------
    path : str or Path, optional
        The YAML file; see :func:`config_path` for the default.
    environ : mapping, optional
        The environment to read overrides from (``os.environ`` when omitted).

    Raises
    ------
    ConfigError
        In one line naming the file, the key and what is wrong.
    """
    file = config_path(path)
    data = _read_yaml(file)
    env = os.environ if environ is None else environ
    from_env: dict[str, str] = {}
    for name, raw in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and name != ENV_CONFIG and "__" in name:
            keys = name[len(ENV_PREFIX) :].lower().split("__")
            _set_dotted(data, keys, _parse_env_value(name, raw))
            from_env[".".join(keys)] = name
    return _validate(data, str(file), from_env)


def _read_yaml(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found (pass --config FILE or set {ENV_CONFIG})") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{file}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections, found {type(data).__name__}")
    return data


def _parse_env_value(name: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        raise ConfigError(f"environment variable {name}: value {raw!r} is not valid YAML") from None


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _validate(data: dict[str, Any], source: str, from_env: Mapping[str, str] | None = None) -> Settings:
    try:
        return Settings.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, from_env or {})) from None


_SECRET_KEYS = frozenset({"storage.database"})


def _describe(exc: ValidationError, source: str, from_env: Mapping[str, str]) -> str:
    first = exc.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<top level>"
    if key in from_env:
        source = f"environment variable {from_env[key]} (over {source})"
    if first["type"] == "extra_forbidden":
        what = "unknown key"
    elif key in _SECRET_KEYS:  # it may hold a password: never echoed to a terminal or a log
        what = first["msg"]
    else:
        what = f"{first['msg']} (found {first['input']!r})" if "input" in first else first["msg"]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{source}: {key}: {what}{more}"
