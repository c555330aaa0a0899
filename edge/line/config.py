"""Station configuration: one YAML file, validated at start, every error naming the key and what is allowed.

    station: {line: line-1, name: station-1, mm_per_pixel: 0.05}
    pack: ../packs/default                  # relative paths are relative to this file's folder
    state: ../stations/station-1/state
    source: {kind: usb, device: 0}          # usb | rtsp | file | folder | gstreamer | synthetic
    trigger: {mode: free_run}               # free_run | mqtt | interval
    mqtt: {host: localhost, port: 1883}
    storage: {dir: ../var/station-1, retention_days: 30, disk_budget_mb: 2048}

The examples in `configs/` document every key. What SIGHUP (or the `reload` command) applies without a
restart is edge.line.config_reload's; the `source:` models are edge.line.source_specs', the `roi:` and
`tiling:` models the scoring's own (edge.scoring.roi.RoiSpec, edge.scoring.tiling.TilingSpec).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, StrictInt, ValidationError, field_validator, model_validator

from edge.errors import EdgeError
from edge.line.plc.spec import PlcSpec, SparkplugSpec
from edge.line.source_specs import SOURCE_KINDS, SourceSpec
from edge.scoring.frozen_spec import FrozenSpec, problem
from edge.scoring.roi import RoiSpec
from edge.scoring.tiling import TilingSpec

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # safe in MQTT topics and file names


class ConfigError(EdgeError):
    """The station configuration file is missing, not YAML, or has a key with a wrong value."""


class StationSpec(FrozenSpec):
    line: str = Field(default="line-1", pattern=NAME_PATTERN)
    name: str = Field(default="station-1", pattern=NAME_PATTERN)
    # Frame pixels -> millimetres on the part, for region sizes in mm (null: pixels only).
    mm_per_pixel: float | None = Field(default=None, gt=0)


class TriggerSpec(FrozenSpec):
    # free_run: every frame is a part. mqtt: a part per trigger command (part id from the PLC).
    # interval: a part every interval_s seconds.
    mode: Literal["free_run", "mqtt", "interval"] = "free_run"
    interval_s: float = Field(default=1.0, gt=0)


class PipelineSpec(FrozenSpec):
    capture_queue: int = Field(default=4, ge=1, le=1024)
    output_queue: int = Field(default=64, ge=1, le=100000)
    batch_size: int = Field(default=1, ge=1, le=64)


class GpuSpec(FrozenSpec):
    """The encoder's backend and how GPU engines are built and run (edge.inference.backend.GpuOptions)."""

    # auto: the pack's TensorRT engine where it runs here, else ONNX Runtime (TensorRT/CUDA providers
    # where installed, else CPU).
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    # The TensorRT builder's workspace limit (export engine --config, ORT's TensorRT provider): on Jetson
    # the builder otherwise takes the shared memory that the station and the LLM need.
    workspace_mb: StrictInt = Field(default=1024, ge=16, le=65536)
    fp16: bool = True
    engine_cache: Path | None = None  # ONNX Runtime's TensorRT engines (default ~/.cache/anomaly-edge/ort-trt)
    # A state calibrated with another backend or precision than the station runs: refuse to start, or
    # recalibrate (re-enroll the stored references with the running backend, which rebuilds bank and threshold).
    on_calibration_mismatch: Literal["refuse", "recalibrate"] = "refuse"
    # On ONNX Runtime's CPU: score a bank station with the one station graph (edge.scoring.station_graph:
    # preprocess to score in one ONNX Runtime run) or the NumPy path; docs/benchmarks.md has both.
    cpu_scoring: Literal["numpy", "station_graph"] = "station_graph"

    def options(self):
        from edge.inference.backend import GpuOptions

        extra = {"engine_cache": self.engine_cache} if self.engine_cache is not None else {}
        return GpuOptions(workspace_mb=self.workspace_mb, fp16=self.fp16, **extra)


class TlsSpec(FrozenSpec):
    ca: Path
    cert: Path | None = None
    key: Path | None = None


