"""Write each DVC stage's code deps: the project files its module imports, found from the source.

    python -m tools.code_deps           # rewrite dvc.yaml and experiments/dvc.yaml (comments and anchors kept)
    python -m tools.code_deps --check   # exit 1, naming the stages, when a file is not what it would write

A stage runs ``python -m stages.<name>``; its code deps are every project module that module imports, directly
or not, at any depth of the code (a lazy package's names through its ``_MODULE_OF`` table), package ``__init__`` files and the C sources a module
names beside itself. A directory whose every source file is among them is written as the directory, so the lock
file stays small; a stage then re-runs only when code it can run changes.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lora", "lora_mnist", "stages", "flows")
DVC_FILES = ("dvc.yaml", "experiments/dvc.yaml")
STAGE_MODULE = re.compile(r"python -m (stages\.\w+)")
SOURCE_SUFFIXES = (".py", ".c")


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module ``path`` (the source of ``module``) imports, at any depth of its code, relative imports resolved;
    ``from a import b`` counts as ``a`` and as ``a.b`` (b may be a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    for name in list(found):  # a name of a lazy package (PEP 562) is the module its table gives
        table = lazy_table(name.rpartition(".")[0])
        if name.rpartition(".")[2] in table:
            found.add(f"{name.rpartition('.')[0]}.{table[name.rpartition('.')[2]]}")
    return found


def lazy_table(package: str) -> dict[str, str]:
    """The ``_MODULE_OF`` literal of a lazy package's __init__ (public name -> its module), else empty."""
    path = module_file(package) if package.split(".")[0] in PACKAGES else None
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["_MODULE_OF"]:
            return ast.literal_eval(node.value)
    return {}


def source_closure(module: str) -> set[str]:
    """The project files that running ``module`` reads as code, relative to the project root."""
    files: set[Path] = set()
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in PACKAGES:
            continue
        seen.add(name)
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            path = module_file(prefix)
            if path is None or path in files:
                continue
            files.add(path)
            todo += sorted(imported_modules(path, prefix))
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".c") \
                        and "/" not in node.value and (path.parent / node.value).is_file():
                    files.add(path.parent / node.value)
    return {path.relative_to(ROOT).as_posix() for path in files}


def project_modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def sources_under(directory: Path) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in directory.rglob("*")
            if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts}


def code_deps(module: str) -> list[str]:
    """The closure of ``module`` with each wholly-used package directory written as the directory, sorted."""
    files = source_closure(module)
    directories = sorted({Path(f).parent for f in files} | {p for f in files for p in Path(f).parents}, key=lambda d: len(d.parts))
    deps: set[str] = set(files)
    for directory in directories:
        if directory == Path(".") or not (ROOT / directory / "__init__.py").is_file():
            continue
        under = sources_under(ROOT / directory)
        if under and under <= files and not any(d in deps for d in map(str, directory.parents) if d != "."):
            deps = {d for d in deps if not d.startswith(f"{directory.as_posix()}/")} | {directory.as_posix()}
    return sorted(deps)


def is_code(dep: str) -> bool:
    return dep.split("/")[0] in PACKAGES


def update(dvc_file: Path) -> tuple[str, str, list[str]]:
    """(the file's text now, the text with every stage's code deps rewritten, the stages that change)."""
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, anchors and the order of keys stay
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)  # the style of the hand-written files
    text = dvc_file.read_text()
    data = yaml.load(text)
    changed, done = [], set()
    for name, stage in data["stages"].items():
        match = STAGE_MODULE.search(str(stage.get("cmd", "")))
        deps = stage.get("deps")
        if match is None or deps is None or id(deps) in done:  # an anchored list shared by stages is written once
            continue
        done.add(id(deps))
        wanted = [d for d in deps if not is_code(str(d))] + code_deps(match.group(1))
        if [str(d) for d in deps] != wanted:
            changed.append(name)
            deps[:] = wanted
    from io import StringIO

    buffer = StringIO()
    yaml.dump(data, buffer)
    return text, buffer.getvalue(), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.code_deps", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name in DVC_FILES:
        path = ROOT / name
        before, after, changed = update(path)
        if changed:
            stale.append(f"{name}: {', '.join(changed)}")
            if not args.check:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(after)
                tmp.replace(path)
    if stale and args.check:
        print(f"code deps out of date in {'; '.join(stale)}: run `python -m tools.code_deps`", file=sys.stderr)
        return 1
    for line in stale:
        print(f"rewrote {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
