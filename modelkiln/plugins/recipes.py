"""Recipes: ordered chains of steps with parameters, written as text in the config.

    prune.structured(amount=0.5) -> quantize.int8_dynamic

``"baseline"`` (or an empty string) is the empty recipe. The canonical text, with the
parameters that differ from their defaults in declaration order, is what keys a variant,
so two spellings of the same recipe never run twice.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from ..errors import ConfigError

_CALL = re.compile(r"^\s*([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+)\s*(?:\((.*)\))?\s*$", re.S)


@dataclass(frozen=True)
class RecipeStep:
    name: str
    params: tuple[tuple[str, object], ...]

    def text(self) -> str:
        if not self.params:
            return self.name
        args = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"{self.name}({args})"


@dataclass(frozen=True)
class Recipe:
    steps: tuple[RecipeStep, ...]

    @property
    def text(self) -> str:
        return " -> ".join(step.text() for step in self.steps)

    @property
    def label(self) -> str:
        return self.text or "baseline"


def _parse_args(text: str, where: str) -> dict:
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        raise ConfigError(f"{where}: cannot parse parameters '({text})'") from None
    # The text closes and reopens the parentheses ("a=1)(b=2", "a=1) + (2"): not one call.
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise ConfigError(f"{where}: cannot parse parameters '({text})'")
    if call.args:
        raise ConfigError(f"{where}: parameters must be named, as in name(amount=0.5)")
    params = {}
    for kw in call.keywords:
        try:
            params[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise ConfigError(f"{where}: parameter {kw.arg} must be a literal value") from None
    return params


def _check_param(step, name, value, where):
    declared = {p.name: p for p in step.params}
    if name not in declared:
        known = ", ".join(declared) or "none"
        raise ConfigError(f"{where}: step {step.name} has no parameter '{name}' (parameters: {known})")
    want = declared[name].type
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where}: {step.name}({name}=...) must be {want.__name__}, got {value!r}"
        )
    return value


def parse_recipe(text: str, steps: dict, where: str = "recipe") -> Recipe:
    """Parse and validate against the known ``steps`` (name -> Step)."""
    if text.strip() in ("", "baseline"):
        return Recipe(())
    parsed = []
    for part in text.split("->"):
        match = _CALL.match(part)
        if not match:
            raise ConfigError(f"{where}: '{part.strip()}' is not a step such as quantize.int8_dynamic")
        name, args = match.group(1), match.group(2) or ""
        if name not in steps:
            known = ", ".join(sorted(steps)) or "none installed"
            raise ConfigError(f"{where}: unknown step '{name}' (known steps: {known})")
        step = steps[name]
        given = {k: _check_param(step, k, v, where) for k, v in _parse_args(args, where).items()}
        changed = tuple((p.name, given[p.name]) for p in step.params if p.name in given and given[p.name] != p.default)
        parsed.append(RecipeStep(name, changed))
    return Recipe(tuple(parsed))


def slug(text: str) -> str:
    """A file-system name for a variant folder."""
    text = re.sub(r"\s*->\s*", "+", text.replace(")", ""))
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_.") or "baseline"
