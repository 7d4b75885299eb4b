"""Recipes: an ordered list of (method, settings), from an inline string or a JSON file.

Inline: methods joined by ``+``, settings after ``:`` as ``key=value`` joined by ``,``::

    prune:sparsity=0.5+kmeans:clusters=16+int8
    structured:fraction=0.3+svd:energy=0.9+int8

JSON file: ``{"steps": [{"method": "prune", "sparsity": 0.5}, {"method": "int8"}],
"skip": ["subsampling.*", "head"]}``. Everything is validated before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass

from asr_core.errors import SettingsError

from .methods import DEFAULT_SKIP, NAIVE, SETTINGS, STAGE, make_settings

# The standard set: one recipe per method at its headline setting, each built by its calibrated algorithm. The
# benchmark measures these (each beside its data-free twin) and the studio's rows default to them.
STANDARD_RECIPES = ["int8", "int4:group=64", "ternary", "prune:sparsity=0.5", "prune:pattern=2:4",
                    "structured:fraction=0.3", "svd:energy=0.9", "kmeans:clusters=16",
                    "prune:sparsity=0.5+kmeans:clusters=16+int8"]

@dataclass
class Recipe:
    steps: list[tuple[str, object]]
    skip: tuple[str, ...] = DEFAULT_SKIP
    name: str = ""
    only: tuple[str, ...] | None = None  # restrict to these layer-name patterns (sensitivity analysis)

    def to_json(self) -> dict:
        return {"steps": [{"method": m, **dataclasses.asdict(s)} for m, s in self.steps], "skip": list(self.skip),
                "name": self.name, "only": list(self.only) if self.only else None}

    def describe(self) -> str:
        return self.name or "+".join(_inline(m, s) for m, s in self.steps)

    @property
    def methods(self) -> list[str]:
        return [m for m, _ in self.steps]


def _inline(method: str, settings) -> str:
    values = [f"{k}={v}" for k, v in dataclasses.asdict(settings).items() if v is not None]
    return method + (":" + ",".join(values) if values else "")


def _convert(cls, key: str, text: str):
    hints = typing.get_type_hints(cls)
    if key not in hints:
        return text  # make_settings reports the unknown key
    kind = hints[key]
    options = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    for option in options:
        try:
            if option is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if option is int and "." in text:
                raise ValueError
            return option(text)
        except (TypeError, ValueError):
            continue
    raise SettingsError(f"setting {key}={text!r} is not a valid {' or '.join(o.__name__ for o in options)}")


def validate_order(methods: list[str]) -> None:
    seen = set()
    for i, method in enumerate(methods):
        if method in seen:
            raise SettingsError(f"{method} appears twice in the recipe; apply each method once")
        if STAGE[method] == 3 and any(STAGE[m] == 3 for m in seen):
            raise SettingsError(f"{method} cannot follow {', '.join(m for m in seen if STAGE[m] == 3)}: "
                                "kmeans, int4 and ternary each fix the weight values; use one of them")
        later = [m for m in methods[:i] if STAGE[m] > STAGE[method]]
        if later:
            raise SettingsError(f"{method} must come before {later[0]} (order: structured, svd, prune, "
                                "kmeans|int4|ternary, int8)")
        seen.add(method)


def recipe_from_json(data: dict, skip: tuple[str, ...] | None = None) -> Recipe:
    """A recipe as :meth:`Recipe.to_json` (or a recipe file) writes it -> Recipe (steps validated one by one)."""
    steps = []
    for step in data.get("steps", []):
        step = dict(step)
        method = step.pop("method", None)
        steps.append((method, make_settings(method, **step)))
    return Recipe(steps, tuple(data.get("skip", skip or DEFAULT_SKIP)), data.get("name", ""),
                  tuple(data["only"]) if data.get("only") else None)


def algorithms(recipe: Recipe) -> str:
    """'gptq', 'sparsegpt+weighted+gptq', ...: which algorithm made each step."""
    return "+".join(str(getattr(s, "algo", "-")) for _, s in recipe.steps)


def naive_twin(text: str) -> str:
    """An inline recipe with every step's data-free algorithm (``methods.NAIVE``), its settings as written."""
    parts = []
    for part in text.split("+"):
        method, _, args = part.partition(":")
        method = method.strip()
        parts.append(f"{method}:{args + ',' if args else ''}algo={NAIVE[method]}")
    return "+".join(parts)


def parse_recipe(text: str, skip: tuple[str, ...] | None = None) -> Recipe:
    """An inline recipe string or the path of a JSON recipe file -> validated Recipe."""
    text = text.strip()
    if not text:
        raise SettingsError("empty recipe")
    if text.endswith(".json") or os.path.isfile(text):
        try:
            with open(text) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise SettingsError(f"cannot read recipe file {text}: {err}") from None
        recipe = recipe_from_json(data, skip)
    else:
        steps = []
        for part in text.split("+"):
            method, _, args = part.strip().partition(":")
            method = method.strip().lower()
            if method not in SETTINGS:
                raise SettingsError(f"Unknown compression method {method!r}; choose from {', '.join(SETTINGS)}")
            values = {}
            for item in filter(None, (a.strip() for a in args.split(","))):
                key, eq, value = item.partition("=")
                if not eq:
                    raise SettingsError(f"setting {item!r} of {method} must look like key=value")
                values[key.strip()] = _convert(SETTINGS[method], key.strip(), value.strip())
            steps.append((method, make_settings(method, **values)))
        recipe = Recipe(steps, tuple(skip or DEFAULT_SKIP))
    if not recipe.steps:
        raise SettingsError("the recipe has no steps")
    validate_order(recipe.methods)
    return recipe
