"""The guest's kernel modules: which ones a wanted set pulls in, and an order insmod accepts.

Debian's kernel packages ship no modules.dep (depmod runs at install time, and
the kernel is never installed here), so the dependencies come from each
module's `.modinfo`, as depmod reads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from core.errors import FailedPrecondition
from vm_backend.guest_image.elf import read_elf


def module_name(path: str | Path) -> str:
    """`.../virtio-rng.ko` -> `virtio_rng`: the kernel treats - and _ alike in module names."""
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def load_order(deps: Mapping[str, Iterable[str]], wanted: Iterable[str], builtin: Iterable[str] = ()) -> list[str]:
    """Every module `wanted` needs, dependencies first (a valid insmod order); builtins are skipped.

    Deterministic: dependencies are visited in sorted order, roots in the order given.
    """
    skip = set(builtin)
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in skip or state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise FailedPrecondition(f"kernel modules: dependency cycle {' -> '.join((*chain, name))}")
        if name not in deps:
            raise FailedPrecondition(f"kernel module {name} not found (needed by {' -> '.join(chain) or 'the guest'})")
        state[name] = "visiting"
        for dep in sorted(deps[name]):
            visit(dep, (*chain, name))
        state[name] = "done"
        order.append(name)

    for root in wanted:
        visit(root, ())
    return order


def module_deps(index: Mapping[str, Path], wanted: Iterable[str]) -> dict[str, list[str]]:
    """The `depends=` lists of `wanted` and of what it pulls in; only the modules reached are read."""
    deps: dict[str, list[str]] = {}
    todo = [name for name in wanted if name in index]
    while todo:
        name = todo.pop()
        if name in deps:
            continue
        depends = read_elf(index[name].read_bytes()).modinfo.get("depends", "")
        deps[name] = [module_name(d) for d in depends.split(",") if d]
        todo += [d for d in deps[name] if d in index]
    return deps
