"""Run configuration: the TOML schema (`schema`) and how files and overrides become one (`manager`)."""
from .manager import collect_overrides, load_config, with_overrides
from .schema import Config

__all__ = ["Config", "collect_overrides", "load_config", "with_overrides"]
