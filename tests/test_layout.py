"""The package's shape, read from its source: no import cycle (late imports included), the plugin never imports
the experiment kit (gn_det.analysis), and nothing assigns to an attribute of a detectron2 module."""
import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "gn_det")
KIT = "gn_det.analysis"


def modules():
    """{module name: parsed source} of every module of gn_det."""
    found = {}
    for folder, _dirs, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                with open(path) as f:
                    found[name] = (ast.parse(f.read(), path), parts[-1] == "__init__")
    return found


def imports(name, tree, is_package, known):
    """The gn_det modules that module ``name`` imports anywhere in its source."""
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {t for t in targets if t in known and t != name}


def graph():
    found = modules()
    return {name: imports(name, tree, is_package, found) for name, (tree, is_package) in found.items()}


def test_no_import_cycle():
    edges = graph()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_the_plugin_never_imports_the_experiment_kit():
    for name, targets in graph().items():
        if not name.startswith(KIT):
            assert not any(t.startswith(KIT) for t in targets), (name, sorted(targets))


def test_nothing_assigns_to_a_detectron2_attribute():
    for name, (tree, _is_package) in modules().items():
        d2_names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                d2_names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("detectron2"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("detectron2"):
                d2_names.update(a.asname or a.name for a in node.names)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                    assert target.value.id not in d2_names, (name, target.value.id, target.attr, node.lineno)
