"""Optimizers whose step is one kernel launch per parameter group (see `fastcls.optim.adamw`)."""
from fastcls.optim.adamw import FusedAdamW
from fastcls.optim.reference import adamw_reference

__all__ = ["FusedAdamW", "adamw_reference"]
