"""ComfyUI's `folder_paths` for custom node packs: a face over `comfy_serverless.paths` (the current server's folders).

Directories are the current server's (`paths.current()`), so the module-level values ComfyUI exposes as plain
attributes (`models_dir`, `output_directory`, ...) are computed on access (PEP 562). `folder_names_and_paths` is a
live view of the server's model registry: a folder a pack registers here (by assignment, with
`add_model_folder_path`, or by editing an entry's directory list or extensions) is the same entry `/models`,
`/models/<folder>` and the loader combos read. The folders a pack set or changed are recorded per server; the
catalogue snapshot keeps them (catalog/snapshot.py), so a front that has not imported the pack knows them too.

File lists are not cached (ComfyUI keeps a cache checked against directory times; listing is cheap here), so
`cache_helper` and `filename_list_cache` exist only for packs that touch them.
"""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Collection, Iterable, MutableMapping

from comfy_serverless import context, paths
from comfy_serverless.catalog.comfy_modules import missing_attribute
from comfy_serverless.catalog.snapshot import PACK_FOLDERS_SLOT
from comfy_serverless.nodes.image_files import _substitute, save_image_path

supported_pt_extensions: set[str] = set(paths.MODEL_EXTENSIONS)
SYSTEM_USER_PREFIX = "__"
extension_mimetypes_cache: dict[str, str] = {"webp": "image", "fbx": "model"}
filename_list_cache: dict = {}  # never filled: lists are read from disk each time


def _folders() -> paths.Folders:
    return paths.current()


def _touched() -> set:
    """Model folders whose entry a pack set or changed through this module (per server)."""
    return context.current().slot(PACK_FOLDERS_SLOT, set)


def _directory_values() -> dict:
    folders = _folders()
    return {
        "base_path": folders.base,
        "models_dir": os.path.join(folders.base, "models"),
        "output_directory": folders.output,
        "input_directory": folders.input,
        "temp_directory": folders.temp,
        "user_directory": folders.user,
    }


_DIRECTORY_NAMES = frozenset({"base_path", "models_dir", "output_directory", "input_directory", "temp_directory",
                              "user_directory"})


def __getattr__(name: str):
    """The directory values of the current server; a placeholder for a ComfyUI name this module lacks."""
    if name in _DIRECTORY_NAMES:
        return _directory_values()[name]
    return missing_attribute(__name__, name)


# -- the model folder registry ------------------------------------------------------------------------------

def _extensions(values: Iterable[str] | None) -> tuple[str, ...]:
    return tuple(sorted({str(v).lower() for v in values or ()}))


class _Extensions(set):
    """A folder's extensions as ComfyUI hands them out (a set); changing it changes the server's entry."""

    def __init__(self, folders: paths.Folders, folder: str, values):
        super().__init__(values)
        self._folders = folders
        self._folder = folder

    def _store(self) -> None:
        entry = self._folders.models.get(self._folder)
        if entry is not None:
            self._folders.models[self._folder] = (entry[0], _extensions(self))
            _touched().add(self._folder)


def _writing(method_name: str):
    method = getattr(set, method_name)

    def write_through(self, *args):
        result = method(self, *args)
        self._store()
        return self if method_name.startswith("__i") else result

    write_through.__name__ = method_name
    return write_through


for _name in ("add", "discard", "remove", "pop", "clear", "update", "difference_update", "intersection_update",
              "symmetric_difference_update", "__ior__", "__iand__", "__isub__", "__ixor__"):
    setattr(_Extensions, _name, _writing(_name))


class _Directories(list):
    """A folder's directories as ComfyUI hands them out (a list); changing it changes the server's entry."""

    def __init__(self, folders: paths.Folders, folder: str, values):
        super().__init__(values)
        self._folders = folders
        self._folder = folder

    def _store(self) -> None:
        entry = self._folders.models.get(self._folder)
        if entry is not None:
            self._folders.models[self._folder] = (list(self), entry[1])
            _touched().add(self._folder)


