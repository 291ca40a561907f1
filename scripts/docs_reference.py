"""The reference pages of the documentation site, rendered from what the code declares: the CLI from
its argument parser, the HTTP API from the OpenAPI document the server serves, the atlas's tables
from ``store/schema.py`` and the settings from ``AtlasConfig``. A page written by hand drifts from
the code; these cannot. ``mkdocs build`` runs this file (mkdocs-gen-files, see ``mkdocs.yml``). The
Python API page is the public surface of ``api/library.py`` read with ``inspect``: mkdocstrings' static
reader cannot follow the package's folder mapping (``featureatlas.api`` is ``api/``, pyproject).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import typing
from typing import Any, Callable

import mkdocs_gen_files
from featureatlas.api import library
from featureatlas.api.app import openapi_document
from featureatlas.api.cli import build_parser
from featureatlas.ingest.config import GROUPS, PROFILES, SETTINGS, base_type, default_of, flag
from featureatlas.store import schema

HELP_COLUMNS = "100"  # argparse wraps help to $COLUMNS: a fixed width gives the same page on every machine
HTTP_METHODS = ("get", "post", "put", "patch", "delete")


def _cell(text: Any) -> str:
    """Text fit for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def cli_page() -> str:
    os.environ["COLUMNS"] = HELP_COLUMNS
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and a.dest == "command")
    parts = ["# Command line\n",
             "Every command is `featureatlas COMMAND`; `featureatlas COMMAND --help` prints what is below. Settings of "
             "`ingest` are also keys of a TOML file (`--config`): see [Configuration](config.md).\n",
             "```text\n" + parser.format_help() + "```\n"]
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, command in sub.choices.items():
        parts.append(f"## {name}\n\n{helps.get(name, '')}\n\n```text\n{command.format_help()}```\n")
    return "\n".join(parts)


