"""Layout promises of issue 13, checked on the source: imports among experiments/ run one
way (no circle, function-level imports included; typing-only imports excepted), and no module
outside experiments/tasks/ asks a task for its family."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module(path: pathlib.Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: pathlib.Path, known: set[str]) -> set[str]:
    """experiments.* modules `path` imports anywhere outside `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    deps = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("experiments"):
            for alias in node.names:  # `from experiments import x` may name a module x
                full = f"{node.module}.{alias.name}"
                deps.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("experiments")}
    return deps - {_module(path)}


def import_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "experiments").rglob("*.py"))
    known = {_module(f) for f in files}
    return {_module(f): _imports(f, known) & known for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if not state.get(dep) and (cycle := visit(dep, stack)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (cycle := visit(node, [])):
            return cycle
    return None


def test_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_among_experiments_modules():
    graph = import_graph()
    assert "experiments.train" in graph and "experiments.tasks.base" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_only_tasks_ask_a_task_for_its_family():
    pattern = re.compile(r"\.family\b|\[[\"']family[\"']\]")
    offenders = [
        f"{path.relative_to(ROOT)}:{i}"
        for folder in ("attn", "experiments", "configs")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "tasks" not in path.relative_to(ROOT).parts
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
