"""Typed `--key=value` configuration for the entry points.

Each entry point declares one dataclass whose fields carry a one-line comment:

    @dataclass
    class Config:
        batch_size: int = 128  # images per step, summed over all GPUs

    cfg = parse_config(Config, description=__doc__)

`--key=value` overrides a field, converted by the field's type; `--flag` alone sets a bool field
to true; unknown keys and unconvertible values are errors; `--help` lists the fields with their
comments and defaults.
"""
import dataclasses
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path

from runtime import UsageError

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


def field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field in the class source: the help text for that field."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
            if match:
                comments[match.group(1)] = match.group(2).strip()
    return comments


def convert(text: str, kind, key: str):
    """Convert `text` to the field type `kind`; a UsageError names the key when it cannot."""
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        choices = typing.get_args(kind)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise UsageError(f"--{key}={text}: expected one of {', '.join(map(str, choices))}")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if text.lower() in ("none", "") and len(args) < len(typing.get_args(kind)):
            return None
        return convert(text, args[0], key)
    if kind is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise UsageError(f"--{key}={text}: expected true or false")
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            raise UsageError(f"--{key}={text}: expected {kind.__name__}") from None
    raise TypeError(f"config field {key}: unsupported type {kind}")


def help_text(cls, description: str | None) -> str:
    comments = field_comments(cls)
    lines = [description.strip(), ""] if description else []
    lines.append("options (--key=value):")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name}={default!s:<12} {comments.get(f.name, '')}")
    return "\n".join(lines)


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    """Build `cls` from its defaults overridden by `--key=value` arguments."""
    argv = sys.argv[1:] if argv is None else argv
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    overrides = {}
    for arg in argv:
        if arg == "--":  # what separates a launcher's options (torchrun's) from ours, if it is passed on
            continue
        if arg in ("-h", "--help"):
            print(help_text(cls, description))
            sys.exit(0)
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}: options are written --key=value (see --help)")
        key, has_value, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in known:
            raise UsageError(f"unknown option --{key} (see --help for the {len(known)} known options)")
        if not has_value:
            if hints[key] is not bool:
                raise UsageError(f"--{key} needs a value: --{key}=...")
            text = "true"
        overrides[key] = convert(text, hints[key], key)
    return cls(**overrides)


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved configuration as JSON (next to the results it produced)."""
    Path(path).write_text(json.dumps(config_dict(cfg), indent=2) + "\n")
