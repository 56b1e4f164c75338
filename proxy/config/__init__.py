"""Config: schema (msgspec Structs), loading with precise errors, validation. See SPEC §6."""

from .errors import ConfigError
from .load import LoadedConfig, load_file, load_text
from .schema import Config, format_duration

__all__ = ["Config", "ConfigError", "LoadedConfig", "format_duration", "load_file", "load_text"]
