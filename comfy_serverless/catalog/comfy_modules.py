"""ComfyUI's module names (`folder_paths`, `nodes`, `comfy.*`, ...) for custom node packs, and stand-ins for the
ComfyUI internals this server does not have.

Packs written for ComfyUI import its modules by their top-level names. Those names are an adapter over our own
modules (DESIGN.md: "ComfyUI's module names are an adapter, not a second core"), kept in the folder
`comfy_serverless/comfy_modules/`, which `install()` puts at the front of `sys.path` right before the first custom
pack is imported (catalog/packs.py). Nothing else imports them: a server that loads no custom pack never has
`folder_paths` in `sys.modules`, and neither has the front of a lazy server before its first prompt.

Missing internals. Packs also import ComfyUI internals this server does not provide (`comfy.model_base`,
`comfy.ldm.modules.attention`, ...). The finder installed here answers any module under `comfy`, `comfy_extras`
or `comfy_execution` that has no file in the folder with a placeholder module, and the adapter modules answer a
name they lack (`from comfy.utils import x`) with a placeholder too. A placeholder can be imported, subclassed,
used as a default value or type hint, compared by identity, set attributes on (monkeypatching), and decorate
functions while its pack is imported; calling or instantiating it, or using it as a value (truth, length,
iteration, arithmetic), raises `MissingComfyInternal` (a NotImplementedError), which the engine reports as the
node's execution_error. Probes (`hasattr`, `getattr(module, name, default)`) see an AttributeError instead, so
version checks in packs take their fallback branch. The names a pack touches while it is imported are recorded
and logged once per pack (packs.py).
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import dis
import functools
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "comfy_modules")
# Top-level packages whose missing submodules become placeholders (other missing modules stay ImportErrors).
PLACEHOLDER_ROOTS = ("comfy", "comfy_extras", "comfy_execution")
# The adapter folder is a sys.path root, never a package of ours: this prefix must not be importable.
_OWN_PREFIX = "comfy_serverless.comfy_modules"

_install_lock = threading.Lock()
_installed = False

# The names touched while a pack is imported (None outside a pack import).
_recording: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("comfy_missing_names", default=None)


class MissingComfyInternal(NotImplementedError):
    """A ComfyUI internal this server does not provide was called or used as a value."""

    def __init__(self, name: str, during_import: bool = False):
        self.name = name
        who = "this pack" if during_import else "this node"
        super().__init__(f"{who} needs ComfyUI's {name}, which comfy-serverless does not provide")


# -- recording -------------------------------------------------------------------------------------------

def _record(name: str) -> None:
    names = _recording.get()
    if names is not None and name not in names:
        names.append(name)


@contextlib.contextmanager
def recording():
    """Collects the missing ComfyUI names touched in the block (a pack's import); yields the list, which
    `summarize` turns into the names worth reporting."""
    names: list[str] = []
    token = _recording.set(names)
    try:
        yield names
    finally:
        _recording.reset(token)


def summarize(names: list[str]) -> list[str]:
    """The most specific names only: `comfy.model_base` is dropped when `comfy.model_base.BaseModel` is there."""
    return sorted(n for n in set(names) if not any(other.startswith(n + ".") for other in names))


# -- placeholders ----------------------------------------------------------------------------------------

_ATTRIBUTE_OPCODES = {dis.opmap[name] for name in ("IMPORT_FROM", "LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR")
                      if name in dis.opmap}


def _is_plain_access(frame) -> bool:
    """True when `frame` is running `from m import name` or `m.name` (not hasattr/getattr with a default).

    Probes must see an AttributeError, so that version checks in packs (`hasattr(comfy.utils, "x")`,
    `getattr(mm, "is_device_mps", None)`) take their fallback branch instead of finding a placeholder.
    """
    if frame is None:
        return True
    try:
        return frame.f_code.co_code[frame.f_lasti] in _ATTRIBUTE_OPCODES
    except (IndexError, AttributeError):
        return True


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _missing_name(cls) -> str | None:
    """The placeholder `cls` stands for, or that one of its bases stands for (first in the MRO)."""
    for klass in getattr(cls, "__mro__", ()):
        name = klass.__dict__.get("_comfy_missing_name")
        if name is not None:
            return name
    return None


def _deferred(name: str, target):
    """What a placeholder used as a decorator while its pack is imported turns `target` into: a stand-in that
    raises when called, so the pack loads and only the code that needs the decorator fails."""

    @functools.wraps(target)
    def stand_in(*args, **kwargs):
        raise MissingComfyInternal(name)

    return stand_in


class _PlaceholderType(abc.ABCMeta):
    """Metaclass of placeholders and of the classes packs derive from them (ABCMeta, so that a pack class may
    also derive from an abstract base)."""

    def __getattr__(cls, attribute: str):
        own = cls.__dict__.get("_comfy_missing_name")
        if own is None or _is_dunder(attribute) or not _is_plain_access(sys._getframe(1)):
            base = _missing_name(cls)
            raise AttributeError(f"{cls.__qualname__} has no attribute {attribute!r}"
                                 + (f" (it stands for ComfyUI's {base}, which comfy-serverless does not provide)"
                                    if base else ""))
        return placeholder(f"{own}.{attribute}")

    def __call__(cls, *args, **kwargs):
        name = _missing_name(cls) or cls.__qualname__
        importing = _recording.get() is not None
        own = cls.__dict__.get("_comfy_missing_name")
        if importing and own is not None and len(args) == 1 and not kwargs and callable(args[0]):
            _record(own)
            return _deferred(own, args[0])
        raise MissingComfyInternal(name, during_import=importing)

    def _refuse(cls, *args, **kwargs):
        own = cls.__dict__.get("_comfy_missing_name")
        if own is None:
            raise TypeError(f"{cls.__qualname__} does not support this operation")
        raise MissingComfyInternal(own, during_import=_recording.get() is not None)

    def __bool__(cls):
        if cls.__dict__.get("_comfy_missing_name") is None:
            return True
        return _PlaceholderType._refuse(cls)

    __iter__ = __len__ = __contains__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __floordiv__ = __mod__ = __pow__ = __neg__ = __pos__ = __abs__ = _refuse
    __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __int__ = __float__ = __index__ = _refuse
    __enter__ = __exit__ = __await__ = _refuse

    def __repr__(cls):
        own = cls.__dict__.get("_comfy_missing_name")
        if own is None:
            return super().__repr__()
        return f"<missing ComfyUI name {own}>"


def _class_getitem(cls, item):
    own = _missing_name(cls) or cls.__qualname__
    return placeholder(f"{own}[...]", record=False)  # the same missing name, subscripted (a type hint)


_placeholders: dict[str, _PlaceholderType] = {}
_placeholders_lock = threading.Lock()


def placeholder(name: str, record: bool = True) -> _PlaceholderType:
    """The stand-in for the missing ComfyUI name `name` (one object per name), recorded for the pack being
    imported."""
    if record:
        _record(name)
    with _placeholders_lock:
        found = _placeholders.get(name)
        if found is None:
            module, _, leaf = name.rpartition(".")
            # __name__ is the full dotted name: importlib builds submodule names from it (`from a.b import c`).
            found = _PlaceholderType(name, (), {
                "_comfy_missing_name": name,
                "__module__": module or name,
                "__qualname__": leaf or name,
                "__doc__": f"Stand-in for ComfyUI's {name}, which comfy-serverless does not provide.",
                "__class_getitem__": classmethod(_class_getitem),
            })
            _placeholders[name] = found
        return found


def stand_in_type(name: str, *ours: type) -> _PlaceholderType:
    """A ComfyUI class whose objects this server makes with its own classes (ModelPatcher -> DiffusionModel):
    isinstance and issubclass accept ours and packs may derive from it, but building one the ComfyUI way
    (calling it) raises MissingComfyInternal."""
    stand_in = placeholder(name, record=False)
    for cls in ours:
        stand_in.register(cls)
    return stand_in


def missing_attribute(module_name: str, attribute: str, depth: int = 1):
    """For an adapter module's `__getattr__`: a placeholder for `from module import attribute` and
    `module.attribute`, an AttributeError for probes and dunder names. `depth` is how many frames above the
    caller the accessing code runs (1: the caller is the module's `__getattr__` itself)."""
    if _is_dunder(attribute) or not _is_plain_access(sys._getframe(depth + 1)):
        raise AttributeError(f"module {module_name!r} has no attribute {attribute!r}")
    return placeholder(f"{module_name}.{attribute}")


def package_attribute(package: str, attribute: str, depth: int = 1):
    """For an adapter package's `__getattr__` (`import comfy` then `comfy.samplers`, as packs do): the submodule,
    imported now; a placeholder module when no file provides it, except for probes (hasattr), which see only
    real submodules."""
    if _is_dunder(attribute):
        raise AttributeError(f"module {package!r} has no attribute {attribute!r}")
    fullname = f"{package}.{attribute}"
    if not _is_plain_access(sys._getframe(depth + 1)):
        parent = sys.modules.get(package)
        if importlib.machinery.PathFinder.find_spec(fullname, getattr(parent, "__path__", None)) is None:
            raise AttributeError(f"module {package!r} has no attribute {attribute!r}")
    return importlib.import_module(fullname)


class _PlaceholderLoader(importlib.abc.Loader):
    """A missing module is the same placeholder as the missing attribute of that name: `from a.b import c`
    imports `a.b.c` as a submodule when `a.b` is a placeholder (importlib cannot tell a module from a class
    there), so both spellings must give one object. importlib makes it a package (`__path__`), so deeper
    modules can be imported under it."""

    def create_module(self, spec):
        return placeholder(spec.name)

    def exec_module(self, module) -> None:
        pass


class _MissingModuleFinder(importlib.abc.MetaPathFinder):
    """Last on sys.meta_path: a module under comfy / comfy_extras / comfy_execution that no file provides
    becomes a placeholder module."""

    def find_spec(self, fullname, path=None, target=None):
        root = fullname.partition(".")[0]
        if root not in PLACEHOLDER_ROOTS or "." not in fullname:
            return None
        _record(fullname)
        return importlib.machinery.ModuleSpec(fullname, _PlaceholderLoader(), is_package=True)


class _OwnPrefixGuard(importlib.abc.MetaPathFinder):
    """First on sys.meta_path: the adapter modules exist once, under their ComfyUI names only."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == _OWN_PREFIX or fullname.startswith(_OWN_PREFIX + "."):
            raise ModuleNotFoundError(f"{fullname}: ComfyUI's module names are importable only by their own "
                                      f"names (folder_paths, nodes, comfy...), in a process that loads node packs",
                                      name=fullname)
        return None


# -- installing ------------------------------------------------------------------------------------------

def install() -> None:
    """Makes ComfyUI's module names importable in this process (idempotent, thread-safe)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        sys.meta_path.insert(0, _OwnPrefixGuard())
        sys.meta_path.append(_MissingModuleFinder())
        _installed = True
        log.info("ComfyUI module names installed for custom node packs (%s)", ROOT)


def is_installed() -> bool:
    return _installed