def _type(spec: dict[str, Any], components: dict[str, Any]) -> str:
    """A schema in a few words: its type, or the component it names."""
    if "$ref" in spec:
        name = spec["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})" if name in components else name
    if "oneOf" in spec or "anyOf" in spec:
        return " or ".join(_type(s, components) for s in spec.get("oneOf") or spec["anyOf"])
    kind = spec.get("type", "any")
    if kind == "array":
        return f"array of {_type(spec.get('items', {}), components)}"
    return "enum: " + ", ".join(f"`{v}`" for v in spec["enum"]) if "enum" in spec else str(kind)


def _number(value: float) -> str:
    """The schema writes integer limits as floats (2147483647.0)."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def _limits(spec: dict[str, Any]) -> str:
    words = {"minimum": "≥", "maximum": "≤", "exclusiveMinimum": ">", "exclusiveMaximum": "<",
             "minLength": "length ≥", "maxLength": "length ≤", "minItems": "items ≥", "maxItems": "items ≤"}
    out = [f"{word} {_number(spec[key])}" for key, word in words.items() if key in spec]
    if "default" in spec:
        out.append(f"default `{json.dumps(spec['default'])}`")
    return ", ".join(out)


def http_page() -> str:
    doc = openapi_document()
    components = doc.get("components", {}).get("schemas", {})
    parts = ["# HTTP API\n",
             "Rendered from the OpenAPI document a server serves at `/schema` (`featureatlas serve`). Errors are "
             "JSON [ErrorBody](#errorbody). With `--token`, every route under `/api` and `/schema` needs "
             "`Authorization: Bearer TOKEN`; see [Serve an atlas for a team](../how-to/serve.md).\n"]
    for path, ops in doc["paths"].items():
        for method in HTTP_METHODS:
            if method not in ops:
                continue
            op = ops[method]
            parts.append(f"## {method.upper()} {path}\n")
            if op.get("description"):
                parts.append(op["description"].strip() + "\n")
            params = op.get("parameters", [])
            if params:
                parts.append("| parameter | in | type | required | limits | description |\n| --- | --- | --- | --- | --- | --- |")
                for p in params:
                    spec = p.get("schema", {})
                    parts.append(f"| `{p['name']}` | {p['in']} | {_cell(_type(spec, components))} | "
                                 f"{'yes' if p.get('required') else 'no'} | {_cell(_limits(spec))} | "
                                 f"{_cell(p.get('description', spec.get('description', '')))} |")
                parts.append("")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                parts.append(f"Body: {_type(body, components)}\n")
            responses = [f"`{code}` {_cell(r.get('description', ''))}" for code, r in op.get("responses", {}).items()]
            parts.append("Answers: " + "; ".join(responses) + "\n")
    parts.append("## Bodies and answers\n")
    for name, spec in components.items():
        parts.append(f"### {name}\n")
        props = spec.get("properties", {})
        if not props:
            parts.append(f"{_type(spec, components)}\n")
            continue
        required = set(spec.get("required", []))
        parts.append("| field | type | required | limits |\n| --- | --- | --- | --- |")
        for field, fspec in props.items():
            parts.append(f"| `{field}` | {_cell(_type(fspec, components))} | {'yes' if field in required else 'no'} | "
                         f"{_cell(_limits(fspec))} |")
        parts.append("")
    return "\n".join(parts)


def _arrow(column: schema.Column) -> str:
    # d_model is the model's width; 576 (SmolLM2-135M) stands in for it and is named so.
    kind = column.type(576) if callable(column.type) else column.type
    return str(kind).replace("576", "d_model")


def schema_page() -> str:
    parts = ["# Tables\n",
             "Every table of an atlas, from `store/schema.py`, where each is declared once. **SQL**: the column is "
             "also in DuckDB, so `featureatlas sql` and `POST /api/sql` see it (vectors and lists stay in LanceDB). "
             "**Re-label**: `featureatlas label` rewrites it. How the files are laid out: "
             "[The atlas on disk](atlas-on-disk.md).\n"]
    lance = {schema.FEATURES.name, schema.EXAMPLES.name, schema.WINDOWS.name}
    tables = {t.name: t for t in (schema.FEATURES, schema.EXAMPLES, *schema.DUCKDB_TABLES)}
    for table in tables.values():
        where = [store for store, holds in (("LanceDB", table.name in lance),
                                            ("DuckDB", table in schema.DUCKDB_TABLES)) if holds]
        parts.append(f"## {table.name}\n\n{table.doc[0].upper() + table.doc[1:]}. In {' and '.join(where)}.\n")
        parts.append("| column | type | SQL | re-label | what it holds |\n| --- | --- | --- | --- | --- |")
        for c in table.columns:
            sql = "key" if c.key else "yes" if c.sql and table in schema.DUCKDB_TABLES else ""
            parts.append(f"| `{c.name}` | `{_cell(_arrow(c))}` | {sql} | {'yes' if c.labels else ''} | {_cell(c.doc)} |")
        parts.append("")
        if table in schema.DUCKDB_TABLES:
            parts.append(f"```sql\n{table.ddl()}\n```\n")
    return "\n".join(parts)


def config_page() -> str:
    parts = ["# Configuration\n",
             "Every setting of `AtlasConfig` (`ingest/config.py`), by group. Each is the `featureatlas ingest` flag of "
             "the same name (`d_sae` is `--d-sae`) and a key of a TOML file given with `--config`, flat (`d_sae = 8192`) "
             "or in its group's table (`[train]`). Defaults come first, then the profile, then the file, then flags. "
             "**Key**: a change re-runs the stage that reads it and everything after; the others (batch sizes, "
             "threads, paths) cannot change an output.\n"]
    for group, cls in GROUPS.items():
        parts.append(f"## [{group}]\n")
        parts.append("| setting | flag | type | default | key | what it does |\n| --- | --- | --- | --- | --- | --- |")
        for f in dataclasses.fields(cls):
            kind = base_type(SETTINGS[f.name][1])
            name = getattr(kind, "__name__", None) or str(kind)
            if typing.get_origin(kind) is list:
                name = f"list of {typing.get_args(kind)[0].__name__}"
            parts.append(f"| `{f.name}` | `{flag(f.name)}` | {name} | `{_cell(json.dumps(default_of(f)))}` | "
                         f"{'yes' if f.metadata['key'] else ''} | {_cell(f.metadata['help'])} |")
        parts.append("")
    parts.append("## Profiles\n\n`--profile NAME` sets these before the file and the flags:\n")
    for name, values in PROFILES.items():
        settings = ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in values.items()) or "the defaults above"
        parts.append(f"- **{name}**: {settings}")
    return "\n".join(parts) + "\n"


def _doc(obj: Any) -> str:
    """A docstring as Markdown: reST's ``literal`` is Markdown's `literal`."""
    return re.sub(r"``([^`]+)``", r"`\1`", inspect.getdoc(obj) or "")


class _Written:
    """An annotation as its source text: inspect would print a postponed one (a str) with quotes."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _signature(fn: Callable[..., Any]) -> str:
    sig = inspect.signature(fn)
    params = [p.replace(annotation=_Written(p.annotation)) if isinstance(p.annotation, str) else p
              for name, p in sig.parameters.items() if name != "self"]
    ret = sig.return_annotation
    return str(sig.replace(parameters=params, return_annotation=_Written(ret) if isinstance(ret, str) else ret))


def _public(cls: type) -> list[tuple[str, Any]]:
    return [(name, member) for name, member in vars(cls).items() if not name.startswith("_")]


def python_page() -> str:
    parts = ["# Python API\n",
             "`import featureatlas as fa`; `fa.open(path)` is the one way to open an atlas from Python. Rendered from "
             "the signatures and docstrings of `api/library.py`. A walk through all of it: [the notebook](../python.ipynb).\n",
             f"## fa.open\n\n```python\nfa.open{_signature(library.open)}\n```\n\n{_doc(library.open)}\n"]
    for cls in (library.OpenAtlas, library.Result):
        parts.append(f"## {cls.__name__}\n\n{_doc(cls)}\n")
        for name, member in _public(cls):
            if isinstance(member, property):
                parts.append(f"### .{name}\n\n*property*. {_doc(member.fget)}\n")
            elif callable(member):
                parts.append(f"### .{name}\n\n```python\n{name}{_signature(member)}\n```\n\n{_doc(member)}\n")
    return "\n".join(parts)


PAGES: dict[str, Callable[[], str]] = {
    "reference/python.md": python_page,
    "reference/cli.md": cli_page,
    "reference/http.md": http_page,
    "reference/tables.md": schema_page,
    "reference/config.md": config_page,
}

for page, render in PAGES.items():
    with mkdocs_gen_files.open(page, "w") as out:
        out.write(render())
