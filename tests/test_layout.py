"""The rooms of the project's style guide, checked: who imports whom, and how long a program's functions grow."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = {"main", "detect", "evaluate", "sample", "benchmark", "train_detector"}
MODULES = {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}
LONGEST = 60  # lines: about one screen
TOO_LONG_FOR_NOW = set()  # programs' functions allowed past a screen, by (program, name): none


def parsed(name):
    with open(MODULES[name]) as f:
        return ast.parse(f.read(), MODULES[name])


def project_imports(name):
    """The project's modules that `name` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(parsed(name)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {name}


def test_the_project_has_the_modules_this_test_knows():
    assert PROGRAMS <= set(MODULES) and "metrics" in MODULES and "reports" in MODULES


def test_no_library_module_imports_a_program():
    wrong = {name: sorted(project_imports(name) & PROGRAMS) for name in set(MODULES) - PROGRAMS}
    assert not {k: v for k, v in wrong.items() if v}, "library modules must not import programs"


def test_metrics_imports_nothing_of_the_project_but_cli():
    assert project_imports("metrics") <= {"cli"}


def test_there_is_no_import_cycle():
    graph = {name: project_imports(name) for name in MODULES}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_no_function_of_a_program_is_longer_than_a_screen():
    long = {}
    for program in PROGRAMS:
        for node in ast.walk(parsed(program)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (program, node.name) not in TOO_LONG_FOR_NOW:
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST:
                    long[f"{program}.{node.name}"] = lines
    assert not long, f"split these into functions of at most {LONGEST} lines"
