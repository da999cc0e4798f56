"""The guest's Python: the part of the 3.11 standard library the agent imports, protobuf with its upb runtime,
and the agent.

Everything but the agent ships as unchecked bytecode only (no sources, no
docstrings). Of the standard library, only what the agent can import goes in:
`modulefinder` follows every import statement from the agent (and protobuf),
function-level ones included, through the guest's own standard library, plus
what Python imports without an import statement (`-m` runs through runpy, codecs
are looked up in `encodings` by name, datetime's C code imports `_strptime`).
The bytecode is compiled by the host's Python, which must therefore be the
guest's version.
"""

from __future__ import annotations

import modulefinder
import py_compile
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import google.protobuf

import protos
from core.errors import FailedPrecondition
from vm_backend.guest_image.cpio import Tree
from vm_backend.guest_image.linker import Linker, resolve

GUEST_PYTHON = "3.11"

_AGENT_DIR = Path(__file__).parent.parent / "agent"
_AGENT_PB2 = Path(protos.__file__).parent / "agent_pb2.py"
_PROTOBUF_DIR = Path(google.protobuf.__file__).parent
# protobuf's C runtime: under TCG it imports the agent's messages in about half the time of the
# pure-Python one, and parses each message faster.
_UPB_EXTENSION = _PROTOBUF_DIR.parent / "_upb" / "_message.abi3.so"
_AGENT_ROOT = "opt/tandem/agent"
_STDLIB = f"usr/lib/python{GUEST_PYTHON}"

# Imported without an import statement the finder could follow (see the module's docstring).
_IMPLICIT_IMPORTS = ("runpy", "encodings", "_strptime")
# Reached only from the standard library's self-tests and interactive helps (`if __name__ == "__main__": import
# doctest` in pickle and heapq, pdb and pydoc from there), which the agent never runs.
_NEVER_RUN = ("doctest", "pdb", "pydoc", "unittest", "test")
_ENCODINGS_KEEP = {
    "__init__", "aliases", "ascii", "latin_1", "utf_8", "utf_8_sig", "utf_16", "utf_16_le", "utf_16_be",
    "utf_32", "utf_32_le", "utf_32_be", "idna", "punycode", "raw_unicode_escape", "unicode_escape",
}  # fmt: skip
_PROTOBUF_DROP = frozenset(
    {
        "testdata",
        "__pycache__",
        "json_format_benchmark.py",
        "message_benchmark.py",
        "testing_refleaks.py",
    }
)