class HeatmapSpec(FrozenSpec):
    # inline: JPEG overlay in the flagged message (base64); path: only its stored path; none.
    mode: Literal["inline", "path", "none"] = "inline"
    max_bytes: int = Field(default=65536, ge=1024, le=10_000_000)


class MqttSpec(FrozenSpec):
    enabled: bool = True
    host: str = "localhost"
    port: StrictInt = Field(default=1883, ge=1, le=65535)  # strict: `true` is not port 1
    # Topics are <topic_prefix>/result, /flagged, ...; default anomaly-edge/<line>/<station>.
    topic_prefix: str | None = Field(default=None, pattern=r"^[^#+\s]+$")
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None  # preferred over `password` in files others can read
    tls: TlsSpec | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    heatmap: HeatmapSpec = HeatmapSpec()
    sparkplug: SparkplugSpec = SparkplugSpec()  # a Sparkplug B edge node beside the JSON topics

    @model_validator(mode="after")
    def _one_password(self):
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        return self


class StorageSpec(FrozenSpec):
    dir: Path = Path("var")
    # Which parts keep image files (every part keeps its row): flagged, all or none.
    keep_images: Literal["flagged", "all", "none"] = "flagged"
    retention_days: float = Field(default=30, gt=0)
    disk_budget_mb: float = Field(default=2048, gt=0)  # image files plus the databases and their WAL files
    # Free-space floor of the storage file system: below it no image is written and the oldest go;
    # when that is not enough, new parts are refused (recorded and published as errors) until space returns.
    min_free_mb: float = Field(default=100, ge=0)
    # A part whose row cannot be written because the database is locked (another process holds it, a
    # slow disk) is retried from memory for this long before it is recorded as an error.
    write_retry_s: float = Field(default=120, ge=0)


class ApiSpec(FrozenSpec):
    enabled: bool = True
    socket: Path | None = None  # default <storage.dir>/api.sock
    mode: str = Field(default="0660", pattern=r"^0?[0-7]{3}$")
    group: str | None = None
    tcp_port: StrictInt | None = Field(default=None, ge=1, le=65535)  # also listen on this port
    tcp_host: str = "127.0.0.1"
    # The TCP listener answers only requests with "Authorization: Bearer <the token in this file>".
    token_file: Path | None = None
    read_timeout_s: float = Field(default=10, gt=0, le=3600)  # a client that sends nothing this long is dropped

    @model_validator(mode="after")
    def _tcp_needs_token(self):
        if self.tcp_port is not None and self.token_file is None:
            raise ValueError("tcp_port needs token_file (a file holding the token every TCP request must carry)")
        return self


class RemoteExplainSpec(FrozenSpec):
    # An OpenAI-compatible server (llama.cpp's or llama-cpp-python's server, vLLM): POST
    # <url>/v1/chat/completions, streamed (a url ending in /chat/completions is used as it is).
    url: str = Field(pattern=r"^https?://")
    model: str = "default"
    api_key_file: Path | None = None  # sent as "Authorization: Bearer <key>"; read at every request
    time_limit_s: float = Field(default=30, gt=0)  # per attempt, connection to the last token
    retries: int = Field(default=2, ge=0, le=10)   # more attempts per answer, with backoff 0.5, 1, 2 s
    fallback_local: bool = False  # also load the pack's LLM locally and answer there when the server fails


class ExplainSpec(FrozenSpec):
    enabled: bool = True  # used when the pack has an llm section (or backend is remote)
    backend: Literal["local", "remote"] = "local"
    remote: RemoteExplainSpec | None = None
    queue_size: int = Field(default=4, ge=1, le=1000)
    threads: int = Field(default=1, ge=1, le=64)
    max_tokens: int = Field(default=96, ge=1, le=4096)
    time_limit_s: float = Field(default=30, gt=0)
    # The LLM runs in a supervised child process. A part whose explanation was lost to a crash or hang
    # of it is tried this many times in all, then marked failed; after max_crashes failures in a row
    # explanations turn off (health says why) until the service restarts.
    max_attempts: int = Field(default=2, ge=1, le=10)
    max_crashes: int = Field(default=4, ge=1, le=100)

    @model_validator(mode="after")
    def _remote_needs_its_section(self):
        if self.backend == "remote" and self.remote is None:
            raise ValueError("backend is remote but there is no explain.remote section (url, model, ...)")
        return self