def _list_writing(method_name: str):
    method = getattr(list, method_name)

    def write_through(self, *args):
        result = method(self, *args)
        self._store()
        return self if method_name.startswith("__i") else result

    write_through.__name__ = method_name
    return write_through


for _name in ("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse", "__setitem__",
              "__delitem__", "__iadd__", "__imul__"):
    setattr(_Directories, _name, _list_writing(_name))


class _FolderRegistry(MutableMapping):
    """`folder_names_and_paths`: {folder: ([directories], {extensions})} over the current server's registry.

    Changing the directory list or the extension set handed out changes the server's entry (appending adds a
    directory); assigning an entry replaces it. Legacy names (`clip`, `unet`) reach their current folders.
    """

    def __getitem__(self, folder: str):
        folders = _folders()
        name = folders.canonical(folder)
        dirs, exts = folders.models[name]
        return _Directories(folders, name, dirs), _Extensions(folders, name, exts)

    def __setitem__(self, folder: str, entry) -> None:
        dirs, exts = entry
        folders = _folders()
        name = folders.canonical(folder)
        folders.models[name] = (dirs if isinstance(dirs, list) else list(dirs), _extensions(exts))
        _touched().add(name)

    def __delitem__(self, folder: str) -> None:
        folders = _folders()
        name = folders.canonical(folder)
        del folders.models[name]
        _touched().add(name)

    def __contains__(self, folder) -> bool:
        folders = _folders()
        return isinstance(folder, str) and folders.canonical(folder) in folders.models

    def __iter__(self):
        return iter(list(_folders().models))

    def __len__(self) -> int:
        return len(_folders().models)

    def copy(self) -> dict:
        return {name: (list(dirs), set(exts)) for name, (dirs, exts) in _folders().models.items()}

    def __repr__(self) -> str:
        return f"folder_names_and_paths({self.copy()!r})"


folder_names_and_paths = _FolderRegistry()


def map_legacy(folder_name: str) -> str:
    return paths.Folders.canonical(folder_name)


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    """Adds a directory to a model folder (first with is_default); an unknown folder is created listing every
    file, as in ComfyUI."""
    folders = _folders()
    name = folders.canonical(folder_name)
    if name not in folders.models:
        folders.models[name] = ([], ())
    folders.add_model_path(name, full_folder_path, first=is_default)
    _touched().add(name)


def get_folder_paths(folder_name: str) -> list[str]:
    return _folders().model_dirs(folder_name)


def get_filename_list(folder_name: str) -> list[str]:
    """Relative paths of a model folder's files, as the server's disk-backed list: a combo built from it is
    stored in the catalogue snapshot as its folder, not its files, and read again at every request (folders a
    pack registered included: the snapshot records them). KeyError for an unknown folder, as in ComfyUI."""
    return _folders().list_models(folder_name)


def get_filename_list_(folder_name: str) -> tuple[list[str], dict[str, float], float]:
    return list(get_filename_list(folder_name)), {}, time.perf_counter()


def cached_filename_list_(folder_name: str):
    return None


def invalidate_cache(folder_name: str) -> None:
    """Nothing is cached here."""


class CacheHelper:
    """ComfyUI's file-list cache switch; lists are never cached here, so entering it changes nothing."""

    def __init__(self):
        self.cache: dict = {}
        self.active = False

    def get(self, key, default=None):
        return default

    def set(self, key, value) -> None:
        pass

    def clear(self) -> None:
        self.cache.clear()

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc_info):
        self.active = False


cache_helper = CacheHelper()


def get_full_path(folder_name: str, filename: str) -> str | None:
    """Absolute path of a file in a model folder, or None (unknown folder, no such file, or a name that leaves
    the folder)."""
    folders = _folders()
    if folders.canonical(folder_name) not in folders.models:
        return None
    return folders.model_path(folder_name, filename)


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    found = get_full_path(folder_name, filename)
    if found is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return found


