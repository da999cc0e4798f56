"""The config file with every key at its default, commented out: what `tandem config default` prints.

It is made from `core.settings`' dataclasses and the documentation on their
fields, so it cannot drift from what the daemon reads: a field without
documentation (or an explicit "not a key") stops the rendering, and a test reads
the printed file back with every key uncommented and compares it to the defaults.

Documentation lines start with "# ", settings with "#" and no space, so
uncommenting a setting is deleting one character.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from core.settings import Config

HEADER = """\
# Tandem's configuration ({path}).
# Every key is shown at its default, commented out: uncomment a line to change it. An unknown key or a
# bad value stops the daemon with the key's name. Printed by `tandem config default`.
"""


def _literal(value: Any) -> str:
    """A TOML literal for a default value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    raise TypeError(f"no TOML literal for {value!r}")


def _documented(cls: type) -> list[tuple[dataclasses.Field[Any], dict[str, str]]]:
    """The fields of `cls` that are config keys, each with its documentation; undocumented ones are an error."""
    keys = []
    for f in dataclasses.fields(cls):
        if "internal" in f.metadata:
            continue
        if "doc" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no documentation: give it metadata=doc(...) or NOT_A_KEY")
        keys.append((f, dict(f.metadata)))
    return keys


def _table(lines: list[str], name: str, section: object, doc: str) -> None:
    """`[name]` with its keys, then its sub-tables."""
    if name:
        lines += ["", f"# {doc}"] if doc else [""]
        lines.append(f"#[{name}]")
    later: list[tuple[str, object, str]] = []
    for f, meta in _documented(type(section)):
        key = meta["key"] or f.name
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            later.append((f"{name}.{key}" if name else key, value, meta["doc"]))
        elif value is None:
            lines.append(f"# {key}: {meta['doc']}; unset: {meta['unset']}")
        else:
            lines.append(f"#{key} = {_literal(value)}  # {meta['doc']}")
    for path, value, doc in later:
        if isinstance(value, dict):
            _entries(lines, path, value, doc)
        else:
            _table(lines, path, value, doc)


def _entries(lines: list[str], name: str, entries: dict[str, Any], doc: str) -> None:
    """A table whose keys are names the operator chooses: each entry its own table, or a key of this one."""
    if entries and all(dataclasses.is_dataclass(v) for v in entries.values()):
        lines += ["", f"# {doc}"]
        for entry_name, entry in entries.items():
            _table(lines, f"{name}.{entry_name}", entry, "")
        return
    lines += ["", f"# {doc}", f"#[{name}]"]
    lines += [f"#{json.dumps(key)} = {_literal(value)}" for key, value in entries.items()]


def default_config_text(config: Config | None = None, path: str = "/etc/tandem/tandem.toml") -> str:
    """The file, for `config` (the embedded defaults unless given)."""
    lines = [HEADER.format(path=path)]
    _table(lines, "", config or Config(), "")
    return "\n".join(lines) + "\n"
