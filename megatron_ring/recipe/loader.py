"""Read a recipe: YAML files that inherit (`defaults: [base.yaml]`), dotted command-line
overrides (`optimizer.lr=1e-4`), then the typed schema of the recipe's kind (its `stage`). The resolved recipe is what a run saves."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from megatron_ring.recipe.distill_schema import DistillRecipe
from megatron_ring.recipe.pipeline_schema import PipelineRecipe
from megatron_ring.recipe.rl_schema import RLRecipe
from megatron_ring.recipe.typed import RecipeError, build

COMMAND_LINE = "command line"
SCHEMAS = {"distill": DistillRecipe, "rl": RLRecipe, "pipeline": PipelineRecipe}  # recipe kinds by `stage`


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict, origin: dict, source: str | None, prefix: str = "") -> dict:
    """Deep-merge top over base; record which file set each key path (unless source is None:
    a parent's keys keep the origins recorded when the parent was read)."""
    out = dict(base)
    for key, value in top.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origin, source, path)
        else:
            out[key] = value
            if source is not None:
                for k in [k for k in origin if k.startswith(path + ".")]:
                    del origin[k]
                origin[path] = source
    return out


def _resolve(path: Path, origin: dict, chain: tuple = ()) -> dict:
    path = path.resolve()
    if path in chain:
        raise RecipeError(f"{path}: `defaults` inherit in a cycle: " + " -> ".join(map(str, chain + (path,))))
    data = _read_yaml(path)
    parents = data.pop("defaults", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError(f"{path}: defaults: expected a file name or a list of them")
    merged: dict = {}
    for parent in parents:
        merged = _merge(merged, _resolve(path.parent / parent, origin, chain + (path,)), origin, None)
    return _merge(merged, data, origin, str(path))


def apply_override(data: dict, override: str, origin: dict) -> dict:
    """`a.b.c=value`; the value is read as YAML, so numbers, booleans, null and lists work."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"{COMMAND_LINE}: override {override!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    nested = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return _merge(data, nested, origin, COMMAND_LINE)


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), schema=None):
    """Resolve a recipe file into its schema dataclass (chosen by its `stage` unless given)."""
    origin: dict[str, str] = {"": str(path)}
    data = _resolve(Path(path), origin)
    for override in overrides:
        data = apply_override(data, override, origin)
    if schema is None:
        stage = data.get("stage")
        if stage not in SCHEMAS:
            raise RecipeError(f"{origin.get('stage', path)}: stage: must be one of {sorted(SCHEMAS)}, got {stage!r}")
        schema = SCHEMAS[stage]
    return build(schema, data, "", origin)


def dump(recipe) -> str:
    """The resolved recipe as YAML (saved in the run directory, printed by --dry-run)."""
    return yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)

