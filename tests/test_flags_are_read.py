"""Every flag documented as applying (settings.FLAGS, applies=True) is read by the code outside settings.py.

The scan is over the syntax tree, so comments, docstrings and look-alike names (`tensor.cpu()`,
`torch.device("cpu")`) do not count. A read is one of:
- an attribute of a settings object: `settings.port`, `s.port`, `self.settings.port`, `app.settings.port`,
  `settings.current().port`, `context.settings.port`;
- `settings.values["port"]`, `settings.values.get("port")`, `getattr(settings, "port", ...)`;
- `flag("port")`, the helper models/precision.py calls with a flag's dest;
- a property or method of Settings (settings.py) that is itself read, for the dests its body reads
  (`max_upload_bytes` reads `max_upload_size`).
"""

from __future__ import annotations

import ast
from pathlib import Path

from comfy_serverless import settings

PACKAGE = Path(settings.__file__).resolve().parent

# dest -> why nothing reads it although it applies.
EXCEPTIONS = {
    "cpu": "always true on this CPU-only server, so there is nothing to switch; accepted and not logged as "
           "inapplicable because it does describe how the server runs",
    "cache_classic": "selects the default cache mode; Settings.cache_mode falls back to it when neither "
                     "--cache-lru nor --cache-none is set",
}


def _is_settings(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return "settings" in node.id.lower() or node.id == "s"
    if isinstance(node, ast.Attribute):
        return "settings" in node.attr.lower()
    if isinstance(node, ast.Call):  # settings.current()
        return isinstance(node.func, ast.Attribute) and node.func.attr == "current" and _is_settings(node.func.value)
    return False


def _is_values(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "values" and _is_settings(node.value)


def _constant(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def names_read(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_settings(node.value):
            found.add(node.attr)
        elif isinstance(node, ast.Subscript) and _is_values(node.value):
            found.add(_constant(node.slice) or "")
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "get" and _is_values(func.value):
                found.add(_constant(node.args[0]) or "")
            elif isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) >= 2 \
                    and _is_settings(node.args[0]):
                found.add(_constant(node.args[1]) or "")
            elif isinstance(func, ast.Name) and func.id == "flag":
                found.add(_constant(node.args[0]) or "")
    return found


def member_reads() -> dict[str, set[str]]:
    """Settings method or property name -> what its body uses: `self.<name>` attributes and string constants
    (flag dests in either spelling, and the other members it relies on)."""
    tree = ast.parse(Path(settings.__file__).read_text())
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings"]
    reads = {}
    for item in cls.body:
        if isinstance(item, ast.FunctionDef):
            used = set()
            for node in ast.walk(item):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                    used.add(node.attr)
                elif (constant := _constant(node)) is not None:
                    used.add(constant)
            reads[item.name] = used
    return reads


def dests_read_outside_settings() -> set[str]:
    found: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.resolve() != Path(settings.__file__).resolve():
            found |= names_read(ast.parse(path.read_text(), str(path)))
    # A member of Settings read outside reads what its body reads (`max_upload_bytes` -> `max_upload_size`,
    # `output_dir` -> `_under_base` -> `base_dir` -> `base_directory`).
    members = member_reads()
    pending = [name for name in found if name in members]
    while pending:
        for name in members[pending.pop()] - found:
            found.add(name)
            if name in members:
                pending.append(name)
    return found


def test_every_applying_flag_is_read_somewhere():
    read = dests_read_outside_settings()
    inert = [f.name for f in settings.FLAGS if f.applies and f.dest not in read and f.dest not in EXCEPTIONS]
    assert not inert, (f"documented as applying but read nowhere outside settings.py: {inert}; read them, or "
                       "mark them applies=False (accepted for compatibility), or add them to EXCEPTIONS with why")


def test_exceptions_are_still_needed():
    read = dests_read_outside_settings()
    by_dest = {f.dest: f for f in settings.FLAGS}
    for dest in EXCEPTIONS:
        assert dest in by_dest and by_dest[dest].applies, f"{dest}: no longer an applying flag; drop the exception"
        assert dest not in read, f"{dest} is read now; drop its exception"


def test_the_scan_sees_reads_and_ignores_look_alikes():
    tree = ast.parse(
        "settings.current().preview_method\ns.tls_keyfile\nself.settings.port\n"
        "settings.values.get('extra_model_paths_config')\ngetattr(settings_module.current(), 'deterministic')\n"
        "flag('force_fp32')\n"
        "x.cpu()\ntorch.device('cpu')\n# settings.cpu_vae\n'settings.fast'\n")
    found = names_read(tree)
    assert {"preview_method", "tls_keyfile", "port", "extra_model_paths_config", "deterministic",
            "force_fp32"} <= found
    assert not {"cpu", "cpu_vae", "fast"} & found
