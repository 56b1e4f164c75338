"""Config loading, pass one: text -> YAML -> `${VAR}` -> `defaults:` merged -> msgspec Structs.

Every failure becomes a ConfigError naming the file, the path inside it and what was expected. Pass two (meaning:
cross references, combinations) lives in `validate.py`.
"""

from __future__ import annotations

import hashlib
import re
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import yaml

from .errors import ConfigError, join_path
from .schema import Config, Defaults, Upstream, dec_hook, used_by
from .yamlread import read_yaml

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class LoadedConfig:
    """A valid config plus what `failgate check`, `/config` and reload need to know about it."""

    config: Config
    source: str
    text: str
    sha256: str
    loaded_at: float
    # (route index, "auth" | "rate_limit") -> keys that came from `defaults:`
    inherited: dict[tuple[int, str], frozenset[str]] = field(default_factory=dict)
    # paths whose value came from `${VAR}`: shown redacted on /config
    from_env: frozenset[str] = frozenset()


def load_file(path: str) -> LoadedConfig:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the file: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text (byte {exc.start}); expected a YAML file") from None
    return load_text(text, path)


def load_text(text: str, source: str) -> LoadedConfig:
    from .validate import validate  # pass two

    if "\x00" in text:
        raise ConfigError(source, "", "contains NUL bytes; expected a YAML file")
    try:
        doc = read_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"not valid YAML: {_yaml_problem(exc)}") from None
    if doc is None:
        raise ConfigError(source, "", "the file is empty; expected a mapping that starts with `version: 1`")
    if not isinstance(doc, dict):
        raise ConfigError(source, "", f"expected a mapping at the top level, got {_kind(doc)}")

    from_env: set[str] = set()
    doc = _substitute_env(doc, "", source, from_env)
    doc, inherited = _merge_defaults(doc, source)
    config = _convert(doc, Config, source, "", whole=doc)
    loaded = LoadedConfig(
        config=config,
        source=source,
        text=text,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        loaded_at=time.time(),
        inherited=inherited,
        from_env=frozenset(from_env),
    )
    validate(loaded)
    return loaded


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(problem)


def _substitute_env(value: Any, path: str, source: str, seen: set[str]) -> Any:
    import os

    if isinstance(value, str):
        if "${" not in value:
            return value

        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                raise ConfigError(source, path, f"environment variable {name} is not set (used as ${{{name}}})")
            return os.environ[name]

        seen.add(path)
        return _ENV.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute_env(v, join_path(path, str(k)), source, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_env(v, join_path(path, i), source, seen) for i, v in enumerate(value)]
    return value


def _merge_defaults(
    doc: dict[str, Any], source: str
) -> tuple[dict[str, Any], dict[tuple[int, str], frozenset[str]]]:
    """Merge `defaults.<check>` key by key under each route's check of that kind (the route wins)."""
    raw_defaults = doc.get("defaults")
    if raw_defaults is None:
        return doc, {}
    _convert(raw_defaults, Defaults, source, "defaults", whole=doc)
    routes = doc.get("routes")
    if not isinstance(routes, list):
        return doc, {}  # the conversion of the whole document reports it
    inherited: dict[tuple[int, str], frozenset[str]] = {}
    merged_routes = []
    for i, route in enumerate(routes):
        if isinstance(route, dict):
            route = dict(route)
            for check in ("auth", "rate_limit"):
                base = raw_defaults.get(check) or {}
                own = route.get(check)
                if check == "auth" and isinstance(own, dict) and base:  # only what the route's auth type uses
                    base = {k: v for k, v in base.items() if used_by(own.get("type"), k)}
                if isinstance(own, dict) and base:
                    route[check] = {**base, **own}
                    inherited[(i, check)] = frozenset(k for k in base if k not in own)
                elif check == "rate_limit" and isinstance(own, list) and base:  # into every limit of a list
                    route[check] = [{**base, **item} if isinstance(item, dict) else item for item in own]
                    for j, item in enumerate(own):
                        if isinstance(item, dict):
                            inherited[(i, f"rate_limit[{j}]")] = frozenset(k for k in base if k not in item)
        merged_routes.append(route)
    return {**doc, "routes": merged_routes}, inherited


