"""The import order of quantkit's parts (docs/README.md#architecture), checked on the source: every import of every
module, function-local ones included, may only reach its own part or a lower one, and never a private name
(``_x``) of another part."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quantkit"

#: lowest first; a module may import modules of its own layer and of the layers before it
LAYERS: list[tuple[str, ...]] = [
    ("errors", "sysinfo", "version", "log", "files", "report", "datasets"),  # leaves: no other quantkit part
    ("calibrate",),  # observers and calibration loops: plain tensor statistics that quantizers own
    ("quantizers",),
    ("ops",),
    ("nn",),
    ("models",),
    ("graph",),
    ("schemes",),
    ("api",),
    ("qat",),
    ("export",),
    ("",),  # the package itself (quantkit/__init__.py): the public facade
    ("cli", "__main__"),
]
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("quantkit",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def part_of(module: str) -> str:
    """``quantkit.export.emit.binary`` -> ``export``; the package itself -> ``""``."""
    return module.split(".")[1] if module.count(".") else ""


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports_of(module: str, path: Path) -> list[tuple[int, str, str | None]]:
    """(line, imported quantkit module, imported name or None) for every import in the file, at any depth."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "quantkit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "quantkit":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                # ``from quantkit import ops`` imports the module quantkit.ops, not a name of the package
                found.append((node.lineno, sub, None) if sub in MODULES else (node.lineno, target, alias.name))
    return found


def test_every_module_has_a_layer():
    unplaced = sorted({part_of(m) for m in MODULES} - set(RANK))
    assert not unplaced, f"place these parts of quantkit in LAYERS (and docs/README.md): {unplaced}"


def test_resolver_sees_relative_function_local_and_package_imports(tmp_path):
    """The checker itself: relative imports, imports inside functions and ``from .. import mod`` are all found."""
    src = tmp_path / "m.py"
    src.write_text("from ..graph.passes import replace_module\n\ndef f():\n    from .. import ops\n"
                   "    import quantkit.export.onnx_export\n")
    got = imports_of("quantkit.nn.m", src)
    assert (1, "quantkit.graph.passes", "replace_module") in got
    assert (4, "quantkit.ops", None) in got and (5, "quantkit.export.onnx_export", None) in got


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layer_order(module):
    here = part_of(module)
    problems = []
    for line, target, name in imports_of(module, MODULES[module]):
        there = part_of(target)
        if there == here:
            continue
        where = f"{module}:{line}"
        if RANK[there] > RANK[here]:
            problems.append(f"{where} imports {target} (layer {there or 'quantkit'!r} is above {here or 'quantkit'!r})")
        private = [p for p in target.split(".")[1:] + ([name] if name else []) if _is_private(p)]
        if private:
            problems.append(f"{where} imports the private {'.'.join(private)} of another part ({target})")
    assert not problems, "\n".join(problems)