class LearnSpec(FrozenSpec):
    # Learn mode: a station started with no state yet (no state.yaml in `state`) builds its references
    # and threshold from its first `parts` parts, assuming most of them are good; parts that look
    # unusual among them are set aside (listed on P/reply). Until then each part's result is `learning`.
    # refine: a station that does have a state, enrolled from fewer than `parts` good references and not
    # refined yet, scores and decides every part as usual while it keeps the next `parts` of them, then adds
    # those that mutual scoring does not set aside to its references and recalibrates (once per state).
    parts: StrictInt = Field(ge=8, le=5000)
    suspect_z: float = Field(default=3.0, gt=0, le=20)
    refine: bool = False


class HealthSpec(FrozenSpec):
    status_interval_s: float = Field(default=10, gt=0)


class StationConfig(FrozenSpec):
    station: StationSpec = StationSpec()
    pack: Path
    state: Path
    # Which of the state's scorers runs: auto = edge.scoring.student.DEFAULT_SCORER when the state holds a
    # student (chosen by measurement, docs/evaluation.md), else the memory bank.
    scorer: Literal["auto", "bank", "student"] = "auto"
    # scorer: student with a student whose training did not complete (stopped by the time budget) is
    # refused at start and reload unless this is true; auto never picks such a student.
    student_allow_undertrained: bool = False
    # False-reject rate the automatic threshold aims at when the line re-enrolls (enroll-good); null
    # keeps what the state was calibrated for.
    target_false_reject: float | None = Field(default=None, gt=0, lt=0.5)
    source: SourceSpec
    trigger: TriggerSpec = TriggerSpec()
    pipeline: PipelineSpec = PipelineSpec()
    gpu: GpuSpec = GpuSpec()
    mqtt: MqttSpec = MqttSpec()
    storage: StorageSpec = StorageSpec()
    api: ApiSpec = ApiSpec()
    explain: ExplainSpec = ExplainSpec()
    health: HealthSpec = HealthSpec()
    learn: LearnSpec | None = None  # learn mode when the station has no state yet; refine when it has a few
    plc: PlcSpec = PlcSpec()  # OPC UA inspection handshake (edge.line.plc)
    # Where the part is in the frame (edge.scoring.roi); used by tiled scoring, so it needs a tiling: section.
    roi: RoiSpec | None = None
    # High-resolution frames: score the ROI tile by tile (edge.scoring.tiling); its roi is the section above.
    tiling: TilingSpec | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("pack", "state")
    @classmethod
    def _not_empty(cls, v: Path) -> Path:
        if str(v) in ("", "."):
            raise ValueError("must name a folder")
        return v

    @field_validator("tiling", mode="before")
    @classmethod
    def _roi_is_its_own_section(cls, v):
        if isinstance(v, dict) and "roi" in v:
            raise ValueError("roi is a top-level section of its own (roi: {kind: ...}), not a key of tiling")
        return v

    @model_validator(mode="after")
    def _roi_needs_tiling(self):
        if self.roi is not None and self.tiling is None:
            raise ValueError("roi is used by tiled scoring: add a tiling: section (tiling.scale)")
        return self

    @model_validator(mode="after")
    def _plc_needs_triggers(self):
        if (self.plc.opcua.enabled or self.plc.modbus.enabled) and self.trigger.mode != "mqtt":
            raise ValueError(f"plc: the PLC handshake inspects a part per trigger: set trigger.mode: mqtt "
                             f"(it is {self.trigger.mode})")
        return self

    def tiling_spec(self) -> TilingSpec | None:
        """The TilingSpec the station scores with, its roi from the roi: section (None: whole-frame scoring)."""
        if self.tiling is None or self.roi is None:
            return self.tiling
        return self.tiling.model_copy(update={"roi": self.roi})

    @property
    def topic_prefix(self) -> str:
        return self.mqtt.topic_prefix or f"anomaly-edge/{self.station.line}/{self.station.name}"

    @property
    def api_socket(self) -> Path:
        return self.api.socket or self.storage.dir / "api.sock"


