"""The service's one configuration object, built once at start-up and passed down.

Every field can be set from the environment (prefix ``LOUVER_``, e.g. ``LOUVER_PORT=0``) or from
the command line (``louver-server --port 0``); nothing else in the service reads the environment.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from louver_kernels.config import IndexConfig, IndexKind
from louver_kernels.threshold import Dense, Fixed, Mass, Policy, Relative, TopK

if TYPE_CHECKING:
    from louver_service.warmup import WarmupShape

_INDEX = IndexConfig()  # the kernels' defaults are the server's defaults

GiB = 1 << 30
MiB = 1 << 20
CPU_MEMORY_BUDGET_BYTES = 4 * GiB


def parse_policy(text: str) -> Policy:
    """Parse a policy spec: ``relative:EPS``, ``topk:K``, ``mass:DELTA``, ``fixed:TAU`` or
    ``dense``. Raises ValueError when the spec or its parameter is invalid."""
    name, _, arg = text.strip().partition(":")
    name = name.strip().lower()
    try:
        if name == "dense" and not arg:
            return Dense()
        if name == "relative":
            return Relative(float(arg))
        if name == "mass":
            return Mass(float(arg))
        if name == "topk":
            return TopK(int(arg))
        if name == "fixed":
            return Fixed(float(arg))
    except ValueError as exc:
        raise ValueError(f"invalid policy {text!r}: {exc}") from None
    raise ValueError(f"invalid policy {text!r}; expected relative:EPS, topk:K, mass:DELTA, "
                     "fixed:TAU or dense")


class Settings(BaseSettings):
    """Server configuration (immutable). See each field's description."""

    model_config = SettingsConfigDict(env_prefix="LOUVER_", frozen=True, extra="forbid")

    host: str = Field(default="127.0.0.1", description="address the gRPC server binds")
    port: int = Field(default=50051, ge=0, le=65535,
                      description="gRPC port; 0 picks a free port")
    metrics_host: str = Field(default="127.0.0.1",
                              description="address of the Prometheus endpoint")
    metrics_port: int = Field(default=9400, ge=-1, le=65535,
                              description="Prometheus HTTP port; 0 picks a free port, -1 disables")
    device: str = Field(default="auto",
                        description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N'")
    memory_budget_bytes: int | None = Field(
        default=None, ge=0, description="bytes of K/V + index the sessions may hold; unset: "
                                        "memory_fraction of the GPU's memory, or 4 GiB on the CPU")
    memory_fraction: float = Field(default=0.8, gt=0.0, le=1.0,
                                   description="share of GPU memory used when no budget is set")
    max_sessions: int = Field(default=4096, ge=1, description="sessions held at once")
    session_ttl_s: float = Field(default=3600.0, ge=0.0,
                                 description="idle seconds before a session is evicted; 0: never")
    eviction_interval_s: float = Field(default=10.0, gt=0.0,
                                       description="seconds between idle-eviction sweeps")
    max_message_bytes: int = Field(default=256 * MiB, ge=1024,
                                   description="largest gRPC message sent or received")
    drain_timeout_s: float = Field(default=30.0, ge=0.0,
                                   description="seconds in-flight RPCs get to finish on shutdown")
    inline_max_keys: int = Field(default=1 << 16, ge=0,
                                 description="attention over at most this many keys per call "
                                             "runs on the event loop; larger runs in a thread")
    compute_threads: int = Field(default=2, ge=1, description="worker threads for index builds "
                                                              "and large attention calls")
    index_kind: IndexKind = Field(default=_INDEX.kind, description="default index kind")
    index_num_subspaces: int = Field(default=_INDEX.num_subspaces, ge=1,
                                     description="default BALLS subspaces")
    index_cluster_size: int = Field(default=_INDEX.cluster_size, ge=1,
                                    description="default BALLS keys per cluster")
    index_buffer_size: int = Field(default=_INDEX.buffer_size, ge=1,
                                   description="default recent-token buffer (and QUANT segment)")
    index_quant_bits: int = Field(default=_INDEX.quant_bits, ge=2, le=8,
                                  description="default QUANT bits per channel")
    index_quant_coarse_bits: int = Field(default=_INDEX.quant_coarse_bits or 4, ge=1, le=8,
                                         description="default QUANT code bits of the first pass")
    index_quant_group: int = Field(default=_INDEX.quant_group, ge=1,
                                   description="default QUANT channels per residual group")
    index_backend: Literal["auto", "torch", "triton"] = Field(
        default="auto",
        description="decode step of QUANT sessions: triton (the GPU kernels, replayed from a "
                    "CUDA graph per layer and policy; on a CPU only under TRITON_INTERPRET=1, "
                    "for testing; needs index_kind quant, and sessions that ask for another "
                    "kind run on torch), torch (plain torch) or auto (triton on CUDA GPUs of "
                    "compute capability >= 9.0 for the sessions the kernels implement, torch "
                    "elsewhere)")
    dense_fallback: bool = Field(
        default=True,
        description="triton backend, relative policies: also capture each layer's dense step "
                    "and run whichever of the two measures faster (timed on 2 calls of every "
                    "64); the dense step attends every key, a superset of the policy's keys "
                    "(its answers report every key attended and tau -inf)")
    kernel_pdl: bool = Field(
        default=True,
        description="triton backend on GPUs of compute capability >= 9.0: programmatic "
                    "dependent launch between a decode step's kernels (each may start while "
                    "the one before finishes; it hides ~1-2 us of launch latency per kernel). "
                    "Applies to the whole process. Turn it off where the driver cannot record "
                    "it in CUDA graphs (older than CUDA 12.3)")
    default_policy: str = Field(default="relative:1e-4",
                                description="policy used when neither the call nor the session "
                                            "names one: relative:EPS, topk:K, mass:DELTA, "
                                            "fixed:TAU or dense")
    auth_tokens: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), repr=False,
        description="accepted bearer tokens (comma-separated); empty: no authentication")
    warmup_shapes: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="model shapes whose decode path runs once before the server listens, "
                    "comma-separated HQ/HKV/D[:DTYPE] (dtype float16, the default, bfloat16 "
                    "or float32), e.g. 9/3/64:bfloat16: on a GPU the kernels compile then "
                    "(seconds per shape with an empty Triton cache) instead of during the "
                    "first session's first steps")
    log_level: str = Field(default="INFO", description="logging level")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except RuntimeError as exc:
                raise ValueError(f"invalid device {value!r}: {exc}") from None
        return value

    @field_validator("default_policy")
    @classmethod
    def _check_policy(cls, value: str) -> str:
        parse_policy(value)
        return value

    @field_validator("auth_tokens", "warmup_shapes", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """A comma-separated string (the environment, the command line) as a tuple."""
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value

    @field_validator("warmup_shapes")
    @classmethod
    def _check_shapes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from louver_service.warmup import WarmupShape

        for text in value:
            WarmupShape.parse(text)
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"):
            raise ValueError(f"invalid log level {value!r}")
        return level

    @model_validator(mode="after")
    def _check_index(self) -> Settings:
        self.index_config()  # raises ValueError on an invalid combination
        return self

    def resolve_device(self) -> torch.device:
        """The torch device sessions live on ('auto': cuda when available, else cpu)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_memory_budget(self, device: torch.device) -> int:
        """Bytes of KV + index the sessions on ``device`` may hold."""
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            return math.floor(total * self.memory_fraction)
        return CPU_MEMORY_BUDGET_BYTES

    def index_config(self) -> IndexConfig:
        """The default IndexConfig (fields a CreateSession leaves at zero take these values)."""
        return IndexConfig(kind=self.index_kind, num_subspaces=self.index_num_subspaces,
                           cluster_size=self.index_cluster_size,
                           buffer_size=self.index_buffer_size, quant_bits=self.index_quant_bits,
                           quant_coarse_bits=min(self.index_quant_coarse_bits,
                                                 self.index_quant_bits),
                           quant_group=self.index_quant_group, backend=self.index_backend)

    def policy(self) -> Policy:
        """The server default threshold policy."""
        return parse_policy(self.default_policy)

    def warmups(self) -> list[WarmupShape]:
        """The parsed ``warmup_shapes``."""
        from louver_service.warmup import WarmupShape

        return [WarmupShape.parse(text) for text in self.warmup_shapes]


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """A CLI parser with one ``--option`` per Settings field (all optional, as strings)."""
    parser = argparse.ArgumentParser(
        prog="louver-server",
        description="Louver KV-cache service. Every option can also be set in the environment "
                    "as LOUVER_<NAME>; the command line wins.")
    for name, field in Settings.model_fields.items():
        default = field.default if field.default is not None else "(derived)"
        parser.add_argument(_option(name), dest=name, default=None, metavar="VALUE",
                            help=f"{field.description} [default: {default}]")
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    """Build Settings from the command line over the environment (pydantic validates both)."""
    args = vars(build_parser().parse_args(argv))
    return Settings(**{k: v for k, v in args.items() if v is not None})
