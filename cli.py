"""The command line of opensir.py, generated from its Config, and the checks that run before any model loads.

Plumbing beside opensir.py; a first reading can skip it. One precedence rule, applied once in
config_from_args: flags you type > the built-in small models' defaults > the --recipe preset > Config's
defaults. The tables it checks against (CHOICES, BOUNDS, NEEDS) sit in opensir.py next to the fields.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
from typing import Optional

import torch

from models import model_name_error


def _in_bound(value, bound: str) -> bool:
    """Is value inside ">= x", "> x", "[a, b]", "(a, b]", "[a, b)" or "(a, b)"? (False for NaN.)"""
    m = re.fullmatch(r"(>=?) (\S+)", bound)
    if m:
        lo = float(m.group(2))
        return value >= lo if m.group(1) == ">=" else value > lo
    m = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", bound)
    lo, hi = float(m.group(2)), float(m.group(3))
    return ((value >= lo) if m.group(1) == "[" else (value > lo)) and ((value <= hi) if m.group(4) == "]" else (value < hi))


def table_errors(cfg, choices: dict, bounds: dict) -> list:
    """One message per field outside its CHOICES or BOUNDS, naming the flag."""
    errors = []
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            errors.append(f"--{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    for name, bound in bounds.items():
        value = getattr(cfg, name)
        if not _in_bound(value, bound):
            errors.append(f"--{name} must be {'in ' if bound[0] in '[(' else ''}{bound}, got {value}")
    return errors


def value_errors(cfg) -> list:
    """What no setting may be, whatever the tables say: a float that is NaN or infinite (every comparison with
    NaN is false), a GPU that is not there, a model name that names nothing, a starting-pool file that is not
    there (its content is read once, by runs.Run, before any model loads)."""
    errors = [f"--{f.name} must be a finite number, got {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
              if f.type == "float" and not math.isfinite(getattr(cfg, f.name))]
    if cfg.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda asked for, but torch sees no GPU (use --device cpu, or a CUDA build of torch)")
    if model_name_error(cfg.model, cfg.random_init):
        errors.append(model_name_error(cfg.model, cfg.random_init))
    if cfg.init_pool and not (cfg.resume or cfg.resume_from) and not os.path.exists(cfg.init_pool):
        errors.append(f"--init_pool {cfg.init_pool}: cannot read it (no such file); a resumed run never reads it")
    return errors


def field_help(config_cls) -> dict:
    """Each field's one-line comment in the Config source: the flag's help text."""
    src = inspect.getsource(config_cls)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): [^=]+=[^#\n]*#(.*)$", src, re.M)}


def build_parser(config_cls) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="OpenSIR self-play training (arXiv 2511.00602). Every flag is "
                                "a Config field; --snake_case and --kebab-case both work.")
    helps = field_help(config_cls)
    types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(config_cls):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        if f.type == "bool":
            p.add_argument(*names, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{helps.get(f.name, '')} (default: {f.default})")
        else:
            p.add_argument(*names, type=types[f.type], default=None, metavar=f.type.upper(),
                           help=f"{helps.get(f.name, '')} (default: {f.default})")
    return p


def config_from_args(argv: Optional[list], config_cls, recipes: dict, recipe_fields: tuple, small_defaults: dict):
    """The Config a command line asks for. Precedence, here only: the flags you type, then (for --model tiny
    or toy) that model's smaller numbers, then the --recipe preset, then Config's defaults. Prints what the
    preset and the small-model defaults set; a bad value stops here (SystemExit naming the flag)."""
    given = {k: v for k, v in vars(build_parser(config_cls).parse_args(argv)).items() if v is not None}
    recipe = given.get("recipe", config_cls.recipe)
    if recipe not in recipes:
        raise SystemExit(f"invalid config:\n  --recipe must be one of {', '.join(recipes)}, got {recipe!r}")
    model = given.get("model", config_cls.model)
    small = {k: v for k, v in small_defaults.get(model, {}).items() if k not in given}
    preset = {k: v for k, v in recipes[recipe].items()  # only what differs from Config's defaults
              if k not in given and k not in small and v != getattr(config_cls, k)}
    cfg = config_cls(**{**preset, **small, **given})
    print(f"recipe {recipe}: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in recipe_fields)
          + (f" (your flags: {', '.join(k for k in recipe_fields if k in given)})" if set(given) & set(recipe_fields) else ""))
    if small:
        print(f"{model} model defaults (override with flags): " + ", ".join(f"{k}={v}" for k, v in small.items()))
    try:
        cfg.validate(given)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return cfg
