"""Typed command-line options for the entry points: one dataclass each, its fields the options.

Each entry point declares one dataclass whose fields carry a one-line comment; a comment line of its own
`# --- name ---` starts a group of options in `--help` (fields before any group are listed under "other"):

    @dataclass
    class Config:
        # --- schedule ---
        batch_size: int = 128  # images per step, summed over all GPUs

    cfg = parse_config(Config, description=__doc__)

`--key=value` and `--key value` override a field, converted by the field's type (`--batch-size` is
`--batch_size`); a true/false field is switched on by `--key` and off by `--no-key` (`--key=false` is read too);
`none` sets an optional field to None. Unknown keys are errors with a suggestion of the nearest known one;
unconvertible values are errors naming the key; `--help` lists the fields, grouped, with their defaults and
comments in aligned columns.
"""
import dataclasses
import difflib
import inspect
import json
import re
import shutil
import sys
import textwrap
import types
import typing
from pathlib import Path

from runtime import UsageError

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
GROUP_LINE = re.compile(r"\s+#\s*-{2,}\s*(.+?)\s*-{2,}\s*$")  # `    # --- speed ---` inside the class body
FIELD_LINE = re.compile(r"\s+(\w+)\s*:[^#]*#\s*(.*)$")  # `    name: type = default  # comment`
UNGROUPED = "other"
HELP_COLUMN_MAX = 32  # a longer `--key=default` gets its comment on the next line


def field_notes(cls) -> dict[str, tuple[str, str]]:
    """(group, comment) of each field, read from the source of `cls` and of the dataclasses it derives from."""
    notes = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        group = UNGROUPED
        for line in inspect.getsource(klass).splitlines():
            if heading := GROUP_LINE.match(line):
                group = heading.group(1)
            elif match := FIELD_LINE.match(line):
                notes[match.group(1)] = (group, match.group(2).strip())
    return notes


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
        raise UsageError(f"--{key}={text}: expected true or false (or write --{key} / --no-{key})")
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            raise UsageError(f"--{key}={text}: expected {kind.__name__}") from None
    raise TypeError(f"config field {key}: unsupported type {kind}")


def default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def option_with_default(f: dataclasses.Field, kind) -> str:
    """The option with its default: `--lr=0.01`, and `--compile (on)` or `--compile (off)` for a flag (its
    comment says what it does when on)."""
    default = default_of(f)
    if kind is bool:
        return f"--{f.name} ({'on' if default else 'off'})"
    return f"--{f.name}={default}"


def help_text(cls, description: str | None, width: int | None = None) -> str:
    """The options of `cls` grouped as in its source, each with its default and comment in aligned columns."""
    width = width or min(shutil.get_terminal_size((120, 24)).columns, 120)
    hints, notes = typing.get_type_hints(cls), field_notes(cls)
    groups: dict[str, list[tuple[str, str]]] = {}
    for f in dataclasses.fields(cls):
        group, comment = notes.get(f.name, (UNGROUPED, ""))
        groups.setdefault(group, []).append((option_with_default(f, hints[f.name]), comment))
    widths = [len(option) for rows in groups.values() for option, _ in rows]
    column = max([w for w in widths if w <= HELP_COLUMN_MAX] or [HELP_COLUMN_MAX]) + 4  # longer ones wrap
    lines = [description.strip(), ""] if description else []
    lines.append("options, each shown with its default (--key=value or --key value; on/off: --key, --no-key):")
    named = [g for g in groups if g != UNGROUPED] + ([UNGROUPED] if UNGROUPED in groups and len(groups) > 1 else [])
    for group in named or list(groups):
        if named:
            lines.append(f"\n{group}:")
        for option, comment in groups[group]:
            lines += help_row(option, comment, column, width)
    return "\n".join(lines)


def help_row(option: str, comment: str, column: int, width: int) -> list[str]:
    """`  --option   comment`, the comment wrapped at `width` and aligned at `column`."""
    wrapped = textwrap.wrap(comment, max(width - column, 30)) or [""]
    if len(option) + 4 > column:  # too long for the column: the comment starts on the next line
        return [f"  {option}"] + [" " * column + text for text in wrapped]
    return [f"  {option:<{column - 2}}{wrapped[0]}".rstrip()] + [" " * column + text for text in wrapped[1:]]


def unknown_option(key: str, known: set[str]) -> UsageError:
    nearest = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"did you mean --{nearest[0]}?" if nearest else f"see --help for the {len(known)} known options"
    return UsageError(f"unknown option --{key} ({hint})")


def parse_overrides(cls, argv: list[str], description: str | None = None, positional: list | None = None) -> dict:
    """The fields of `cls` that `argv` sets, converted to their types: {name: value}. `--help` prints the options
    and exits. With a `positional` list, the words that are no option's value go there, and all after `--`; without,
    such a word is a usage error and `--` is skipped."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    overrides, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--" and positional is not None:
            positional += args
            break
        if arg == "--":  # what separates a launcher's options (torchrun's) from ours, if it is passed on
            continue
        if arg in ("-h", "--help"):
            print(help_text(cls, description))
            sys.exit(0)
        if not arg.startswith("--") and positional is not None:
            positional.append(arg)
            continue
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}: options are written --key=value or --key value "
                             "(see --help)")
        key, has_value, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in known and key.startswith("no_") and not has_value:
            key, has_value, text = key[3:], True, "false"  # --no-flag
            if key in known and hints[key] is not bool:
                raise UsageError(f"--no-{key}: --{key} is not a true/false option; write --{key}=value")
        if key not in known:
            raise unknown_option(arg[2:].partition("=")[0].replace("-", "_"), known)
        if not has_value and hints[key] is bool:
            if args and not args[0].startswith("--") and positional is None:
                raise UsageError(f"--{key} takes no separate value ({args[0]!r}): write --{key}, --no-{key} or "
                                 f"--{key}=true|false")
            text = "true"
        elif not has_value:
            if not args or args[0].startswith("--"):
                raise UsageError(f"--{key} needs a value: --{key}=... or --{key} ...")
            text = args.pop(0)
        overrides[key] = convert(text, hints[key], key)
    return overrides


def parse_config(cls, argv: list[str] | None = None, description: str | None = None, positional: list | None = None):
    """Build `cls` from its defaults overridden by the options in `argv` (sys.argv[1:] when None); `positional` as
    in parse_overrides. A UsageError raised by the class itself (a range check in `__post_init__`) reaches the
    caller as it is."""
    return cls(**parse_overrides(cls, sys.argv[1:] if argv is None else argv, description, positional))


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved configuration as JSON (next to the results it produced)."""
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
