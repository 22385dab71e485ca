"""Reading a user's ultralytics `.pt` without running any code it carries.

A YOLO `.pt` is a torch zip whose `data.pkl` pickles ultralytics' model classes, so neither
safetensors nor `torch.load(weights_only=True)` reads it, and ultralytics' own loader unpickles it
unrestricted: a `.pt` from the web could run anything. vla reads it in two steps:

1. **scan**: every global the pickle names is read from its opcodes, without executing any of
   them, and checked against the allow-list below; the first one outside it refuses the file
   (`UserError`, naming the file and the global), before a single object is built;
2. **load**: `torch.load` with a restricted unpickler that enforces the same allow-list again at
   load time, and also what may be *called*: a module class is only ever created the way pickle
   creates a plain object (`cls.__new__(cls)` + its state: its constructor never runs), and only
   value types and tensor-rebuild functions may be called with the pickle's arguments.

The allow-list (what an ultralytics detection checkpoint needs, modelled on torch's
`weights_only` list):
- module classes, created without their constructor: `torch.nn.Module` subclasses defined in
  `torch.nn.modules.*`, `ultralytics.nn.modules.*` and `ultralytics.nn.tasks`, and the plain
  loss/assigner classes of `ultralytics.utils.loss` and `ultralytics.utils.tal` (a trained
  model's `criterion`);
- callables: torch's tensor rebuild functions (`torch._utils._rebuild_tensor_v2`,
  `_rebuild_parameter`, ...), `torch.Size`, `torch.device`, `torch.Tensor`,
  `torch.nn.Parameter`, torch's storage types, dtypes, layouts and memory formats;
  `collections.OrderedDict`, `Counter` and `defaultdict` (of a value type); numpy's array,
  dtype and scalar reconstruction; `pathlib` paths; `types.SimpleNamespace` and ultralytics'
  `IterableSimpleNamespace`; `_codecs.encode` (protocol-2 bytes); and the builtins `set`,
  `frozenset`, `bytearray`, `bytes`, `complex`, `slice`, `range`, `list`, `dict`, `tuple`, `int`,
  `float`, `bool`, `str`, `object`.

Refused: every other global (`os.system`, `builtins.eval`, `subprocess.*`, `torch.load`,
`ultralytics.utils.checks.check_requirements`, ...), calling a module class with arguments (its
constructor), passing a class or function as an argument, appending or setting items on anything
but a list/dict/set, object state that is not a plain dict, TorchScript archives and the legacy
(non-zip) torch format.

ultralytics' label caches (`labels/*.cache`, numpy object arrays it reads with
`allow_pickle=True`) are read the same way while `vla train-detector` trains
(`vla.models.dclip.yolo.restricted_label_caches`): a cache that asks for more is not loaded, and
ultralytics rebuilds it from the labels.
"""

from __future__ import annotations

import _compat_pickle
import collections
import importlib
import io
import pathlib
import pickle
import pickletools
import types
import zipfile
from pathlib import Path
from typing import Any

from vla.errors import UserError

# old ultralytics module paths, as ultralytics' own loader maps them
_RENAMED_MODULES = {"ultralytics.yolo.utils": "ultralytics.utils", "ultralytics.yolo.v8": "ultralytics.models.yolo",
                    "ultralytics.yolo.data": "ultralytics.data"}
_RENAMED = {"pathlib.WindowsPath": "pathlib.PosixPath", "pathlib.PureWindowsPath": "pathlib.PurePosixPath",
            "torch.tensor._rebuild_from_type_v2": "torch._tensor._rebuild_from_type_v2"}
# where module classes may come from: (module prefix, must be an nn.Module subclass)
_CLASS_MODULES = (("torch.nn.modules.", True), ("ultralytics.nn.modules.", True), ("ultralytics.nn.tasks", True),
                  ("ultralytics.utils.loss", False), ("ultralytics.utils.tal", False))
_BUILTINS = ("set", "frozenset", "bytearray", "bytes", "complex", "slice", "range", "list", "dict", "tuple", "int",
             "float", "bool", "str", "object")
