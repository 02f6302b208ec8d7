"""Typed, nested dataclass configs: strict loading from dicts/YAML and dotted overrides.

Every component keeps its own config dataclass next to its code; this module only knows
how to build any of them from plain data, rejecting unknown keys with the list of valid
ones (a misspelt key must never be silently ignored).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import math
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

__all__ = ["field_docs", "explained_yaml", "ConfigError", "ConfigLoader", "INFINITE_OK", "from_dict", "to_dict", "apply_overrides", "parse_override"]

# Field metadata of a float setting that takes inf (a wait with no limit); a default that holds
# inf (an open upper limit) says so too.
INFINITE_OK = {"infinite_ok": True}

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


class WrittenInt(int):
    """An integer as YAML read it, with the text it was written as: a string setting takes
    the text (YAML 1.1 reads ``run_dir=010`` as 8, ``2024_12_06`` as 20241206 and ``12:30`` as
    750), a number setting the value."""

    text: str


class ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, keeping what an integer was written as (``WrittenInt``)."""


def _written_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> WrittenInt:
    value = WrittenInt(loader.construct_yaml_int(node))
    value.text = node.value
    return value


ConfigLoader.add_constructor("tag:yaml.org,2002:int", _written_int)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str, infinite_ok: bool = False) -> Any:
    """Convert ``value`` to the annotated type ``tp`` (dataclasses recurse). A float must be
    finite (``nan`` and ``inf`` read as numbers, and every ``< 0`` check lets nan through), except
    that ``infinite_ok`` (a field whose default holds inf, such as an open upper limit) takes inf."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: None is not allowed here (expected {tp})")
    if dataclasses.is_dataclass(inner) and isinstance(inner, type):
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {inner.__name__}, got {value!r}")
        return from_dict(inner, value, where)
    origin = get_origin(inner)
    if origin is Literal:
        choices = get_args(inner)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            # NOTE: YAML reads off/on/yes/no unquoted as booleans: `output.wandb=off` arrived as False.
            hint = " (YAML reads an unquoted off/on/yes/no/true/false as a boolean: quote the word, or write one of these)" if isinstance(value, bool) else ""
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}{hint}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(inner)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]", infinite_ok) for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        out = [_coerce(v, elem, f"{where}[{i}]", infinite_ok) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(inner):
            try:
                return _coerce(value, arg, where, infinite_ok)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {inner}")
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if inner is float:
        if isinstance(value, str):
            # NOTE: YAML 1.1 reads "1e-3" (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        number = float(value)
        if math.isnan(number) or (math.isinf(number) and not infinite_ok):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if inner is str:
        if isinstance(value, int) and not isinstance(value, bool):  # YAML reads run_dir=2024 as a number
            return value.text if isinstance(value, WrittenInt) else str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if inner is dict or get_origin(inner) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise with the valid ones listed."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        # NOTE: YAML reads "{name:target}" (no space after the colon) as one key, "name:target".
        glued = [k.split(":", 1) for k in unknown if isinstance(k, str) and ":" in k and k.split(":", 1)[0].strip() in fields]
        hint = f" (YAML needs a space after the colon: {glued[0][0]}: {glued[0][1]})" if glued else ""
        close = [m[0] for k in unknown if isinstance(k, str) and (m := difflib.get_close_matches(k, fields, n=1, cutoff=0.6))]
        mean = f" (did you mean {', '.join(prefix + m for m in close)}?)" if close and not glued else ""
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}{mean} in {cls.__name__}; "
            f"valid keys: {sorted(fields)}{hint}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key, _default_holds_inf(fields[name]))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def _default_holds_inf(field: dataclasses.Field) -> bool:
    """Whether inf is one of a field's values: it says so (``INFINITE_OK``), or its default is
    or holds an infinite float."""
    if field.metadata.get("infinite_ok"):
        return True
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return False
    values = default if isinstance(default, (list, tuple)) else [default]
    return any(isinstance(v, float) and math.isinf(v) for v in values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a dataclass config (tuples become lists, YAML/JSON friendly)."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.max_steps=10`` -> (["train", "max_steps"], 10); values parse as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.load(raw, Loader=ConfigLoader) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({getattr(err, 'problem', None) or err})") from None


def _merged(base: dict, value: dict) -> dict:
    """``value`` merged into a copy of ``base``, section by section."""
    out = dict(base)
    for key, item in value.items():
        out[key] = _merged(out[key], item) if isinstance(item, dict) and isinstance(out.get(key), dict) else item
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a nested dict (validation happens in from_dict).
    A mapping value merges into the section it names (``student.conversion={mixer: mamba}``
    changes the mixer, not the recipe's other conversion settings); a list is given whole."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):  # "phases.1.lr=...": a list item by index
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {text!r}: {part!r} is not an index of a {len(node)}-item list")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {path[depth - 1]!r} is not a section")
            if last:
                current = node[part] if isinstance(node, list) else node.get(part)
                node[part] = _merged(current, value) if isinstance(value, dict) and isinstance(current, dict) else value
            elif isinstance(node, dict) and part not in node and path[depth + 1].isdigit():
                # NOTE: an index into a list the recipe does not spell out: the default list is not here to index.
                raise ConfigError(f"override {text!r}: {'.'.join(path[: depth + 1])} is a list the recipe does not give; give it whole ({'.'.join(path[: depth + 1])}=[...])")
            else:
                node = node[part] if isinstance(node, list) else node.setdefault(part, {})
    return data


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's attribute docstrings (the string literal under each field), by field name;
    inherited fields from its bases too."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a built-in, an interactive class)
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def explained_yaml(cfg: Any, width: int = 100) -> str:
    """``cfg`` (a dataclass) as YAML with each key's docstring as a comment above it: what
    ``launch/train.py --print_config --explain`` prints. It loads back as ``to_dict(cfg)``."""
    lines: list[str] = []

    def comment(pad: str, text: str) -> None:
        lines.extend(f"{pad}# {line}" for line in textwrap.wrap(text, max(40, width - len(pad) - 2)))

    def emit(obj: Any, pad: str) -> None:
        docs = field_docs(type(obj))
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if field.name in docs:
                comment(pad, docs[field.name])
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{field.name}:")
                emit(value, pad + "  ")
                continue
            if isinstance(value, (list, tuple)) and value and dataclasses.is_dataclass(value[0]):
                item_docs = field_docs(type(value[0]))
                comment(pad, "Each item: " + "; ".join(f"{name}: {doc}" for name, doc in item_docs.items()))
            dumped = yaml.safe_dump(to_dict(value), sort_keys=False, default_flow_style=True, width=10**6).removesuffix("\n...\n")
            lines.append(f"{pad}{field.name}: {dumped.strip()}")

    emit(cfg, "")
    return "\n".join(lines) + "\n"
