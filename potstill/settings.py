"""A command's settings dataclass is the one source of its flags, config-file keys, defaults and help.

Each field is declared with `setting(default, help=...)`. From the fields come:

- the command's CLI options (`settings_options`): `--field-name` (or the field's `flag`), its help
  with the default written as click writes one, `[a|b|c]` choices from a `Literal`, and hidden old
  spellings (`aliases`) that still work and print a one-line note;
- the keys of a YAML, TOML or JSON `--config` file: the field names (`-` may stand for `_`);
- one loader (`load_settings`): defaults, then the file, then the flags typed, each value coerced
  to its field's type and checked, every mistake one line naming the flag or key;
- the job service's schema (teacher_gen/service/spec.py) and the options reference
  (`options_reference`, written to docs/reference/options.md by `python -m potstill.cli.reference`).

Only flags that are not settings (`--config`, `--json`, `--threads`) are declared by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any, Literal

import typer

from potstill.store.errors import PotstillError

REQUIRED = "[required]"
REQUIRED_OR_CONFIG = "[required, here or in --config]"
_META = "potstill.setting"


@dataclass(frozen=True)
class Setting:
    """What a field says about itself beyond its type and default."""

    help: str = ""
    flag: str | None = None  # the flag, when not --field-name
    aliases: tuple[str, ...] = ()  # old flags, still accepted (hidden); their key spelling works in files
    metavar: str | None = None
    shown_default: str | None = None  # the default as --help words it, when the value alone would not say it
    required: bool = False  # must be non-empty, here or in --config
    parse: Callable[[Any], Any] | None = None  # turns a file's richer value (a mapping, a list) into the field's
    # The valid values, asked when needed, for a text setting whose values a registry holds (target kinds,
    # codecs: a kind registered at run time is a valid choice); a `Literal` type says fixed ones itself.
    choices: Callable[[], tuple[str, ...]] | None = None
    env: str | None = None  # an environment variable that stands for the flag when it is not typed


def setting(default: Any = MISSING, *, factory: Callable[[], Any] | None = None, help: str,
            flag: str | None = None, aliases: tuple[str, ...] = (), metavar: str | None = None,
            shown_default: str | None = None, required: bool = False,
            parse: Callable[[Any], Any] | None = None,
            choices: Callable[[], tuple[str, ...]] | None = None, env: str | None = None) -> Any:
    """A dataclass field that is a setting: its default (or `factory`) and how it shows on the command line."""
    info = Setting(help=help, flag=flag, aliases=aliases, metavar=metavar, shown_default=shown_default,
                   required=required, parse=parse, choices=choices, env=env)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_META: info})
    return dataclasses.field(default=default, metadata={_META: info})


def same_as(cls: type, name: str, **changes: Any) -> Any:
    """A field with the default and help of `cls`'s field `name` (a setting two commands share)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    info = dataclasses.replace(info_of(f), **changes)
    if f.default_factory is not MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata={_META: info})
    return dataclasses.field(default=f.default, metadata={_META: info})


def info_of(f: dataclasses.Field) -> Setting:
    return f.metadata.get(_META) or Setting()


def flag_of(f: dataclasses.Field) -> str:
    return info_of(f).flag or "--" + f.name.replace("_", "-")


def fields_of(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type hint) for every setting of `cls`."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _key(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def note(message: str) -> None:
    """A one-line notice on stderr (an old spelling that still works)."""
    print(f"note: {message}", file=sys.stderr)


