"""The package's structure, drawn from its imports (function-local and type-checking ones included): no
cycles, the core never imports a job, and no module imports another module's private names."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "zflora"
JOBS = ("bench", "finetune", "serve", "export", "demo", "cli")  # built on the core; the rest is the core


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported module, imported name or '')} for every zflora import anywhere in its file."""
    out: dict[str, set[tuple[str, str]]] = {m: set() for m in mods}
    for mod, file in mods.items():
        package = mod.split(".") if file.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{name}.{alias.name}"
                    out[mod].add((full, "") if full in mods else (name, alias.name))
            elif isinstance(node, ast.Import):
                out[mod] |= {(a.name, "") for a in node.names}
    return {m: {(t, n) for t, n in deps if t.startswith("zflora") and t != m} for m, deps in out.items()}


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for m, deps in imports(mods).items():
        targets = set()
        for t, _ in deps:
            while t not in mods and "." in t:
                t = t.rsplit(".", 1)[0]
            if t != m:
                targets.add(t)
        edges[m] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def job(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in JOBS else None


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_check_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_no_job():
    bad = [(m, t) for m, ts in graph().items() if job(m) is None and m != "zflora" for t in ts if job(t)]
    assert bad == []


def test_no_private_names_cross_modules():
    bad = [(m, f"{t}.{n}") for m, deps in imports(modules()).items() for t, n in deps if n.startswith("_")]
    assert bad == []


DOCS = [Path(__file__).resolve().parents[1] / "README.md", *sorted((SRC.parents[1] / "docs").glob("*.md"))]
NAME = re.compile(r"\bzflora(?:\.[A-Za-z_]\w*)+")


def resolves(dotted: str) -> bool:
    """Whether `zflora.a.b.c` names a module or an attribute of one (a module that needs vLLM counts when
    its file exists)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("zflora"):  # an optional engine (vllm) absent here
                return (SRC.parent / Path(*module.split("."))).with_suffix(".py").is_file()
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_zflora_name_in_the_docs_exists():
    names = {m.group(0).rstrip(".") for doc in DOCS for m in NAME.finditer(doc.read_text())}
    assert len(names) > 10
    assert sorted(n for n in names if not resolves(n)) == []


def test_the_docs_name_check_can_fail():
    assert resolves("zflora.fuse") and resolves("zflora.finetune.cloze.to_cloze")
    assert not resolves("zflora.vllm_model") and not resolves("zflora.fusion.no_such_name")


def test_links_between_docs_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = [(doc.name, m.group(1)) for doc in DOCS for m in link.finditer(doc.read_text())
              if not m.group(1).startswith("http") and not (doc.parent / m.group(1)).exists()]  # fmt: skip
    assert broken == []
