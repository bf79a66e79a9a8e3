"""Catalogues shipped with the package: model architectures and accelerators (YAML in data/).

Every entry carries its source and date, so a plan can say where each number came from.
"this-cpu" is not a datasheet: `bench/planner_cpu.py` measures this machine and writes
data/this_cpu.yaml (FLOP/s from a numpy matmul, bandwidth from a large copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Any

import yaml

PRECISIONS = ("bf16", "fp16", "fp8", "int8", "int4")
KV_PRECISIONS = ("bf16", "fp16", "fp8", "int8")


class CatalogError(ValueError):
    """An unknown id or a malformed catalogue entry."""


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    params: int                 # all parameters, embeddings included
    active_params: int          # used per token (== params unless MoE)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    vocab: int
    source: str
    date: str
    experts: int = 0            # MoE: experts per layer (0 = dense)
    experts_per_token: int = 0
    expert_params: int = 0      # parameters of all experts together
    tied_embeddings: bool = False   # the output head reuses the input embedding matrix

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def embed_params(self) -> int:
        """vocab x hidden: one embedding matrix (the input lookup, and the output head if tied)."""
        return self.vocab * self.hidden


@dataclass(frozen=True)
class GpuSpec:
    id: str
    name: str
    flops_by_dtype: tuple[tuple[str, float], ...]   # peak dense FLOP/s; a tuple so the spec stays hashable
    hbm_bytes: float
    hbm_bw: float               # B/s
    interconnect_bw: float      # B/s per direction (0: no tensor parallelism)
    tdp_w: float
    idle_w: float
    usd_per_hour: Decimal       # on-demand, per accelerator
    owned_3y_usd: Decimal       # capital cost per accelerator over 3 years
    source: str
    date: str

    @property
    def flops(self) -> dict[str, float]:
        return dict(self.flops_by_dtype)

    def peak_flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for `dtype`; dtypes without tensor support run in bf16."""
        f = self.flops
        return f.get(dtype) or f["bf16"]

    def supports(self, dtype: str) -> bool:
        return dtype in self.flops


def _need(entry: dict[str, Any], key: str, where: str) -> Any:
    if key not in entry:
        raise CatalogError(f"{where}: missing {key!r}")
    return entry[key]


def _model(mid: str, e: dict[str, Any]) -> ModelSpec:
    where = f"models.yaml {mid}"
    params = int(float(_need(e, "params", where)))
    experts = int(e.get("experts", 0))
    k = int(e.get("experts_per_token", 0))
    expert_params = int(float(e.get("expert_params", 0)))
    active = params - (expert_params * (experts - k) // experts if experts else 0)
    return ModelSpec(
        id=mid, name=str(e.get("name", mid)), params=params, active_params=active,
        layers=int(_need(e, "layers", where)), hidden=int(_need(e, "hidden", where)),
        heads=int(_need(e, "heads", where)), kv_heads=int(_need(e, "kv_heads", where)),
        head_dim=int(_need(e, "head_dim", where)), context=int(_need(e, "context", where)),
        vocab=int(e.get("vocab", 0)), source=str(_need(e, "source", where)), date=str(_need(e, "date", where)),
        experts=experts, experts_per_token=k, expert_params=expert_params,
        tied_embeddings=bool(e.get("tied_embeddings", False)),
    )


def gpu_from_dict(gid: str, e: dict[str, Any]) -> GpuSpec:
    where = f"accelerator {gid}"
    flops = {str(k): float(v) for k, v in dict(_need(e, "flops", where)).items()}
    if "bf16" not in flops:
        raise CatalogError(f"{where}: flops needs at least bf16")
    return GpuSpec(
        id=gid, name=str(e.get("name", gid)), flops_by_dtype=tuple(sorted(flops.items())),
        hbm_bytes=float(_need(e, "hbm_bytes", where)), hbm_bw=float(_need(e, "hbm_bw", where)),
        interconnect_bw=float(e.get("interconnect_bw", 0)), tdp_w=float(_need(e, "tdp_w", where)),
        idle_w=float(e.get("idle_w", 0.1 * float(e["tdp_w"]))),
        usd_per_hour=Decimal(str(_need(e, "usd_per_hour", where))),
        owned_3y_usd=Decimal(str(e.get("owned_3y_usd", "0"))),
        source=str(_need(e, "source", where)), date=str(_need(e, "date", where)),
    )


def _load(name: str) -> dict[str, Any]:
    f = resources.files("margin.planner").joinpath("data", name)
    if not f.is_file():
        return {}
    data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise CatalogError(f"{name}: expected a mapping of id -> entry")
    return data


@cache
def models() -> dict[str, ModelSpec]:
    """Model architectures by id (lower-case with dashes: llama-3.1-8b, mixtral-8x7b, ...)."""
    return {mid: _model(mid, e) for mid, e in _load("models.yaml").items()}


@cache
def gpus() -> dict[str, GpuSpec]:
    """Accelerators by id (h100-sxm, h200, b200, a100-80gb, l4, mi300x, this-cpu if measured)."""
    out = {gid: gpu_from_dict(gid, e) for gid, e in _load("gpus.yaml").items()}
    out.update({gid: gpu_from_dict(gid, e) for gid, e in _load("this_cpu.yaml").items()})
    return out


def model(mid: str) -> ModelSpec:
    try:
        return models()[mid]
    except KeyError:
        raise CatalogError(f"unknown model {mid!r}: choose from {', '.join(sorted(models()))}") from None


def gpu(gid: str) -> GpuSpec:
    try:
        return gpus()[gid]
    except KeyError:
        raise CatalogError(f"unknown accelerator {gid!r}: choose from {', '.join(sorted(gpus()))}") from None
