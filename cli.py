"""The command line of opensir.py, generated from its Config, and the checks that run before any model loads.

Plumbing beside opensir.py; a first reading can skip it. One precedence rule, applied once in
config_from_args: flags you type > the built-in small models' defaults > the --recipe preset > Config's
defaults. The tables it checks against (CHOICES, BOUNDS, NEEDS) sit in opensir.py next to the fields.
`--config FILE` (JSON, a run's own config.json works) sits where the flags you type sit; flags typed win over it.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
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
    package = TRACKER_PACKAGES.get(getattr(cfg, "report_to", "none"))
    if package and importlib.util.find_spec(package) is None:
        errors.append(f"--report_to {cfg.report_to} needs the {package} package, which is not installed: "
                      "pip install -r requirements-track.txt (or pass --report_to none)")
    return errors


KINDS = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string"}  # a Config field's type, in words
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report_to -> the package it imports


def read_config_file(path: str, config_cls) -> dict:
    """--config FILE: a JSON object of Config fields (a run's config.json works). An unreadable file, an
    unknown key or a value of the wrong type is a SystemExit naming the file and the key; ints are accepted
    for float fields."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"--config {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    except ValueError as err:
        raise SystemExit(f"--config {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a JSON object of flags, e.g. {{\"w_div\": 0.0}}")
    types = {f.name: f.type for f in dataclasses.fields(config_cls)}
    errors, values = [], {}
    for key, value in data.items():
        kind = types.get(key)
        ok = {"bool": isinstance(value, bool), "str": isinstance(value, str),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool)}.get(kind)
        if kind is None:
            errors.append(f"{key!r} is not a flag (the flags are Config's fields; see --help)")
        elif not ok:
            errors.append(f"{key!r} must be {KINDS[kind]}, got {json.dumps(value)}")
        else:
            values[key] = float(value) if kind == "float" else value
    if errors:
        raise SystemExit(f"invalid config file {path}:\n  " + "\n  ".join(errors))
    return values


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
    p.add_argument("--config", metavar="FILE", default=None,
                   help="JSON file of flags (a run's config.json works, or one of configs/); flags you type win over it")
    return p


def config_from_args(argv: Optional[list], config_cls, recipes: dict, recipe_fields: tuple, small_defaults: dict):
    """The Config a command line asks for. Precedence, here only: the flags you type and --config FILE's
    values (typed flags win over the file), then (for --model tiny or toy) that model's smaller numbers,
    then the --recipe preset, then Config's defaults. Prints what the preset and the small-model defaults
    set; a bad value stops here (SystemExit naming the flag)."""
    typed = {k: v for k, v in vars(build_parser(config_cls).parse_args(argv)).items() if v is not None}
    from_file = read_config_file(typed.pop("config"), config_cls) if "config" in typed else {}
    given = {**from_file, **typed}
    recipe = given.get("recipe", config_cls.recipe)
    for r in {recipe, from_file.get("recipe", recipe)} - set(recipes):
        raise SystemExit(f"invalid config:\n  --recipe must be one of {', '.join(recipes)}, got {r!r}")
    model = given.get("model", config_cls.model)
    # what counts as typed for NEEDS: a file's value that differs from what its own model and recipe give
    # (a run's config.json holds every field; its defaults are no choice)
    file_model, file_recipe = from_file.get("model", model), from_file.get("recipe", recipe)
    usual = {**recipes[file_recipe], **small_defaults.get(file_model, {})}
    chosen = {**{k: v for k, v in from_file.items() if v != usual.get(k, getattr(config_cls, k))}, **typed}
    small = {k: v for k, v in small_defaults.get(model, {}).items() if k not in given}
    preset = {k: v for k, v in recipes[recipe].items()  # only what differs from Config's defaults
              if k not in given and k not in small and v != getattr(config_cls, k)}
    cfg = config_cls(**{**preset, **small, **given})
    print(f"recipe {recipe}: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in recipe_fields)
          + (f" (your flags: {', '.join(k for k in recipe_fields if k in chosen)})" if set(chosen) & set(recipe_fields) else ""))
    if small:
        print(f"{model} model defaults (override with flags): " + ", ".join(f"{k}={v}" for k, v in small.items()))
    try:
        cfg.validate(chosen)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return cfg
