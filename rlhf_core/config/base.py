"""The base of every configuration group."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Group(BaseModel):
    # allow_inf_nan=False: ".inf" or ".nan" is never a sensible hyperparameter, and accepted it fails much later
    # with a message that blames something else.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)