# -- reading and checking ----------------------------------------------------------------------
def read_config_file(path: str, error: type[Exception] = PotstillError, section: str | None = None) -> dict[str, Any]:
    """The settings a YAML (.yaml, .yml), TOML (.toml) or JSON (.json) file holds, keys with '_'.

    A file may keep them under a `section` table (`[generate]`, `serve:`)."""
    if not os.path.isfile(path):
        raise error(f"config file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            import tomllib

            data = tomllib.loads(raw.decode())
        elif ext == ".json":
            data = json.loads(raw)
        else:
            import yaml

            data = yaml.safe_load(raw)
    except Exception as e:  # each parser has its own error types; all mean "malformed file" to a user
        detail = " ".join(str(e).split())  # YAML's messages span lines, with a caret under the column
        raise error(f"config file {path}: cannot parse ({type(e).__name__}: {detail})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"config file {path}: expected a mapping of settings at the top level")
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_settings(cls: type, config_file: str | None = None, overrides: dict[str, Any] | None = None, *,
                  error: type[Exception] = PotstillError, section: str | None = None) -> Any:
    """An instance of `cls`: its defaults, then `config_file`, then the non-None `overrides` (the flags
    typed), each coerced to its field's type; then `validate()`. Old keys work, with a note."""
    names = {f.name: (f, hint) for f, hint in fields_of(cls)}
    values: dict[str, Any] = {}
    if config_file:
        values = by_field_name(cls, read_config_file(config_file, error, section), f"config file {config_file}", error)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(by_field_name(cls, given, "settings", error))
    kwargs = {name: coerce(name, value, names[name][1], error, info_of(names[name][0]))
              for name, value in values.items()}
    config = cls(**kwargs)
    config.validate()
    return config


def by_field_name(cls: type, values: dict[str, Any], where: str, error: type[Exception]) -> dict[str, Any]:
    """`values` keyed by `cls`'s field names: an old key becomes its field's, with a note; an unknown key
    fails, naming `where` the values came from."""
    known = {f.name for f in dataclasses.fields(cls)}
    old = {_key(a): f for f in dataclasses.fields(cls) for a in info_of(f).aliases if _key(a) not in known}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in known:
            name = key
        elif key in old:
            name = old[key].name
            note(f"{where}: {key} is now {name}")
        else:
            raise error(f"{where}: unknown setting {key!r}")
        if name in out and out[name] != value:
            raise error(f"{where}: {name} and {key} (its old spelling) were both given, with different values")
        out[name] = value
    return out


def coerce(name: str, value: Any, hint: Any, error: type[Exception] = PotstillError,
           info: Setting | None = None, flag: str | None = None) -> Any:
    """A file, CLI or API value turned into a setting's type, or one line naming the flag."""
    flag = flag or (info and info.flag) or "--" + name.replace("_", "-")
    if info and info.parse and value is not None:
        value = info.parse(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        inner = dataclasses.replace(info, parse=None) if info else None  # parsed once, above
        return coerce(name, value, next(a for a in args if a is not type(None)), error, inner, flag)
    if origin is Literal or (info and info.choices):
        valid = args if origin is Literal else info.choices()  # type: ignore[union-attr, misc]
        if value not in valid:
            raise error(f"{flag} must be one of {', '.join(map(str, valid))}; got {value!r}")
        return value
    if origin is list:
        return _coerce_list(value, args[0], flag, error)
    try:
        if hint is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool | int):
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):  # no setting means anything by NaN or infinity ("never" is none)
                raise error(f"{flag} must be a finite number, got {number}")
            return number
        if hint is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError(value)
            return _sound_text(str(value), flag, error)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond any float
        raise error(f"{flag}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def _coerce_list(value: Any, item: Any, flag: str, error: type[Exception]) -> list[Any]:
    if item is int:
        return parse_int_list(value, flag, error)
    items = [value] if isinstance(value, str) else value  # a repeatable flag: one value, or a list
    if not isinstance(items, list | tuple) or not all(isinstance(x, str) and x for x in items):
        raise error(f"{flag}: expected a string or a list of strings, got {value!r}")
    return [_sound_text(x, flag, error) for x in items]


def _sound_text(text: str, flag: str, error: type[Exception]) -> str:
    """`text`, refused when no file name or UTF-8 file can hold it: a lone surrogate such as "\\ud800",
    which JSON and YAML can spell (the undecodable bytes of a typed file name, "\\udc80".."\\udcff", pass)."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("unicode_escape").decode("ascii")
        raise error(f"{flag}: {text!r} holds a lone surrogate ({bad}), which is not valid Unicode") from None
    return text


def parse_int_list(value: Any, flag: str, error: type[Exception] = PotstillError) -> list[int]:
    """'4,8,-1', '4 8 -1', [4, 8, -1] or 4 -> [4, 8, -1]."""
    if value is None or value == "":
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    try:
        if isinstance(items, str | bytes) or any(isinstance(x, bool | float) for x in items):
            raise ValueError(value)
        return [int(x) for x in items]
    except (TypeError, ValueError):
        raise error(f"{flag}: expected integers such as '4,8,-1', got {value!r}") from None


def check_settings(config: Any, error: type[Exception] = PotstillError) -> None:
    """What every settings class checks the same way: required settings given, `Literal` choices kept."""
    for f, hint in fields_of(type(config)):
        value = getattr(config, f.name)
        if info_of(f).required and not value:
            raise error(f"{flag_of(f)} is required")
        choices = choices_of(f, hint)
        if choices and value is not None and value not in choices:
            raise error(f"{flag_of(f)} must be one of {', '.join(map(str, choices))}; got {value!r}")


def choices_of(f: dataclasses.Field, hint: Any) -> tuple[Any, ...]:
    """A setting's valid values: its registry's (`Setting.choices`) or its `Literal` type's; () when free."""
    info = info_of(f)
    return tuple(info.choices()) if info.choices else _choices(hint)


def _choices(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _base(hint: Any) -> Any:
    """`int | None` -> int; other hints as they are."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


# -- the command line --------------------------------------------------------------------------
def default_text(value: object, flag: str | None = None) -> str:
    """How a default is shown: booleans as the flag that is on (`tail`, `no-tail`), like click; strings
    with outer spaces, and empty ones, quoted so they can be seen."""
    if isinstance(value, bool) and flag and "/" in flag:
        on, off = (part.strip().lstrip("-") for part in flag.split("/", 1))
        return on if value else off
    if isinstance(value, str) and (value == "" or value != value.strip()):
        return repr(value)
    return "none" if value is None else str(value)


def shown_default(f: dataclasses.Field) -> str:
    """The default of a setting as --help shows it (`[default: X]` without the brackets)."""
    info = info_of(f)
    if info.shown_default is not None:
        return info.shown_default
    if f.default_factory is not MISSING:
        return default_text(f.default_factory() or None)
    flag = flag_of(f)
    return default_text(f.default, f"{flag}/--no-{flag[2:]}" if isinstance(f.default, bool) else None)


def help_text(f: dataclasses.Field, config_file: bool = True) -> str:
    """The help line of a setting's option, ending in `[default: X]` or the required mark (which names
    --config where the command has one)."""
    info = info_of(f)
    required = REQUIRED_OR_CONFIG if config_file else REQUIRED
    tail = required if info.required else f"[default: {shown_default(f)}]"
    return f"{info.help}  {tail}" if info.help else tail


def cli_type(hint: Any) -> Any:
    """The type typer parses a setting's flag as (choices and lists of integers as text, checked later)."""
    base = _base(hint)
    if typing.get_origin(base) is list:
        return list[str] if typing.get_args(base)[0] is str else str
    return base if base in (bool, int, float) else str


def metavar_of(f: dataclasses.Field, hint: Any) -> str | None:
    choices = choices_of(f, hint)
    return info_of(f).metavar or (f"[{'|'.join(map(str, choices))}]" if choices else None)


def option_of(f: dataclasses.Field, hint: Any, config_file: bool = True) -> Any:
    """The typer option of a setting. Its default is None so that only typed flags override a file. Its
    environment variable, if any, counts as typed; the shown default names it (`Setting.shown_default`)."""
    flag = flag_of(f)
    decl = f"{flag}/--no-{flag[2:]}" if cli_type(hint) is bool else flag
    return typer.Option(None, decl, help=help_text(f, config_file), metavar=metavar_of(f, hint), show_default=False,
                        envvar=info_of(f).env, show_envvar=False)


def settings_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command one option per setting of `cls` (and a hidden one per old spelling).

    The command declares its other options itself and a keyword `flags`: the settings typed on the
    command line, by field name (old spellings mapped, with a note), for `load_settings`."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(fn, eval_str=True)
        config_file = "config" in own.parameters  # the command takes --config
        generated: list[inspect.Parameter] = []
        old_flags: dict[str, tuple[str, str]] = {}  # parameter -> (field, old flag)
        for f, hint in fields_of(cls):
            generated.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                               default=option_of(f, hint, config_file), annotation=cli_type(hint)))
            for i, old in enumerate(info_of(f).aliases):
                param = f"{f.name}__old{i}"
                old_flags[param] = (f.name, old)
                decl = f"{old}/--no-{old[2:]}" if cli_type(hint) is bool else old
                generated.append(inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY, annotation=cli_type(hint),
                                                   default=typer.Option(None, decl, hidden=True)))
        names = {f.name: f for f in dataclasses.fields(cls)}

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            flags = {p.name: kwargs.pop(p.name) for p in generated}
            for param, (name, old) in old_flags.items():
                value = flags.pop(param)
                if value is None or (isinstance(value, list | tuple) and not value):
                    continue
                new = flag_of(names[name])
                if flags[name] not in (None, [], ()) and flags[name] != value:
                    raise PotstillError(f"{new} and {old} (its old spelling) were both given, with different values")
                note(f"{old} is now {new}")
                flags[name] = value
            # a repeatable flag not given at all is None too, so the file's list stands
            flags = {k: (v or None) if isinstance(v, list | tuple) else v for k, v in flags.items()}
            return fn(**kwargs, flags=flags)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own.parameters.values() if p.name != "flags"]
        first = 1 if params and params[0].name == "config" else 0  # --config, then the settings, then the rest
        command.__signature__ = own.replace(  # type: ignore[attr-defined]
            parameters=params[:first] + generated + params[first:])
        return command

    return decorate


