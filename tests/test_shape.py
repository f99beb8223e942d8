"""The code's shape, checked: no module, benchmark or example reaches into another module's
private names, and the package has no import circle (counting imports inside functions)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "semievol"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (ROOT / name.replace(".", "/") / "__init__.py").is_file()


def imports(path: Path):
    """(imported module, names) for every import in a file, relative ones resolved."""
    here = module_name(path) if path.is_relative_to(PACKAGE) else ""
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import cost` imports the module semievol.cost
                sub = f"{base}.{alias.name}"
                if is_package(sub) or (ROOT / f"{sub.replace('.', '/')}.py").is_file():
                    yield sub, []
                else:
                    yield base, [alias.name]


def sources():
    return [p for folder in ("semievol", "benchmarks", "examples")
            for p in sorted((ROOT / folder).rglob("*.py"))]


def test_nothing_imports_another_modules_private_names():
    found = [f"{path.relative_to(ROOT)}: {module}.{name}"
             for path in sources() for module, names in imports(path)
             if module.startswith("semievol") for name in names
             if name.startswith("_") and not name.startswith("__")]
    assert found == []


def test_no_private_attribute_of_an_imported_semievol_module_is_read():
    found = []
    for path in sources():
        tree = ast.parse(path.read_text())
        modules = {alias.asname or alias.name for node in ast.walk(tree)
                   if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "")
                                                          .startswith("semievol"))
                   for alias in node.names}
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}"
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in modules and node.attr.startswith("_")
                  and not node.attr.startswith("__")]
    assert found == []


def test_the_package_has_no_import_circle():
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        graph[name] = {module for module, _ in imports(path)
                       if module.startswith("semievol") and module != name
                       and not name.startswith(module + ".")}  # a module's own packages
    cycles, done = [], set()

    def visit(node, trail):
        if node in trail:
            cycles.append(trail[trail.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    assert cycles == []
