"""Loading training configs: YAML/TOML files and packaged recipes, ``section.field`` overrides with
type coercion, and the field docs (the schema's attribute docstrings) for ``perflow train --help``.

The schema itself is :mod:`perflow.training.config`; this module imports it, never the reverse.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from .config import TrainConfig

SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {name: hints[name] for name in SECTIONS}


def field_index() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """``{"section.field": (section, Field, type)}`` for every config field."""
    out = {}
    for section, cls in _section_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{section}.{f.name}"] = (section, f, hints[f.name])
    return out


def field_docs() -> dict[str, str]:
    """``{"section.field": docstring}`` parsed from this module's source (the attribute docstrings)."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for section, cls in _section_classes().items():
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                doc = ""
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    doc = " ".join(str(nxt.value.value).split())
                docs[f"{section}.{node.target.id}"] = doc
    return docs


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML/TOML or a flag string) to the field type ``tp``; clear error otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # e.g. ``int | list[int]``: the first type that takes the value
            try:
                return coerce(name, option, value)
            except ValueError:
                continue
        try:
            return coerce(name, inner[-1], value)
        except ValueError:
            if len(inner) == 1:
                raise
        names = " or ".join(str(getattr(a, "__name__", a)) if typing.get_origin(a) is None else str(a) for a in inner)
        raise ValueError(f"{name}: expected {names}, got {value!r}")
    if isinstance(value, str) and tp is not str:
        import yaml

        value = yaml.safe_load(value) if value.strip() else None
        if origin is list and isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            return str(value)
        if origin is list:
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [coerce(name, args[0], v) for v in value]
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ValueError(f"{name}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def resolve_key(key: str) -> str:
    """``section.field`` for a full or bare field name; error if unknown or ambiguous."""
    index = field_index()
    key = key.replace("-", "_")
    if key in index:
        return key
    matches = [k for k in index if k.split(".", 1)[1] == key]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(
        f"unknown config field {key!r}; valid fields are: " + ", ".join(sorted(index))
    )


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a config from nested ``{section: {field: value}}`` (flat ``field: value`` keys also accepted)."""
    cfg = TrainConfig()
    for key, value in (data or {}).items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                set_field(cfg, f"{key}.{sub}", v)
        else:
            set_field(cfg, key, value)
    return cfg


def set_field(cfg: TrainConfig, key: str, value: Any) -> None:
    full = resolve_key(key)
    section, f, tp = field_index()[full]
    setattr(getattr(cfg, section), f.name, coerce(full, tp, value))


def recipe_names() -> list[str]:
    """Names of the recipes shipped in ``src/perflow/recipes``."""
    root = resources.files("perflow") / "recipes"
    return sorted(p.name.rsplit(".", 1)[0] for p in root.iterdir() if p.name.endswith((".yaml", ".yml", ".toml")))


def read_config_file(spec: str | Path) -> dict[str, Any]:
    """Parse a YAML/TOML file, or a packaged recipe named ``spec`` (e.g. ``digits``, ``sd15``)."""
    path = Path(spec)
    if not path.is_file():
        root = resources.files("perflow") / "recipes"
        for ext in (".yaml", ".yml", ".toml"):
            cand = root / f"{spec}{ext}"
            if cand.is_file():
                path = Path(str(cand))
                break
        else:
            raise FileNotFoundError(
                f"config {str(spec)!r} is neither a file nor a packaged recipe; recipes: {recipe_names()}"
            )
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"{path}: unsupported config format {path.suffix!r}; use .yaml or .toml")
    data = _parse_config_text(path, path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def _parse_config_text(path: Path, text: str) -> Any:
    """Parse YAML/TOML/JSON; a syntax error becomes one ``ValueError`` line naming the file and line."""
    import yaml

    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context_mark", None)
        if context is not None and mark is not None and context.line != mark.line:
            problem += f" ({getattr(err, 'context', None) or 'started'} at line {context.line + 1})"
        raise ValueError(f"{where}: invalid YAML: {problem}; fix the file (a config is a mapping of sections)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: invalid JSON: {err.msg}") from None
    except ValueError as err:  # tomllib.TOMLDecodeError
        raise ValueError(f"{path}: invalid TOML: {' '.join(str(err).split())}") from None


def load_config(spec: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Config from a file or recipe name, with ``overrides`` (``{"training.max_steps": 100, ...}``) applied."""
    cfg = from_dict(read_config_file(spec)) if spec is not None else TrainConfig()
    for key, value in (overrides or {}).items():
        set_field(cfg, key, value)
    return cfg.validate()


def make_config(config: "TrainConfig | dict | str | Path | None" = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A validated config from a :class:`TrainConfig` (copied), a nested dict, a file or recipe name,
    or ``None`` (defaults), with ``overrides`` applied."""
    import copy

    if isinstance(config, TrainConfig):
        cfg = copy.deepcopy(config)
    elif isinstance(config, dict):
        cfg = from_dict(config)
    else:
        return load_config(config, overrides)
    for key, value in (overrides or {}).items():
        set_field(cfg, key, value)
    return cfg.validate()


__all__ = [
    "SECTIONS", "coerce", "field_docs", "field_index", "from_dict", "load_config", "make_config",
    "read_config_file", "recipe_names", "resolve_key", "set_field",
]
