"""Typed configuration: dataclasses filled from YAML/dicts with strict checking.

An unknown key, a wrong type or an impossible value raises ConfigError naming the file and the
dotted key, before any work starts. Values that would pass and crash later are caught here too: every
float must be finite (NaN and +-inf are rejected for every field; a field that wanted inf would have to
opt out, none does), every integer must fit 64 bits, a section given as null (`ppo:` with nothing under
it) is an error rather than the defaults, and so is an empty config file.

Every field carries a docstring, a string literal on the line under it (CleanRL's `Args` habit):
`field_docs` reads them from the source, `describe_config` lists every dotted key with its type,
default and docstring, and `format_config_help` prints that list (`reled-hpc train --help-config`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, get_args, get_origin

from .errors import ConfigError, ReledError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:  # numpy, torch and HDF5 take 64-bit integers at most
            raise ConfigError(f"{where}: {value} does not fit a 64-bit integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = float(value)
        except OverflowError:
            raise ConfigError(f"{where}: {value} is beyond the float range") from None
        if not math.isfinite(out):  # NaN/inf pass every `x > 0` check or none, then poison training
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")  # pragma: no cover - programming error


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass `cls` from `data`; `where` prefixes error messages (file and key path). A null
    section is an error (YAML `ppo:` with nothing under it): omit the key for the defaults."""
    if data is None:
        raise ConfigError(f"{where}: is null (a key with nothing under it); give a mapping of keys, or omit it "
                          "for the defaults")  # fmt: skip
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(fields))})")
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def load_yaml(path: Path | str) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:  # an empty file would silently mean every default
        raise ConfigError(f"{path}: the config file is empty (give at least one key, e.g. name: my-run)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def require(cond: bool, where: str, message: str) -> None:
    """Raise ConfigError(`where`: message) unless `cond`; for validate() methods."""
    if not cond:
        raise ConfigError(f"{where}: {message}")


# ---- field docstrings -------------------------------------------------------------------------------


@functools.cache
def _field_text(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """({field: docstring}, {field: trailing `# comment`}) of the fields `cls` itself defines."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    own = [f.name for f in dataclasses.fields(cls) if f.name in inspect.get_annotations(cls)]
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        node = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError) as exc:
        raise ReledError(
            f"cannot read the docstrings of {name}'s fields ({', '.join(own)}): its source is unavailable "
            f"({exc}); the config help is read from the .py files, so install the package with them"
        ) from exc
    assert isinstance(node, ast.ClassDef)
    lines = source.splitlines()
    docs, comments, seen = {}, {}, set()
    for stmt, nxt in zip(node.body, [*node.body[1:], None], strict=True):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        key = stmt.target.id
        seen.add(key)
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[key] = inspect.cleandoc(nxt.value.value)
        end = stmt.end_lineno or stmt.lineno
        rest = lines[end - 1].encode()[stmt.end_col_offset or 0 :].decode().strip()  # ast counts UTF-8 bytes
        if rest.startswith("#") and not rest.startswith(("# fmt:", "# type:", "# noqa", "# pragma")):
            comments[key] = rest[1:].strip()
    missing = [f for f in own if f not in seen]
    if missing:  # e.g. a class made by dataclasses.make_dataclass
        raise ReledError(f"cannot read the docstrings of {name}'s fields {', '.join(missing)}: not in its source")
    return docs, comments


def _merged_text(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """`_field_text` over the dataclass bases too (a subclass's text wins)."""
    docs: dict[str, str] = {}
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and inspect.get_annotations(klass):
            d, c = _field_text(klass)
            docs.update(d)
            comments.update(c)
    return docs, comments


def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} of dataclass `cls`: the string literal on the line under each field
    (CleanRL's `Args` style), read from the source with ast (cached).
    Undocumented fields are absent. ReledError naming the class and its fields when the source
    cannot be read (rather than a help that silently says nothing)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"field_docs needs a dataclass, got {cls!r}")
    return dict(_merged_text(cls)[0])


class ConfigKey(NamedTuple):
    """One settable config key: dotted name, type, default and docstring."""

    key: str
    type: str
    default: Any
    doc: str


REQUIRED = dataclasses.MISSING  # the default of a key without one


def type_label(tp: Any) -> str:
    """A short readable name of a config type: float, list[str], 'a' | 'b', int | None."""
    if get_origin(tp) is Literal:
        return _type_name(tp)
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def describe_config(cls: type, prefix: str = "", sections: Mapping[str, type] | None = None) -> list[ConfigKey]:
    """Every settable key of dataclass `cls` in field order, nested dataclass sections walked into
    (`ppo.lr`), as ConfigKey(dotted key, type name, default, docstring). Defaults come from
    `dataclasses.fields` (a `default_factory` is called; a section's own factory decides its keys'
    defaults); a key without one has the default REQUIRED. `sections` maps dotted keys of free-form
    mapping fields to the dataclass that checks their keys elsewhere (`{"slurm": SlurmSpec}`): they
    are listed as that dataclass's keys. A field without a docstring falls back to its trailing
    `# comment` (for such classes, e.g. SlurmSpec), else ""."""
    return _describe(cls, prefix, sections or {}, None)


def _describe(cls: type, prefix: str, sections: Mapping[str, type], instance: Any) -> list[ConfigKey]:
    """describe_config; `instance` (a section's default object) overrides the class defaults."""
    hints = typing.get_type_hints(cls)
    docs, comments = _merged_text(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:  # from_dict never sets it: not a config key
            continue
        key, tp = prefix + f.name, hints[f.name]
        if instance is not None:
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows += _describe(tp, key + ".", sections, default if isinstance(default, tp) else None)
        elif key in sections:
            rows += _describe(sections[key], key + ".", sections, None)
        else:
            rows.append(ConfigKey(key, type_label(tp), default, docs.get(f.name) or comments.get(f.name, "")))
    return rows


def format_value(value: Any) -> str:
    """A default as one would write it in the YAML file or a --set value."""
    import yaml

    if value is REQUIRED:
        return "(required)"
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def format_config_help(cls: type, sections: Mapping[str, type] | None = None, width: int = 120) -> list[str]:
    """The lines of a config's help: its keys grouped by section (top-level keys first, then a header
    with each section's docstring), one `key: type = default  # docstring` line each, the docstrings
    of a section aligned and wrapped to `width` columns."""
    section_docs = field_docs(cls)
    groups: dict[str, list[ConfigKey]] = {"": []}
    for row in describe_config(cls, sections=sections):
        groups.setdefault(row.key.split(".", 1)[0] if "." in row.key else "", []).append(row)
    lines: list[str] = []
    for head, rows in groups.items():
        if not rows:
            continue
        title = f"{head}: {' '.join(section_docs.get(head, '').split())}" if head else "top level:"
        lines += ["", *textwrap.wrap(title.rstrip(), width, subsequent_indent="    ")]
        lefts = [f"  {r.key}: {r.type} = {format_value(r.default)}" for r in rows]
        # a few long Literal types would push every docstring right: they get a line of their own instead
        col = max((len(left) for left in lefts if len(left) <= 44), default=0) + 2
        for left, row in zip(lefts, rows, strict=True):
            # no break inside "(>= 1)"-like bounds: textwrap splits at ASCII spaces only
            doc = re.sub(r"([<>]=?|=) ", "\\1\u00a0", " ".join(row.doc.split()))
            wrapped = [w.replace("\u00a0", " ") for w in textwrap.wrap(doc, width - col - 2, break_on_hyphens=False)]
            if not wrapped:
                lines.append(left)
                continue
            if len(left) + 2 > col:
                lines.append(left)
            else:
                lines.append(f"{left.ljust(col)}# {wrapped.pop(0)}")
            lines += [f"{'':{col}}# {w}" for w in wrapped]
    return lines[1:]
