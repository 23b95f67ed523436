"""The package's shape, read from its source: no import cycle (late imports included), the plugin never imports
the experiment kit (gn_det.analysis), and nothing rebinds an attribute of a detectron2 module (assignment,
setattr, mock.patch)."""
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


def rebinds(node, d2_names):
    """(object, attribute) when ``node`` rebinds an attribute of a detectron2 module or object: an assignment
    (``d2.attr = ...``, augmented or annotated), ``setattr(d2, ...)``, ``mock.patch.object(d2, ...)`` or
    ``mock.patch("detectron2...")``; else None."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
        node, (ast.AugAssign, ast.AnnAssign)) else []
    for target in targets:
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id in d2_names:
            return target.value.id, target.attr
    if not isinstance(node, ast.Call) or not node.args:
        return None
    callee = ast.unparse(node.func)
    first = node.args[0]
    if (callee == "setattr" or callee.endswith("patch.object")) and isinstance(first, ast.Name) \
            and first.id in d2_names:
        return first.id, ast.unparse(node.args[1]) if len(node.args) > 1 else "?"
    if callee.endswith("patch") and isinstance(first, ast.Constant) and str(first.value).startswith("detectron2"):
        return tuple(str(first.value).rsplit(".", 1))
    return None


def test_nothing_rebinds_a_detectron2_attribute():
    for name, (tree, _is_package) in modules().items():
        d2_names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                d2_names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("detectron2"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("detectron2"):
                d2_names.update(a.asname or a.name for a in node.names)
        for node in ast.walk(tree):
            assert rebinds(node, d2_names) is None, (name, rebinds(node, d2_names), node.lineno)


def test_the_rebinding_check_sees_each_form():
    def node(source):
        statement = ast.parse(source).body[0]
        return statement.value if isinstance(statement, ast.Expr) else statement

    d2 = {"defaults", "comm"}
    for source in ("defaults.create_ddp_model = f", "comm.x += 1", "defaults.y: int = 2",
                   "setattr(defaults, 'create_ddp_model', f)", "mock.patch.object(defaults, 'create_ddp_model', f)",
                   "patch.object(comm, 'get_world_size', f)", "mock.patch('detectron2.engine.defaults.launch')"):
        assert rebinds(node(source), d2) is not None, source
    for source in ("other.attr = 1", "setattr(self, 'x', 1)", "mock.patch.object(gn_det, 'x', f)", "f(defaults)"):
        assert rebinds(node(source), d2) is None, source