def recursive_search(directory: str, excluded_dir_names: list[str] | None = None
                     ) -> tuple[list[str], dict[str, float]]:
    """(every file under directory, relative; {directory and subdirectories: mtime})."""
    if not os.path.isdir(directory):
        return [], {}
    excluded = set(excluded_dir_names or ())
    files: list[str] = []
    times: dict[str, float] = {}
    for root, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if d not in excluded]
        try:
            times[root] = os.path.getmtime(root)
        except OSError:
            continue
        files += [os.path.relpath(os.path.join(root, f), directory) for f in filenames]
    return files, times


def filter_files_extensions(files: Collection[str], extensions: Collection[str]) -> list[str]:
    wanted = {e.lower() for e in extensions}
    return sorted(f for f in files if not wanted or os.path.splitext(f)[-1].lower() in wanted)


def filter_files_content_types(files: list[str], content_types) -> list[str]:
    """The files whose MIME type's major part ('image', 'video', 'audio', 'model') is among content_types."""
    result = []
    for file in files:
        extension = file.rsplit(".", 1)[-1]
        kind = extension_mimetypes_cache.get(extension)
        if kind is None:
            mime, _ = mimetypes.guess_type(file, strict=False)
            if not mime:
                continue
            kind = extension_mimetypes_cache.setdefault(extension, mime.split("/")[0])
        if kind in content_types:
            result.append(file)
    return result


# -- input / output / temp / user ---------------------------------------------------------------------------

def get_input_directory() -> str:
    return _folders().input


def get_output_directory() -> str:
    return _folders().output


def get_temp_directory() -> str:
    return _folders().temp


def get_user_directory() -> str:
    return _folders().user


def set_input_directory(input_dir: str) -> None:
    _folders().input = os.fspath(input_dir)


def set_output_directory(output_dir: str) -> None:
    _folders().output = os.fspath(output_dir)


def set_temp_directory(temp_dir: str) -> None:
    _folders().temp = os.fspath(temp_dir)


def set_user_directory(user_dir: str) -> None:
    _folders().user = os.fspath(user_dir)


def get_system_user_directory(name: str = "system") -> str:
    if not name or not isinstance(name, str) or not name.replace("_", "").isalnum() or name.startswith("_"):
        raise ValueError(f"Invalid system user name: {name!r}")
    return os.path.join(get_user_directory(), f"{SYSTEM_USER_PREFIX}{name}")


def get_public_user_directory(user_id: str) -> str | None:
    if not user_id or not isinstance(user_id, str) or user_id.startswith(SYSTEM_USER_PREFIX):
        return None
    return os.path.join(get_user_directory(), user_id)


def get_directory_by_type(type_name: str) -> str | None:
    return _folders().directory_for(type_name)


def get_input_subfolders() -> list[str]:
    """Every subdirectory of the input directory, relative, '/' separated, sorted."""
    root = get_input_directory()
    found = []
    for current, _dirs, _files in os.walk(root):
        relative = os.path.relpath(current, root)
        if relative != ".":
            found.append(relative.replace(os.sep, "/"))
    return sorted(found)


_ANNOTATION_SUFFIXES = (("[output]", "output"), ("[input]", "input"), ("[temp]", "temp"))


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """'x.png [output]' -> ('x.png', output directory); a name without annotation -> (name, None)."""
    for suffix, kind in _ANNOTATION_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix) - 1], get_directory_by_type(kind)
    return name, None


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    name, base = annotated_filepath(name)
    if base is None:
        base = default_dir if default_dir is not None else get_input_directory()
    return os.path.join(base, name)


def exists_annotated_filepath(name: str) -> bool:
    name, base = annotated_filepath(name)
    return os.path.exists(os.path.join(base if base is not None else get_input_directory(), name))


def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0, image_height: int = 0
                        ) -> tuple[str, str, int, str, str]:
    """(folder, file name base, first free counter, subfolder, prefix after substitution) for saving under
    output_dir: the same rules as SaveImage (%width% %height% %year% ... and no escaping output_dir)."""
    if "%" in filename_prefix:
        filename_prefix = _substitute(filename_prefix, image_width, image_height)
    folder, base, counter, subfolder = save_image_path(filename_prefix, output_dir, image_width, image_height)
    return folder, base, counter, subfolder, filename_prefix
