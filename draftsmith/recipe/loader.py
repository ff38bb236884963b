"""Load a recipe from YAML plus dotted overrides; errors name the file, the key and its line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from draftsmith.recipe.schema import Recipe
from draftsmith.yaml_input import YamlInputError, compose_yaml, load_yaml

RECIPES_DIR = Path(__file__).resolve().parents[2] / "platform" / "recipes"


class RecipeError(ValueError):
    """A recipe that cannot be used: the message says which file, key and line, and what to change."""


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A path as given, or a bare name (`tiny-eagle3`, no folder and no .yaml) looked up in platform/recipes/.

    A path that does not exist is an error even when its file name matches a bundled recipe: silently running
    the bundled one instead of the user's (misspelt) file is the worse failure.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    available = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    if path.parent != Path(".") or path.suffix in (".yaml", ".yml"):
        raise RecipeError(f"recipe file {str(name_or_path)!r} does not exist; fix the path, or name a bundled "
                          f"recipe without folder or suffix: one of {available}")
    candidate = RECIPES_DIR / f"{path.name}.yaml"
    if candidate.is_file():
        return candidate
    raise RecipeError(f"recipe {str(name_or_path)!r} not found; give a YAML path or one of {available}")


def _key_line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the key at `loc`, or of its deepest parent present in the file (for a missing key)."""
    node, line = root, None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == key), None)
            if hit is None:
                return line
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _format_errors(err: ValidationError, source: str, root: yaml.Node | None, overrides: list[str]) -> str:
    lines = [f"{source}: invalid recipe ({err.error_count()} problem{'s' if err.error_count() > 1 else ''})"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        # The last override that set this key (or a section above it) is where the value came from.
        given = [o for o in overrides if key == o.split("=", 1)[0].strip() or
                 key.startswith(o.split("=", 1)[0].strip() + ".")]
        line = _key_line(root, loc) if loc else None
        where = f"--set {given[-1]}" if given else f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key '{key}' (check its spelling; the schema is draftsmith/recipe/schema.py)")
        elif e["type"] == "missing":
            lines.append(f"  {where}: missing required key '{key}'")
        else:
            lines.append(f"  {where}: key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def apply_override(data: dict, dotted: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict, creating sections as needed."""
    if "=" not in dotted:
        raise RecipeError(f"override {dotted!r} must look like section.key=value")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {dotted!r}: '{part}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = load_yaml(raw, f"override {dotted!r}")
    except YamlInputError as exc:
        raise RecipeError(str(exc)) from None


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Parse and validate a recipe; overrides use the same schema as the file."""
    path = resolve_recipe_path(name_or_path)
    try:
        text = path.read_text()
        root = compose_yaml(text, str(path))
        data = load_yaml(text, str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot be read ({exc})") from None
    except YamlInputError as exc:
        raise RecipeError(str(exc)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    for override in overrides or []:
        apply_override(data, override)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, str(path), root, overrides or [])) from None


def as_jsonable(settings: Any) -> Any:
    """A pydantic model as plain JSON data; anything else as it is."""
    return settings.model_dump(mode="json") if isinstance(settings, BaseModel) else settings


def settings_hash(settings: Any) -> str:
    """Stable short hash of a pydantic model, dict or list: the identity of a stage's settings."""
    blob = json.dumps(as_jsonable(settings), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
