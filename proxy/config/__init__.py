"""Config: schema (msgspec Structs), loading with precise errors, validation. Every key is in the README's
configuration reference."""

from .errors import ConfigError
from .load import LoadedConfig, load_file, load_text
from .schema import Config, format_duration

__all__ = ["Config", "ConfigError", "LoadedConfig", "format_duration", "load_file", "load_text"]