def require_host_python() -> None:
    """The guest's bytecode is compiled by this interpreter, so it must be the guest's version."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" != GUEST_PYTHON:
        raise FailedPrecondition(f"the guest's bytecode is compiled here: run Tandem with Python {GUEST_PYTHON}")


def _tree_files(top: Path, drop: frozenset[str] = frozenset({"__pycache__"})) -> Iterator[Path]:
    """Regular files under `top`, sorted, skipping any path component in `drop` and compiled extensions."""
    for path in sorted(top.rglob("*")):
        rel = path.relative_to(top)
        if path.is_file() and not drop.intersection(rel.parts) and path.suffix not in (".pyc", ".so"):
            yield path


def sources() -> dict[str, Path]:
    """The local files this bundle ships (the agent, its messages, protobuf), by a stable label."""
    files = {"protos/agent_pb2.py": _AGENT_PB2}
    if _AGENT_DIR.is_dir():
        files |= {f"agent/{p.relative_to(_AGENT_DIR)}": p for p in _tree_files(_AGENT_DIR)}
    files |= {f"protobuf/{p.relative_to(_PROTOBUF_DIR)}": p for p in _tree_files(_PROTOBUF_DIR, _PROTOBUF_DROP)}
    files["protobuf/_upb/_message.abi3.so"] = _UPB_EXTENSION
    return files


def _compile(source: Path, staging: Path, guest: str, optimize: int) -> Path:
    """Bytecode that is never checked against a source (hash-based, unchecked): import is one read under TCG."""
    out = staging / guest
    out.parent.mkdir(parents=True, exist_ok=True)
    py_compile.compile(
        str(source),
        cfile=str(out),
        dfile=f"/{guest}",
        doraise=True,
        optimize=optimize,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    return out


def _add_sourceless(tree: Tree, staging: Path, source: Path, guest_py: str, optimize: int = 2) -> None:
    """`x.py` becomes `x.pyc` in its place (legacy layout): no source shipped, docstrings and asserts gone."""
    guest = guest_py.removesuffix(".py") + ".pyc"
    tree.copy(guest, _compile(source, staging, guest, optimize), 0o644)


def agent_imports(stdlib: Path, workdir: Path) -> set[Path]:
    """The files of `stdlib` (an unpacked guest standard library) that the agent can import, by import statement
    or implicitly.

    The finder cannot follow namespace packages (`google` is one), so it searches a layout of the agent and
    protobuf made of regular packages, under `workdir`.
    """
    for package, source in (("vm_backend/agent", _AGENT_DIR), ("google/protobuf", _PROTOBUF_DIR)):
        (workdir / package).parent.mkdir(parents=True, exist_ok=True)
        (workdir / package).symlink_to(source)
    for package in ("vm_backend", "google", "protos"):
        (workdir / package).mkdir(exist_ok=True)
        (workdir / package / "__init__.py").touch()
    (workdir / "protos" / _AGENT_PB2.name).symlink_to(_AGENT_PB2)
    finder = modulefinder.ModuleFinder(
        path=[str(stdlib), str(stdlib / "lib-dynload"), str(workdir)], excludes=list(_NEVER_RUN)
    )
    codecs = [f"encodings.{name}" for name in sorted(_ENCODINGS_KEEP - {"__init__"})]
    for name in ("vm_backend.agent.__main__", *_IMPLICIT_IMPORTS, *codecs):
        finder.import_hook(name)
    found = {Path(file) for module in finder.modules.values() if (file := getattr(module, "__file__", None))}
    return {path for path in found if path.is_relative_to(stdlib)}


def add_stdlib(tree: Tree, root: Path, staging: Path, linker: Linker) -> tuple[int, list[str]]:
    """What the agent imports of the standard library; returns the module count and the extensions left out
    (and why)."""
    stdlib = root / _STDLIB
    modules = 0
    dropped: list[str] = []
    for path in sorted(agent_imports(stdlib, staging / "imports")):
        rel = path.relative_to(stdlib)
        if path.suffix == ".py":
            real = root / resolve(root, str(path.relative_to(root)))
            _add_sourceless(tree, staging, real, f"{_STDLIB}/{rel}")
            modules += 1
            continue
        extension = str(path.relative_to(root))
        missing = linker.add(extension)
        if missing:
            dropped.append(f"{path.name.split('.')[0]} ({', '.join(missing)})")
        else:
            tree.copy(extension, path, 0o644)
    return modules, dropped


def add_agent(tree: Tree, staging: Path) -> int:
    """The agent keeps its sources (readable tracebacks) next to unchecked .pyc files in __pycache__."""
    agent_files = list(_tree_files(_AGENT_DIR)) if _AGENT_DIR.is_dir() else []
    files = [(p, f"{_AGENT_ROOT}/vm_backend/agent/{p.relative_to(_AGENT_DIR)}") for p in agent_files]
    files.append((_AGENT_PB2, f"{_AGENT_ROOT}/protos/agent_pb2.py"))
    for package in ("vm_backend", "protos"):
        tree.file(f"{_AGENT_ROOT}/{package}/__init__.py", b"")
    for source, guest in files:
        tree.copy(guest, source, 0o644)
        if source.suffix == ".py":
            cached = Path(guest).parent / "__pycache__" / f"{source.stem}.cpython-{GUEST_PYTHON.replace('.', '')}.pyc"
            tree.copy(str(cached), _compile(source, staging, str(cached), 0), 0o644)
    return len(agent_files)


def add_protobuf(tree: Tree, root: Path, staging: Path, linker: Linker) -> None:
    """protobuf's Python sources as bytecode, and its upb extension (whose libraries go to `linker`)."""
    for path in _tree_files(_PROTOBUF_DIR, _PROTOBUF_DROP):
        guest = f"{_AGENT_ROOT}/google/protobuf/{path.relative_to(_PROTOBUF_DIR)}"
        if path.suffix == ".py":
            _add_sourceless(tree, staging, path, guest)
    upb = f"{_AGENT_ROOT}/google/_upb/{_UPB_EXTENSION.name}"
    (root / upb).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_UPB_EXTENSION, root / upb)  # where the linker looks for what it needs
    missing = linker.add(upb)
    if missing:
        raise FailedPrecondition(f"protobuf's upb extension needs {', '.join(missing)}: add its package")
    tree.copy(upb, root / upb, 0o755)
