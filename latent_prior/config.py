"""Dataclass configs shared by the CLI, the Python API and the saved JSON.

A command's config is one flat dataclass. Each field carries its help text in
`field(metadata={"help": ...})`, written `option(default, help)` (and optionally `flags=("-n",)` for extra short
flags, `choices=(...)`, or `positional=True` to also accept the value as a positional argument).
`add_arguments` turns the fields into argparse flags with the same names (`batch_size` <->
`--batch-size`), and `resolve` merges defaults < `--config FILE` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import linecache
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from latent_prior.errors import LatentPriorError

C = TypeVar("C")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field: `dataclasses.field(default=default, metadata={"help": help, **metadata})`."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    # `X | None` -> X: None is expressed by leaving the flag out.
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
    return tp


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


#: `--help` group of the fields above a dataclass's first "# -- TITLE" comment.
FIRST_GROUP = "data and output"


def _class_body(klass: type) -> list[str] | None:
    """The source lines of a top-level class's body, found by a line scan (inspect.getsource parses the whole
    module, which cost ~150 ms on every command line); None when the source is not available."""
    try:
        path = inspect.getsourcefile(klass)
    except TypeError:
        return None
    lines = linecache.getlines(path) if path else []
    start = next((i for i, line in enumerate(lines) if re.match(rf"class {klass.__name__}\b", line)), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i][0].isspace()), len(lines))
    return [line.rstrip("\n") for line in lines[start + 1 : end]]


def field_groups(cls: type) -> dict[str, str]:
    """{field name: help group}, read from the "# -- TITLE" comments that divide a config dataclass (and the
    dataclasses it extends) into sections; a field redefined by a subclass takes the subclass's section. Empty
    when the source is not available (then --help lists the flags ungrouped)."""
    groups: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        lines = _class_body(klass)
        if lines is None:
            return {}
        title = FIRST_GROUP
        for line in lines:
            if match := re.match(r"^    # -- (.+?)(?: \(.*\))?$", line):
                title = match.group(1)
            elif match := re.match(r"^    (\w+)\s*:", line):
                groups[match.group(1)] = title
    return groups


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field; defaults are SUPPRESSed so `resolve` can tell what was given. The
    flags are grouped in --help by the sections of the dataclass (`field_groups`) when it has several."""
    groups = field_groups(cls)
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp = _field_type(cls, f)
        default = _default_of(f)
        flags = [*f.metadata.get("flags", ()), "--" + f.name.replace("_", "-")]
        help_text = f.metadata.get("help", "")
        required = default is None and f.metadata.get("required", False)
        shown = "required" if required else f"default: {default!r}" if default is not None else "default: none"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{help_text} ({shown})"}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (tuple, list):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kwargs.update(type=inner, nargs="+", metavar=f.name.upper())
        else:
            kwargs.update(type=tp if tp in (int, float, str) else str, metavar=f.metadata.get("metavar", f.name.upper()))
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("positional"):
            # Also accepted as an optional positional argument (`latent-prior info DIR` = `--path DIR`).
            parser.add_argument(
                f.name, nargs="?", default=argparse.SUPPRESS, metavar=kwargs.get("metavar", f.name.upper()), help=f"same as {flags[-1]}"
            )
        title = groups.get(f.name)
        if title is not None and len(set(groups.values())) > 1 and title not in sections:
            sections[title] = parser.add_argument_group(title)
        (sections[title] if title in sections else parser).add_argument(*flags, **kwargs)
    parser.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        default=None,
        help="YAML or JSON file with any of the fields above; flags given on the command line win (default: none)",
    )


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of field names to values."""
    path = Path(path)
    if not path.is_file():
        raise LatentPriorError(f"--config {path}: no such file; check the path.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LatentPriorError(
            f"--config {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as a UTF-8 YAML or JSON file."
        ) from None
    except OSError as exc:
        raise LatentPriorError(f"--config {path}: cannot be read ({exc.strerror or exc}); check the file and its permissions.") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one clear sentence
        mark = getattr(exc, "problem_mark", None)  # YAML's errors span lines; say where, in one
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        reason = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise LatentPriorError(f"--config {path}: could not parse it ({where}{reason}); it must be a YAML or JSON mapping.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LatentPriorError(f"--config {path}: expected a mapping of field names to values, got {type(data).__name__}.")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise LatentPriorError(f"--config {path}: the key {odd[0]!r} is not a field name; keys are names such as batch_size.")
    return data


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(True, value as `tp`) when `value` is of type `tp` (an int counts as a float; a bool is never a
    number), else (False, None). Types this module does not generate flags for are accepted as they are."""
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if tp is str:
        return isinstance(value, str), value
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
        if not isinstance(value, (list, tuple)):
            return False, None
        items = [_coerce(v, inner) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    return True, value


def _expected(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
        return f"a list of {_TYPE_NAMES.get(inner, 'values').removeprefix('an ').removeprefix('a ')}s"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def check_types(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """`data` with every value checked against its field's type and choices (and ints given for floats made
    floats); a LatentPriorError naming the key, the value and the type expected otherwise. Flags are
    typed by argparse already; this is for values from a --config file or a saved config."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for name, value in data.items():
        tp, f = hints[name], fields[name]
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
        optional = type(None) in args
        if value is None and (optional or _default_of(f) is None):
            checked[name] = value
            continue
        base = _field_type(cls, f)
        ok, converted = _coerce(value, base)
        if not ok:
            none = " or null" if optional else ""
            raise LatentPriorError(f"{source}: `{name}` is {_describe(value)}, but it must be {_expected(base)}{none}; fix that key.")
        choices = f.metadata.get("choices")
        if choices is not None:
            for item in converted if isinstance(converted, tuple) else (converted,):
                if item not in choices:
                    raise LatentPriorError(f"{source}: `{name}` is {item!r}; choose one of {', '.join(map(str, choices))}.")
        checked[name] = converted
    return checked


def from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Build `cls` from a mapping, refusing unknown keys with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise LatentPriorError(f"{source}: unknown field(s) {', '.join(unknown)}; valid fields are {', '.join(sorted(names))}.")
    data = check_types(cls, data, source)
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise LatentPriorError(f"{source}: {exc}") from None


def resolve(cls: type[C], args: argparse.Namespace) -> C:
    """defaults < --config FILE < command-line flags -> one `cls` instance."""
    values: dict[str, Any] = {}
    config_file = getattr(args, "config_file", None)
    if config_file:
        values.update(load_config_file(config_file))
        values = {k.replace("-", "_"): v for k, v in values.items()}
    names = {f.name for f in dataclasses.fields(cls)}
    # The file's own values are checked too, also those a flag overrides: a wrong one is a mistake in the file.
    values.update(check_types(cls, {k: v for k, v in values.items() if k in names}, f"--config {config_file}"))
    values.update({k: v for k, v in vars(args).items() if k in names})
    for f in dataclasses.fields(cls):
        if typing.get_origin(_field_type(cls, f)) is tuple and isinstance(values.get(f.name), list):
            values[f.name] = tuple(values[f.name])
    return from_dict(cls, values, source=f"--config {config_file}" if config_file else "arguments")


def parse_config(cls: type[C], argv: list[str] | None, *, description: str, epilog: str | None = None) -> C:
    """A script's command line -> one `cls` instance: one flag per field (`add_arguments`), then `resolve`."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog)
    add_arguments(parser, cls)
    return resolve(cls, parser.parse_args(argv))


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config -> JSON-able dict with the same field names."""
    out = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