# ---------------------------------------------------------------------------------------------------------------
# msgspec error messages, rewritten to name the path the way the user writes it and to say what was expected.

_MSGSPEC_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_SEGMENT = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")


def _convert(value: Any, type_: Any, source: str, base: str, whole: Any) -> Any:
    # Upstreams are a mapping by name: msgspec reports errors inside a dict as `[...]`, so convert them one by
    # one to name the entry.
    if type_ is Config and isinstance(value, dict) and isinstance(value.get("upstreams"), dict):
        for name, up in value["upstreams"].items():
            _convert(up, Upstream, source, join_path("upstreams", str(name)), whole=up)
    try:
        return msgspec.convert(value, type_, dec_hook=dec_hook, str_keys=True)
    except msgspec.ValidationError as exc:
        m = _MSGSPEC_AT.match(str(exc))
        assert m is not None
        rel = m.group("path") or ""
        segments: list[str | int] = [
            s[0] if s[0] else int(s[1]) for s in _SEGMENT.findall(rel)
        ]
        path = base
        for seg in segments:
            path = join_path(path, seg)
        raise ConfigError(source, path, _explain(m.group("msg"), type_, segments, value)) from None


def _explain(msg: str, root: Any, segments: list[str | int], value: Any) -> str:
    target = _type_at(root, segments)
    got = _value_at(value, segments)
    if msg.startswith("Object contains unknown field"):
        key = msg.split("`")[1]
        known = _field_names(target)
        hint = f"; expected one of: {', '.join(known)}" if known else ""
        return f"unknown key `{key}`{hint}"
    if msg.startswith("Object missing required field"):
        key = msg.split("`")[1]
        return f"missing required key `{key}`"
    if msg.startswith("Invalid enum value"):
        choices = ", ".join(map(str, _literal_choices(target)))
        others = _other_kinds(target)
        expected = f"{others} or one of: {choices}" if others else f"one of: {choices}"
        return f"expected {expected}; got {got!r}"
    if msg.startswith("Expected `object`"):
        return f"expected a mapping, got {_kind(got)}"
    if msg.startswith("Expected `array`"):
        return f"expected a list, got {_kind(got)}"
    if msg.startswith("Expected"):
        expected = msg[len("Expected ") :].split(", got")[0]
        literals = _literal_choices(target)
        if literals:
            expected += " or one of: " + ", ".join(map(str, literals))
        return f"expected {expected.replace('`', '')}, got {got!r}"
    return msg[0].lower() + msg[1:]


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _value_at(value: Any, segments: list[str | int]) -> Any:
    for seg in segments:
        try:
            value = value[seg]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _unwrap(t: Any) -> list[Any]:
    """Optional[X] / X | Y / Annotated[X, ...] -> the member types."""
    origin = typing.get_origin(t)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(t)[0])
    if origin is typing.Union or origin is types.UnionType:
        out: list[Any] = []
        for a in typing.get_args(t):
            if a is not type(None):
                out.extend(_unwrap(a))
        return out
    return [t]


def _type_at(root: Any, segments: list[str | int]) -> Any:
    current: list[Any] = [root]
    for seg in segments:
        nxt: list[Any] = []
        for t in current:
            for member in _unwrap(t):
                if isinstance(seg, str) and isinstance(member, type) and issubclass(member, msgspec.Struct):
                    hints = typing.get_type_hints(member, include_extras=True)
                    if seg in hints:
                        nxt.append(hints[seg])
                elif isinstance(seg, int) and typing.get_origin(member) is list:
                    nxt.append(typing.get_args(member)[0])
        current = nxt
    return current[0] if current else None


def _field_names(t: Any) -> list[str]:
    for member in _unwrap(t) if t is not None else []:
        if isinstance(member, type) and issubclass(member, msgspec.Struct):
            return list(member.__struct_fields__)
    return []


def _other_kinds(t: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    kinds = [names[m] for m in (_unwrap(t) if t is not None else []) if m in names]
    return " or ".join(kinds)


def _literal_choices(t: Any) -> list[Any]:
    out: list[Any] = []
    for member in _unwrap(t) if t is not None else []:
        if typing.get_origin(member) is Literal:
            out.extend(typing.get_args(member))
    return out