# -- the reference -----------------------------------------------------------------------------
def type_text(f: dataclasses.Field, hint: Any) -> str:
    choices = choices_of(f, hint)
    if choices:
        return " | ".join(f"`{c}`" for c in choices)
    base = _base(hint)
    if typing.get_origin(base) is list:
        return "integers (`4,8,-1`)" if typing.get_args(base)[0] is int else "text, repeatable"
    return {bool: "flag", int: "integer", float: "number", str: "text"}.get(base, str(base))


def _reference_default(f: dataclasses.Field) -> str:
    info = info_of(f)
    if info.required:
        return "required"
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    shown = shown_default(f)
    empty = f.default_factory is not MISSING or f.default is None  # shown as "none" or in words
    prose = empty or (info.shown_default is not None and not shown.startswith("'"))
    return shown if prose else f"`{shown}`"


def options_reference(commands: list[tuple[str, type, str, bool]]) -> str:
    """Markdown: for each (command, settings class, intro, whether it takes --config), a table of its settings."""
    lines = ["# Options reference", "",
             "Every setting of each command below: its flag, the key that sets it in a `--config` file",
             "(YAML, TOML or JSON; `-` may stand for `_`), what it takes,",
             "its default and what it does. A flag given on the command line wins over the file. An old",
             "name (\"was\") still works and prints a note naming the new one.",
             "Written from the settings themselves by `python -m potstill.cli.reference`.", ""]
    for command, cls, intro, config_file in commands:
        lines += [f"## potstill {command}", "", intro, "",
                  "| Flag | Config key | Takes | Default | What it does |", "|---|---|---|---|---|"]
        for f, hint in fields_of(cls):
            info = info_of(f)
            flag = flag_of(f)
            shown = f"`{flag}` / `--no-{flag[2:]}`" if cli_type(hint) is bool else f"`{flag}`"
            key = f"`{f.name}`" if config_file else "—"
            if info.aliases:
                shown += " (was " + ", ".join(f"`{a}`" for a in info.aliases) + ")"
                old_keys = [_key(a) for a in info.aliases if _key(a) != f.name]
                key += " (was " + ", ".join(f"`{k}`" for k in old_keys) + ")" if old_keys and key != "—" else ""
            cells = [shown, key, type_text(f, hint), _reference_default(f), info.help]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)
