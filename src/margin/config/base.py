"""What every part of margin.yaml shares: the strict base model, errors, scope dimensions, tiers."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

SCOPE_DIMENSIONS = frozenset({"org", "team", "user", "key", "app", "env", "workflow", "model", "provider"})
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid; the message says where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Capability = Literal["tools", "json", "vision"]
Tier = Literal["premium", "standard", "batch"]


def _default_capabilities() -> list[Capability]:
    return ["tools", "json"]


def _all_tiers() -> list[Tier]:
    return ["premium", "standard", "batch"]
