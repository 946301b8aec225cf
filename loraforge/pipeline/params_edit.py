"""Editing params.yaml: new values checked against the stages' own `Params`, set in the file's
text without losing its comments, order or layout, written, and the whole file validated again.

ruamel.yaml's round-trip mode keeps what a person wrote (comments, `null`s, flow lists, the
file's 2/4/2 indentation); new values are written so that PyYAML's `safe_load`, which the rest
of loraforge reads params.yaml with, reads them back as the same types (`1.0e-06`, not `1e-06`,
which YAML 1.1 reads as a string).
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Callable

from loraforge.errors import InputError
from loraforge.pipeline.params import validate_stage
from loraforge.pipeline.spec import Pipeline


def refuse_invalid(
    values: dict[str, dict[str, Any]], raw: dict[str, Any], pipeline: Pipeline
) -> tuple[dict[str, str], list[str]]:
    """Take out of `values` (in place) each one a stage's `Params` refuses, until the rest validate
    on top of the file.

    Args:
        values: section -> key -> new value.
        raw: params.yaml as read (`loraforge.pipeline.params.read_params_file`).
        pipeline: the project's stages, whose sections are validated.

    Returns:
        `section.key` -> the schema's message for each value taken out, and the problems left
        (in keys of the file itself).
    """
    refused: dict[str, str] = {}
    while True:
        merged = dict(raw)
        for section, items in values.items():
            merged[section] = {**(raw[section] if isinstance(raw.get(section), dict) else {}), **items}
        problems = [p for stage in pipeline.stages.values() for p in validate_stage(stage, merged)[1]]
        named = [(sec, key, p) for p in problems for sec, key in re.findall(r"`(\w+)\.(\w+)", p)]
        bad = {(sec, key): p for sec, key, p in named if key in values.get(sec, {})}
        if not bad:
            return refused, list(dict.fromkeys(problems))
        for (section, key), problem in bad.items():
            values[section].pop(key)
            refused[f"{section}.{key}"] = problem.split("Value error, ")[-1]  # a model validator's, without the dict


def _representer() -> type:
    """ruamel's round-trip representer, in a subclass so ruamel's own (and DVC's) stays as it is."""
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):
        pass

    def represent_float(rep: Any, value: float) -> Any:
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
        text = {"inf": ".inf", "-inf": "-.inf", "nan": ".nan"}.get(text, text)
        return rep.represent_scalar("tag:yaml.org,2002:float", text)

    def represent_none(rep: Any, value: None) -> Any:
        return rep.represent_scalar("tag:yaml.org,2002:null", "null")

    def represent_str(rep: Any, value: str) -> Any:
        # ruamel writes YAML 1.2, where `no`, `on` or `1_000` are plain strings; loraforge, DVC and
        # every other reader use PyYAML's YAML 1.1, where they are a bool or a number: quote them
        style = "'" if reads_as_another_type(value) else None
        return rep.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Representer.add_representer(float, represent_float)
    Representer.add_representer(type(None), represent_none)
    Representer.add_representer(str, represent_str)
    return Representer


def reads_as_another_type(text: str) -> bool:
    """Whether PyYAML (YAML 1.1, `yaml.safe_load`) reads `text` written plain as something other
    than this string: `no`/`yes`/`on`/`off` (bools), `1_000`, `1:30` (numbers), `~` (null)...

    Args:
        text: a string value.
    """
    import yaml

    try:
        return yaml.safe_load(text) != text
    except yaml.YAMLError:
        return False  # not plain-writable at all: ruamel quotes it by its own rules


def _node(value: Any) -> Any:
    """Plain data as ruamel nodes, in flow style (`{decouple: true, betas: [0.9, 0.99]}`): one line
    per key, as params.yaml writes its lists.

    Args:
        value: a value to set.
    """
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, (dict, list, tuple)):
        items = value.items() if isinstance(value, dict) else None
        node = CommentedMap((k, _node(v)) for k, v in items) if items is not None else CommentedSeq(map(_node, value))
        node.fa.set_flow_style()
        return node
    return value


def _keep_blank_line_last(section: Any, old_last: Any) -> None:
    """ruamel keeps the blank line that ends a section in the comment of its last key: after keys
    were appended, move it to the new last key, so the sections stay apart.

    Args:
        section: the section's mapping (a ruamel CommentedMap).
        old_last: its last key before the new ones.
    """
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    token = section.ca.items.get(old_last, [None] * 4)[2]
    new_last = next(reversed(section))
    if token is None or new_last == old_last:
        return
    body = token.value.rstrip("\n")
    blank = token.value[len(body) + 1 :]  # the newlines after the line's own: blank lines
    if blank:
        token.value = body + "\n"
        section.ca.items[new_last] = [None, None, CommentToken("\n" + blank, CommentMark(0), None), None]


def set_keys(text: str, values: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """The YAML `text` with `values` set, and the sections touched alone (for a dry run).

    Args:
        text: the file's text: a mapping of sections.
        values: section -> key -> value; a missing section is appended, keys not named keep their value.

    Returns:
        The whole updated text, and the updated sections as YAML text.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    yaml = YAML()
    yaml.Representer = _representer()
    yaml.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout
    yaml.width = 4096  # never fold a long string
    yaml.preserve_quotes = True
    doc = yaml.load(text) or CommentedMap()
    for section, items in values.items():
        if not isinstance(doc.get(section), dict):
            doc[section] = CommentedMap()
        old_last = next(reversed(doc[section]), None)
        for key, value in items.items():
            doc[section][key] = _node(value)
        _keep_blank_line_last(doc[section], old_last)
    whole, part = io.StringIO(), io.StringIO()
    yaml.dump(doc, whole)
    yaml.dump(CommentedMap((name, doc[name]) for name in doc if name in values), part)
    return whole.getvalue(), part.getvalue()


def replace_checked(path: Path, text: str, check: Callable[[], Any], what: str) -> None:
    """Replace `path`'s text atomically, then run `check`; when it raises an `InputError` (a
    `ParamsError` naming the keys), put the old text back and stop with that message.

    Args:
        path: the file.
        text: its new text.
        check: reads and validates the file as written.
        what: what the new text adds, for the message (`with the imported settings`).
    """
    old = path.read_text(encoding="utf-8")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    try:
        check()
    except InputError as e:
        path.write_text(old, encoding="utf-8")
        raise InputError(f"{path} does not validate {what}, so it is left as it was: {e}") from None
