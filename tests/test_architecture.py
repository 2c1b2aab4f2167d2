"""The house rules of docs/architecture.md, checked on the code: arrows only go down between the
rooms of `pipeline/`, no import cycles (lazy imports included), no private names across modules,
no module over 700 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pipeline"
SHARED = {"atomic", "errors", "versions", "backend", "layout", "locking", "quiet_fd", "sheets"}
# each room and the level it sits at (docs/architecture.md, "Rules"): a room imports only rooms below
# it, or shared modules; within a room, anything.
LEVEL = {"data": 1, "backbones": 1, "features": 2, "tracking": 3, "extract": 4, "heads": 4,
         "inference": 5, "finetune": 6, "audit": 6, "export": 7, "cli": 8}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(module imported, name imported or '', line) for every project import, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.append((f"{base}.{alias.name}", "", node.lineno))
                elif base in modules:
                    found.append((base, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name in modules]
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_arrows_only_go_down_between_rooms():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        room = _room(name)
        for target, _, line in _imports(name, path, modules):
            there = _room(target)
            if there == room or there in SHARED or room in SHARED and there in SHARED:
                continue
            if room in SHARED or there not in LEVEL or room not in LEVEL or LEVEL[there] >= LEVEL[room]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "imports against the rooms' order:\n" + "\n".join(upward)


def test_no_import_cycles_and_no_private_names_across_modules():
    modules = _modules()
    graph = {name: set() for name in modules}
    private = []
    for name, path in modules.items():
        for target, imported, line in _imports(name, path, modules):
            if target != name:
                graph[name].add(target)
            if imported.startswith("_") and target != name:
                private.append(f"{path.relative_to(ROOT)}:{line} imports {target}.{imported}")
    assert not private, "\n".join(private)
    # a cycle shows up as a module that reaches itself
    for start in graph:
        seen, stack = set(), list(graph[start])
        while stack:
            node = stack.pop()
            assert node != start, f"an import cycle runs through {start}"
            if node not in seen:
                seen.add(node)
                stack.extend(graph[node])


def test_no_module_is_over_700_lines():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 700}
    assert not long, long


def test_command_modules_import_shared_helpers_not_each_other():
    modules = _modules()
    sideways = [f"{name} imports {target}" for name, path in modules.items() if name.endswith("_cmds")
                for target, _, _ in _imports(name, path, modules) if target.endswith("_cmds") and target != name]
    assert not sideways, sideways
