"""The import graph of builder and runtime, read from the source: layered without a circle, the kernel's runtime
apart from the builder and from the training stack. The builder's layers, bottom up: options, models (the registry)
and versions; stages (records and custody); the stages' modules (folds, train, merge, export, tfidf, knn); kinds;
ensemble; package; build; cv; cli."""

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("builder", "runtime")
TRAINING_STACK = {"torch", "transformers", "peft"}  # not in the Kaggle image the kernel runs offline in


def modules() -> dict[str, tuple[ast.Module, bool]]:
    """Each module's dotted name -> its parsed source and whether it is a package's __init__."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (ast.parse(path.read_text(), str(path)), is_package)
    return found


def imported(name: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> list[str]:
    """The absolute names an import statement of module `name` loads: `from .x import y` is x.y, a module or a name
    in x."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # relative: from the module's package, one package up per dot beyond the first
        package = name.split(".")[: len(name.split(".")) + is_package - node.level]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{a.name}" for a in node.names]


def at_import(tree: ast.AST) -> Iterator[ast.AST]:
    """The nodes that run when the module is imported: all but the bodies of functions."""
    for node in ast.iter_child_nodes(tree):
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from at_import(node)


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Edges between the project's modules, from imports anywhere in a module (inside functions too), and the
    outside packages each module imports when it is imported."""
    found = modules()
    edges: dict[str, set[str]] = {name: set() for name in found}
    outside: dict[str, set[str]] = {name: set() for name in found}
    for name, (tree, is_package) in found.items():
        eager = {id(n) for n in at_import(tree)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for full in imported(name, node, is_package):
                target = full
                while target and target not in found:  # a name inside a module, or a module outside the project
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
                elif not target and id(node) in eager:
                    outside[name].add(full.partition(".")[0])
    return edges, outside


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as module names from and back to its first, or None."""
    done: set[str] = set()

    def walk(path: list[str]) -> list[str] | None:
        for target in sorted(edges[path[-1]]):
            if target in path:
                return path[path.index(target):] + [target]
            if target not in done and (found := walk(path + [target])):
                return found
        done.add(path[-1])
        return None

    return next((found for name in sorted(edges) if name not in done and (found := walk([name]))), None)


def test_no_module_imports_itself_through_others():
    """Imports inside functions count: they run all the same. Before: stages imported models (FAMILIES), which
    imported stages (folder_files), and package (versions, for provenance), which imports every stage through
    kinds: ten builder modules in one circle."""
    edges, _ = graph()
    found = cycle(edges)
    assert found is None, f"import circle: {' -> '.join(found)}"


def test_the_cycle_finder_names_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_runtime_never_imports_the_builder():
    edges, _ = graph()
    found = sorted(f"{m} -> {t}" for m, targets in edges.items() if m.startswith("runtime") for t in targets if t.startswith("builder"))
    assert not found, f"the kernel has no builder: {', '.join(found)}"


def test_the_runtime_leaves_the_training_stack_out_of_its_module_level():
    """The kernel's image has no torch, transformers nor peft: a runtime module importing one at module level
    would stop the kernel before it scored a row."""
    _, outside = graph()
    found = sorted(f"{m} imports {t}" for m, names in outside.items() if m.startswith("runtime") for t in names & TRAINING_STACK)
    assert not found, f"at module level: {', '.join(found)}"
