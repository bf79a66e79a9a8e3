"""Workflows whose runs end in outcomes, and their baselines."""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field, model_validator

from margin.config.base import _Strict


class BaselineConfig(_Strict):
    """What a successful outcome cost before (or without) the LLM: a fixed cost per outcome, human
    time at an hourly rate, or margin's own cost per outcome in an earlier calendar month."""

    label: str = ""
    cost_per_outcome_usd: Decimal | None = Field(default=None, ge=0)
    human_minutes: Decimal | None = Field(default=None, gt=0)
    hourly_usd: Decimal | None = Field(default=None, gt=0)
    period: str | None = Field(default=None, pattern=r"^\d{4}-(0[1-9]|1[0-2])$", description="YYYY-MM")

    @model_validator(mode="after")
    def _one_kind(self) -> BaselineConfig:
        human = self.human_minutes is not None or self.hourly_usd is not None
        if human and (self.human_minutes is None or self.hourly_usd is None):
            raise ValueError("a human baseline needs both human_minutes and hourly_usd")
        kinds = [k for k, on in (("cost_per_outcome_usd", self.cost_per_outcome_usd is not None),
                                 ("human_minutes/hourly_usd", human), ("period", self.period is not None)) if on]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of cost_per_outcome_usd, human_minutes+hourly_usd, period "
                             f"(got {kinds or 'none'})")
        return self


class WorkflowConfig(_Strict):
    """A workflow whose runs end in outcomes (joins events.workflow and outcomes.workflow)."""

    name: str = Field(min_length=1)
    outcome: str = Field(default="success", description="what a success is, for reports")
    baseline: BaselineConfig | None = None
