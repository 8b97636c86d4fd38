"""The configuration reference, generated from the schema (launch/schema.py): every key, its
type, its default, its valid values and its one-line doc (the comment on the field's line), and
the options of each config group (configs/<group>/*.yaml).

    python -m launch.config_reference           # rewrites docs/configuration.md
    python -m launch.config_reference --check   # exit 1 when docs/configuration.md is stale
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path

from launch import schema
from launch.config import CONFIG_DIR

OUT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
HEADER = """# Configuration reference

Generated from `launch/schema.py` by `python -m launch.config_reference` (a test fails when this
file is stale). Every key can be overridden on the command line (`parallel.tp=2`); a group is
chosen with `group=option` (`model=tiny_moe`). Numbers outside their range, unknown keys (also
those added with `+`) and values outside a closed choice stop the launch before anything
starts, with exit code 2 (docs/failure-modes.md). The group files in `configs/` hold only what
differs from these defaults.
"""


def field_docs(cls) -> dict[str, str]:
    """Field name -> the comment on its line in the class's source."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^#]*?#\s*(.+)$", line)
        if match:
            docs[match.group(1)] = match.group(2).strip()
    return docs


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()
        return sorted(value) if isinstance(value, dict) else value  # a dict of schemas: its keys
    return f.default


def _show(value) -> str:
    if value == "???":
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)) and not value:
        return "{}" if isinstance(value, dict) else "[]"
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def _valid(tp, f: dataclasses.Field) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    kind = args[0] if args else tp
    if isinstance(kind, type) and issubclass(kind, schema.Choice):
        return ", ".join(f"`{m.value}`" for m in kind)
    if "range" in f.metadata:
        return f.metadata["range"].describe()
    return {bool: "true, false", str: "a string"}.get(kind, "")


def rows(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, default, valid values, doc) of every field of `cls` and its nested schemas."""
    out, hints, docs = [], typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out += rows(tp, f"{key}.")
        elif origin in (dict, list) and args and dataclasses.is_dataclass(args[-1]):
            out.append((key, _show(_default(f)), "", docs.get(f.name, "")))
            out += rows(args[-1], f"{key}.<class>." if origin is dict else f"{key}[i].")
        else:
            out.append((key, _show(_default(f)), _valid(tp, f), docs.get(f.name, "")))
    return out


def groups() -> list[tuple[str, list[str]]]:
    return [(d.name, sorted(p.stem for p in d.glob("*.yaml"))) for d in sorted(CONFIG_DIR.iterdir()) if d.is_dir()]


def render() -> str:
    lines = [HEADER, "## Groups", "", "| group | options |", "| --- | --- |"]
    lines += [f"| `{name}=` | {', '.join(f'`{o}`' for o in options)} |" for name, options in groups()]
    lines += ["", "## Keys", "", "| key | default | valid | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{key}` | {default} | {valid} | {doc.replace('|', '/')} |"
              for key, default, valid, doc in rows(schema.QuintetConfig)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the reference is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python -m launch.config_reference", file=sys.stderr)
            sys.exit(1)
        return
    OUT.write_text(text)
    print(OUT)


if __name__ == "__main__":
    main()
