"""Config schema (structured configs) and validation."""

from .schema import RunConfig, register_configs
from .validate import validate

__all__ = ["RunConfig", "register_configs", "validate"]