_REBUILD = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
            "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_cpu_tensor",
            "_rebuild_device_tensor_from_numpy", "_rebuild_meta_tensor_no_storage", "_rebuild_qtensor",
            "_rebuild_sparse_tensor", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass")


class Refused(pickle.UnpicklingError):
    """The pickle asks for something outside the allow-list; `what` names it."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _canonical(module: str, name: str, proto: int = 2) -> str:
    """`module.name` as this Python names it (protocol-2 `__builtin__` → `builtins`, old ultralytics paths)."""
    if proto < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    for old, new in _RENAMED_MODULES.items():
        if module == old or module.startswith(old + "."):
            module = new + module[len(old):]
    full = f"{module}.{name}"
    return _RENAMED.get(full, full)


_values: dict[str, Any] | None = None


def _value_globals() -> dict[str, Any]:
    """Globals that may be called with the pickle's arguments (value types and tensor rebuilders)."""
    global _values
    if _values is not None:
        return _values
    import numpy as np
    import torch

    v: dict[str, Any] = {f"builtins.{n}": getattr(__import__("builtins"), n) for n in _BUILTINS}
    v.update({"collections.OrderedDict": collections.OrderedDict, "collections.Counter": collections.Counter,
              "collections.defaultdict": collections.defaultdict, "_codecs.encode": _encode_latin1,
              "torch.Size": torch.Size, "torch.device": torch.device, "torch._tensor.Tensor": torch.Tensor,
              "torch.Tensor": torch.Tensor, "torch.nn.parameter.Parameter": torch.nn.Parameter,
              "torch.serialization._get_layout": torch.serialization._get_layout,
              "pathlib.PosixPath": pathlib.PosixPath, "pathlib.PurePosixPath": pathlib.PurePosixPath,
              "pathlib.Path": pathlib.Path, "types.SimpleNamespace": types.SimpleNamespace,
              "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype})
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        v[f"{core}._reconstruct"] = _reconstruct_ndarray
        v[f"{core}.scalar"] = scalar
    for name in dir(getattr(np, "dtypes", object)):
        if name.endswith("DType"):
            v[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    for name in _REBUILD:
        if hasattr(torch._utils, name):
            v[f"torch._utils.{name}"] = getattr(torch._utils, name)
    for obj in vars(torch).values():  # dtypes, layouts, memory formats, quantization schemes: plain values
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
            v[str(obj)] = obj
    for storage in torch.storage._dtype_to_storage_type_map().values():
        v[f"torch.{storage}"] = torch.serialization.StorageType(storage)
    try:
        from ultralytics.utils import IterableSimpleNamespace

        v["ultralytics.utils.IterableSimpleNamespace"] = IterableSimpleNamespace
    except ImportError:
        pass
    _values = v
    return v


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol 2 uses it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused("_codecs.encode with another codec")
    return text.encode("latin1")


def _reconstruct_ndarray(subtype, shape, dtype):
    import numpy as np

    if subtype is not np.ndarray:
        raise Refused(f"numpy _reconstruct of {getattr(subtype, '__qualname__', subtype)!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _module_class(full: str) -> type | None:
    """The class `full` names when it is a module class of the allow-list, else None."""
    module, _, name = full.rpartition(".")
    for prefix, must_be_module in _CLASS_MODULES:
        if module == prefix or (prefix.endswith(".") and module.startswith(prefix)):
            break
    else:
        return None
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    obj = getattr(mod, name, None)
    if not isinstance(obj, type) or obj.__module__ != module:
        return None
    if must_be_module:
        import torch

        if not issubclass(obj, torch.nn.Module):
            return None
    return obj


def resolve(full: str) -> Any:
    """The object an allowed global names; `Refused` for any other."""
    values = _value_globals()
    if full in values:
        return values[full]
    cls = _module_class(full)
    if cls is None:
        raise Refused(f"the global {full}")
    return cls


def allowed(full: str) -> bool:
    try:
        resolve(full)
    except Refused:
        return False
    return True


# -- step 1: the static scan --------------------------------------------------------------------

def globals_in(data: bytes) -> list[str]:
    """Every global a pickle names, read from its opcodes without executing any (`module.name`)."""
    found: list[str] = []
    proto = 0
    strings: list[Any] = []  # the values the last opcodes pushed, for STACK_GLOBAL
    memo: dict[int, Any] = {}
    unknown = object()
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name == "PROTO":
            proto = arg
        if name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            found.append(_canonical(module, attr, proto))
        elif name == "STACK_GLOBAL":
            module, attr = (strings[-2], strings[-1]) if len(strings) >= 2 else (unknown, unknown)
            if not (isinstance(module, str) and isinstance(attr, str)):
                raise Refused("a STACK_GLOBAL whose name cannot be read without running the pickle")
            found.append(_canonical(module, attr, proto))
        elif name in ("EXT1", "EXT2", "EXT4"):
            raise Refused(f"copyreg extension code {arg}")
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                    "SHORT_BINSTRING"):
            strings.append(arg)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            strings.append(memo.get(int(arg), unknown))
        elif name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else unknown
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = strings[-1] if strings else unknown
        else:
            strings.append(unknown)
    return found


def check_globals(data: bytes) -> None:
    """`Refused` naming the first global outside the allow-list; nothing is executed."""
    for full in globals_in(data):
        if not allowed(full):
            raise Refused(f"the global {full}")


# -- step 2: the restricted unpickler -------------------------------------------------------------

def _no_callables(obj: Any, seen: set[int] | None = None) -> None:
    """Refuse a class or function passed as an argument (containers are searched)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, type):
        if obj in _value_globals().values() and obj not in _module_classes_seen:
            return
        raise Refused(f"{obj.__module__}.{obj.__qualname__} passed as an argument")
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        raise Refused(f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)} passed as an argument")
    if isinstance(obj, (tuple, list, set, frozenset)):
        for x in obj:
            _no_callables(x, seen)
    elif isinstance(obj, dict):
        for k, x in obj.items():
            _no_callables(k, seen)
            _no_callables(x, seen)


_module_classes_seen: set[type] = set()


def _call(func: Any, args: tuple) -> Any:
    """REDUCE: only value types and rebuild functions are called, never a module class."""
    values = _value_globals()
    if not any(func is v for v in values.values()):
        what = getattr(func, "__qualname__", type(func).__qualname__)
        raise Refused(f"calling {getattr(func, '__module__', '?')}.{what} (its constructor would run)")
    _no_callables(args)
    if func is collections.defaultdict and args and args[0] is not None and args[0] not in (
            list, dict, set, int, float, str, tuple, collections.OrderedDict):
        raise Refused("collections.defaultdict of a non-value factory")
    return func(*args)


def _new(cls: Any, args: tuple, kwargs: dict | None = None) -> Any:
    """NEWOBJ: `cls.__new__(cls)`, for a module class or a value type; no constructor runs."""
    if not isinstance(cls, type) or not (cls in _module_classes_seen or any(cls is v for v in _value_globals().values())):
        raise Refused(f"creating {getattr(cls, '__qualname__', cls)!r}")
    _no_callables(args)
    _no_callables(kwargs or {})
    return cls.__new__(cls, *args, **(kwargs or {}))


class RestrictedUnpickler(pickle._Unpickler):
    """A pure-Python unpickler that builds only what the allow-list names (module docstring)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        full = _canonical(module, name, self.proto)
        obj = resolve(full)
        if isinstance(obj, type) and _module_class(full) is obj:
            _module_classes_seen.add(obj)
        return obj

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = _call(self.stack[-1], args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new(cls, args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new(cls, args, kwargs))

    def _instantiate(self, klass, args):  # INST / OBJ (protocols 0 and 1)
        self.append(_call(klass, tuple(args)) if args or klass not in _module_classes_seen else _new(klass, ()))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None and type(inst) in _module_classes_seen:
            state = state[0]
        setstate = getattr(type(inst), "__setstate__", None)
        if setstate is not None and setstate is not getattr(object, "__setstate__", None):
            setstate(inst, state)
            return
        if not isinstance(state, dict) or not all(type(k) is str and not k.startswith("__") for k in state):
            raise Refused(f"state of a {type(inst).__qualname__} that is not a plain dict of attributes")
        inst.__dict__.update(state)

    def load_append(self):
        value = self.stack.pop()
        self._container(list).append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._container(list).extend(items)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._container(dict)[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self._container(dict)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self):
        items = self.pop_mark()
        self._container(set).update(items)

    def _container(self, kind: type) -> Any:
        obj = self.stack[-1]
        if not isinstance(obj, kind) or type(obj).__module__ not in ("builtins", "collections"):
            raise Refused(f"adding items to a {type(obj).__qualname__}")
        return obj

    def get_extension(self, code):
        raise Refused(f"copyreg extension code {code}")


for _op, _fn in ((pickle.REDUCE, "load_reduce"), (pickle.NEWOBJ, "load_newobj"), (pickle.NEWOBJ_EX, "load_newobj_ex"),
                 (pickle.BUILD, "load_build"), (pickle.APPEND, "load_append"), (pickle.APPENDS, "load_appends"),
                 (pickle.SETITEM, "load_setitem"), (pickle.SETITEMS, "load_setitems"),
                 (pickle.ADDITEMS, "load_additems")):
    RestrictedUnpickler.dispatch[_op[0]] = getattr(RestrictedUnpickler, _fn)


class _PickleModule:
    """What `torch.load(pickle_module=...)` uses: the restricted unpickler, and no other way in."""

    __name__ = "vla.models.safe_pickle"
    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    @staticmethod
    def loads(data: bytes, **kwargs):
        return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


def load_checkpoint(path: str | Path, *, what: str = "checkpoint") -> Any:
    """A torch zip checkpoint's objects, built only from the allow-list; UserError (one line naming
    the file and the refused global, or the damage) for anything else, before any of it runs."""
    import torch

    path = Path(path)
    fix = "re-download or re-export it (an ultralytics model saved with YOLO(...).save('x.pt'))"
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror}); pass the path of a readable .pt") from None
    if size == 0:
        raise UserError(f"{what} {path} is empty (0 bytes); {fix}")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pkl = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if any(n.endswith("/constants.pkl") for n in names):
                raise UserError(f"{what} {path} is a TorchScript archive, not an ultralytics checkpoint; "
                                f"pass the .pt that YOLO(...).save() writes")
            if len(pkl) != 1:
                raise UserError(f"{what} {path} is a zip without a torch data.pkl, not a torch checkpoint; {fix}")
            data = z.read(pkl[0])
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise UserError(f"{what} {path} is not a readable torch zip checkpoint (truncated, damaged or another "
                        f"format: {str(e).splitlines()[0] if str(e) else type(e).__name__}); vla reads only the "
                        f"zip format ultralytics and torch.save write; {fix}") from None
    try:
        check_globals(data)
    except Refused as e:
        raise UserError(_refusal(path, what, e.what)) from None
    except Exception as e:  # opcodes that do not parse: a damaged pickle
        raise UserError(f"{what} {path} holds a damaged pickle ({type(e).__name__}: {e}); {fix}") from None
    try:
        return torch.load(path, map_location="cpu", pickle_module=_PickleModule, weights_only=False)
    except Refused as e:
        raise UserError(_refusal(path, what, e.what)) from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError, TypeError,
            AttributeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{what} {path} is damaged ({type(e).__name__}: {first}); {fix}") from None


def load_npy_object(path: str | Path) -> Any:
    """The object a `.npy` of dtype object holds (as `np.load(allow_pickle=True).item()` gives it),
    unpickled through the restricted unpickler; `Refused` (or numpy's error) for anything else.
    Plain arrays are read without any pickle."""
    import numpy as np

    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            _, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            _, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise Refused(f".npy format version {version}")
        if not dtype.hasobject:
            return np.load(path, allow_pickle=False)
        data = f.read()
    check_globals(data)
    array = RestrictedUnpickler(io.BytesIO(data)).load()
    return array.item() if isinstance(array, np.ndarray) and array.shape == () else array


def _refusal(path: Path, what: str, global_: str) -> str:
    return (f"{what} {path} refused: its pickle asks for {global_}, which an ultralytics checkpoint never needs "
            f"(vla unpickles only torch, numpy, ultralytics model classes and plain values, so loading it "
            f"runs no code); use a .pt from a source you trust, saved with YOLO(...).save()")
