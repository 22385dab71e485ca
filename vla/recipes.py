"""Recipes: YAML files → validated, typed configs.

A recipe is a YAML mapping whose `kind:` names the stage it is for; every other key maps onto
the stage's config dataclass (nested dataclasses for nested mappings). Validation is strict: an
unknown key or a value of the wrong type is a one-line error naming the key and the file, because
a typo such as `lr_warmup: 100` silently ignored would cost a whole run.

    cfg = load_recipe(PretrainRecipe, "recipes/embedded/pretrain.yaml", ["train.lr=1e-3"], kind="pretrain")
"""

from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from vla.errors import UserError

T = TypeVar("T")

#: the shipped recipes: recipes/<scale>/<method>/<name>.yaml, with the recipes every method shares
#: (the base CLIP's pretrain.yaml, the world's synth.yaml) at recipes/<scale>/
SHIPPED = Path(__file__).resolve().parent.parent / "recipes"
SCALES = ("smoke", "embedded", "gpu")
METHODS = ("proclip", "dclip", "mmgem")


def shipped_recipe(scale: str, name: str) -> Path:
    """The shipped recipe `name` (a file name without .yaml) at `scale`: recipes/<scale>/<name>.yaml
    when every method shares it, else recipes/<scale>/<method>/<name>.yaml, the first method in
    METHODS' order that holds it (eval.yaml: ProCLIP's)."""
    for p in [SHIPPED / scale / f"{name}.yaml", *(SHIPPED / scale / m / f"{name}.yaml" for m in METHODS)]:
        if p.is_file():
            return p
    raise UserError(f"no shipped recipe {name}.yaml under {SHIPPED / scale}; see recipes/")


def moved_recipe(path: Path) -> list[Path]:
    """Where a recipe path of the earlier layout is now (none when it is no such path):
    recipes/synth.yaml → recipes/embedded/synth.yaml, recipes/<method>/X → recipes/gpu/<method>/X,
    and recipes/<smoke|embedded>/X → recipes/<smoke|embedded>/<method>/X (each method holding X:
    eval.yaml is ProCLIP's and DCLIP's)."""
    parts = Path(path).parts
    if "recipes" not in parts:
        return []
    i = len(parts) - 1 - parts[::-1].index("recipes")
    root, rest = Path(*parts[: i + 1]), parts[i + 1:]
    if rest == ("synth.yaml",):
        candidates = [root / "embedded" / "synth.yaml"]
    elif len(rest) == 2 and rest[0] in METHODS:
        candidates = [root / "gpu" / rest[0] / rest[1]]
    elif len(rest) == 2 and rest[0] in ("smoke", "embedded"):
        candidates = [root / rest[0] / m / rest[1] for m in METHODS]
    else:
        return []
    return [c for c in candidates if c.is_file()]


class RecipeError(UserError):
    pass


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _fail(where: str, what: str, value: Any) -> RecipeError:
    src, _, key = where.rpartition("\0")
    return RecipeError(f"{src}'{key}' {what}, got {value!r}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where YAML is ambiguous
    (an int where a float is expected, a list where a tuple is)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _fail(where, f"must be {_type_name(tp)}", value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError:
                continue
        raise _fail(where, f"must be {_type_name(tp)}", value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _fail(where, "must be a mapping", value)
        src, _, key = where.rpartition("\0")
        return _build(tp, value, key + ".", src)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(where, "must be a list", value)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _fail(where, f"must have {len(args)} items", value)
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _fail(where, "must be a mapping", value)
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(where, "must be a number", value)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, "must be an integer", value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(where, "must be true or false", value)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _fail(where, "must be a string", value)
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise _fail(where, "must be a path string", value)
        return Path(value)
    raise TypeError(f"recipes cannot validate type {tp!r} (at {where})")


def _build(cls: type[T], data: dict[str, Any], prefix: str, source: str = "") -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise RecipeError(f"{source}unknown key '{prefix}{key}' (known here: {known})")
        kwargs[key] = _coerce(value, hints[key], f"{source}\0{prefix}{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ checks and missing required fields
        raise RecipeError(f"{source}{prefix or 'recipe'}: {e}") from None


def from_dict(cls: type[T], data: dict[str, Any], source: str = "") -> T:
    """Build `cls` from a plain mapping, strictly; `source` prefixes every error (a file name)."""
    return _build(cls, data, "", f"{source}: " if source else "")


class _Loader(yaml.SafeLoader):
    """YAML as a user means it: PyYAML follows YAML 1.1, where a float needs a dot, so `1e-3`
    and `1.0e3` would be strings; here they are numbers, as in YAML 1.2 (and JSON, and Python).
    Integers stay integers: their resolver comes first."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` → (['a', 'b'], yaml-parsed c), so `--set train.lr=1e-3` gives a float."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r} must look like key=value (e.g. --set train.lr=1e-3)")
    key, raw = item.split("=", 1)
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return key.strip().split("."), value


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        moved = moved_recipe(path)
        if moved:
            raise UserError(f"recipe {path} is now {' or '.join(map(str, moved))} (recipes/<scale>/<method>/); "
                            f"pass that path")
        raise UserError(f"recipe {path} does not exist; see recipes/ for the shipped ones")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"recipe {path} is not a text file (byte {e.start} is not UTF-8); "
                        f"pass a YAML recipe") from None
    except OSError as e:
        raise UserError(f"recipe {path} cannot be read ({e.strerror}); pass a YAML recipe you can read") from None
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"recipe {path}{line} is not valid YAML; fix its syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a YAML mapping of settings")
    return data


def load_recipe(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                *, kind: str | None = None) -> T:
    """Defaults of `cls` ← the YAML file ← `--set` overrides, validated strictly."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        data = read_yaml(path)
        file_kind = data.pop("kind", None)
        if kind is not None and file_kind is not None and file_kind != kind:
            raise UserError(f"recipe {path} is for '{file_kind}', not '{kind}'; pass a {kind} recipe")
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item}: '{k}' is not a group of settings")
        node[keys[-1]] = value
        source = f"{source} (with --set)" if "--set" not in source else source
    return from_dict(cls, data, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved recipe as plain data, for manifests and `vla recipe show`."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    return conv(cfg)


