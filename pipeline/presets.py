"""`graftline preset NAME`: merge presets/NAME.yaml over params.yaml (comments kept).

A preset is a partial params file. Applying one validates the merged params
first (nothing is written if they are bad), rewrites params.yaml in place
with ruamel's round-trip so its comments survive, and prints the same change
as `dvc exp run -S` lines for those who would rather run it as an experiment.
"""
from __future__ import annotations

import io
import shlex
from pathlib import Path

import yaml

from components.atomic import atomic_file
from components.errors import GraftlineError
from pipeline import params as params_mod


def folder_for(params_path: Path) -> Path:
    return Path(params_path).resolve().parent / "presets"


def names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load(folder: Path, name: str) -> dict:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise GraftlineError(f"no preset {name!r} in {folder}; presets: {', '.join(names(folder)) or 'none'}")
    return params_mod.read_yaml(path.read_text()) or {}


def merged(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def set_lines(overlay: dict, prefix: str = "") -> list[str]:
    """The preset as `-S key=value` arguments (values in YAML, as DVC parses them)."""
    lines = []
    for key, value in overlay.items():
        if isinstance(value, dict):
            lines += set_lines(value, f"{prefix}{key}.")
        else:
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"{prefix}{key}={text}")
    return lines


def _update(node, overlay: dict) -> None:
    """Write overlay into a ruamel mapping, keeping its comments and key order."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            _update(node[key], value)
        else:
            node[key] = value


def apply(name: str, params_path: Path) -> list[str]:
    params_path = Path(params_path)
    overlay = load(folder_for(params_path), name)
    write_overlay(overlay, params_path)
    return ["dvc exp run " + " ".join(f"-S {_quote(line)}" for line in set_lines(overlay))]


def write_overlay(overlay: dict, params_path: Path) -> None:
    """``overlay`` (a partial params dict) written over the params file, comments and key order kept; checked
    first, so nothing is written if the merged params are bad."""
    from ruamel.yaml import YAML

    params_path = Path(params_path)
    current = params_mod.read_yaml(params_path.read_text()) or {}
    params_mod.from_dict(merged(current, overlay))  # bad values fail here, before writing
    rt = YAML()
    rt.preserve_quotes = True
    document = rt.load(params_path.read_text())
    _update(document, overlay)
    text = io.StringIO()
    rt.dump(document, text)
    with atomic_file(params_path) as handle:
        handle.write(text.getvalue())


def _quote(arg: str) -> str:
    plain = shlex.quote(arg)
    if plain == arg or any(c in arg for c in '"$`\\!'):
        return plain
    return f'"{arg}"'  # reads better than shlex's '"'"' for values like data.sha256=''