def _resolve_paths(raw: dict, base: Path) -> dict:
    """Relative paths in the file are relative to the file's folder (what a service unit expects)."""
    def fix(value):
        if isinstance(value, str) and value and not Path(value).is_absolute() and "://" not in value:
            return str(base / value)
        return value

    for key in ("pack", "state"):
        if key in raw:
            raw[key] = fix(raw[key])
    for section, keys in (("source", ("path",)), ("storage", ("dir",)), ("api", ("socket", "token_file")),
                          ("mqtt", ("password_file",))):
        if isinstance(raw.get(section), dict):
            for k in keys:
                if k in raw[section]:
                    raw[section][k] = fix(raw[section][k])
    remote = raw.get("explain", {}).get("remote") if isinstance(raw.get("explain"), dict) else None
    if isinstance(remote, dict) and "api_key_file" in remote:
        remote["api_key_file"] = fix(remote["api_key_file"])
    tls = raw.get("mqtt", {}).get("tls") if isinstance(raw.get("mqtt"), dict) else None
    if isinstance(tls, dict):
        for k in ("ca", "cert", "key"):
            if k in tls:
                tls[k] = fix(tls[k])
    opcua = raw.get("plc", {}).get("opcua") if isinstance(raw.get("plc"), dict) else None
    for user in opcua.get("users") or [] if isinstance(opcua, dict) else []:
        if isinstance(user, dict) and "password_file" in user:
            user["password_file"] = fix(user["password_file"])
    for k in ("certificate", "private_key") if isinstance(opcua, dict) else ():
        if k in opcua:
            opcua[k] = fix(opcua[k])
    return raw


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid station configuration"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # Discriminated unions put the chosen kind in the path (source.usb.device): drop it.
        if len(loc) > 1 and loc[0] == "source" and loc[1] in SOURCE_KINDS:
            loc.pop(1)
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against configs/*.yaml)"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown kind {e['input'].get('kind')!r}; allowed: {', '.join(SOURCE_KINDS)}"
        elif e["type"] == "union_tag_not_found":
            msg = f"missing 'kind' ({', '.join(SOURCE_KINDS[:-1])} or {SOURCE_KINDS[-1]})"
        elif e["type"] in ("path_type", "path_not_file", "path_not_directory"):
            msg = f"expected a file or folder path, got {e['input']!r}"
        elif e["type"] == "string_pattern_mismatch" and e.get("ctx", {}).get("pattern") == NAME_PATTERN:
            msg = f"{e['input']!r} is not allowed here (letters, digits, '.', '_', '-'; at most 64)"
        else:  # worded as on every road a spec comes in by (state.yaml, the CLI)
            msg = problem(e)
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_config(raw, path: Path, check_files: bool = True) -> StationConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    try:
        config = StationConfig.model_validate(_resolve_paths(dict(raw), path.parent.resolve()))
    except ValidationError as e:
        raise ConfigError(_format_error(path, e)) from None
    for f in [] if not check_files else [config.mqtt.password_file] + ([config.mqtt.tls.ca, config.mqtt.tls.cert, config.mqtt.tls.key]
                                             if config.mqtt.tls else []):
        if f is not None and not Path(f).is_file():
            raise ConfigError(f"{path}: mqtt: file {f} does not exist")
    for user in config.plc.opcua.users if check_files else []:
        if user.password_file is not None and not Path(user.password_file).is_file():
            raise ConfigError(f"{path}: plc.opcua.users: {user.name}: password_file {user.password_file} does not exist")
    for f in (config.plc.opcua.certificate, config.plc.opcua.private_key) if check_files else ():
        if f is not None and not Path(f).is_file():
            raise ConfigError(f"{path}: plc.opcua: file {f} does not exist")
    return config


def load_config(path: str | Path) -> StationConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: station configuration file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return parse_config(raw, path)


def mqtt_password(config: StationConfig) -> str | None:
    if config.mqtt.password_file is not None:
        return Path(config.mqtt.password_file).read_text().strip()
    return config.mqtt.password


PART_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
