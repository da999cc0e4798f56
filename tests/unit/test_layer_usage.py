"""sandbox.oci.layer_usage: a writable layer's figures, measured within a budget and kept until they are due."""

from __future__ import annotations

import os

from sandbox.oci import layer_usage
from sandbox.oci.layer_usage import LayerUsage, LayerWalk, measure


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tree(root, files: int, dirs: int = 1):
    for d in range(dirs):
        directory = root / f"d{d}"
        directory.mkdir(parents=True)
        for f in range(files):
            (directory / f"f{f}").write_bytes(b"x" * 5000)


def test_a_hard_linked_file_counts_once_and_symlinks_are_not_followed(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "a").write_bytes(b"x" * 10000)
    os.link(upper / "a", upper / "b")
    (tmp_path / "outside").mkdir()
    tree(tmp_path / "outside", 50)
    os.symlink(tmp_path / "outside", upper / "link")
    used, inodes = measure(upper)
    assert inodes == 3  # upper, a (= b), link
    assert used == sum(os.lstat(p).st_blocks * 512 for p in (upper, upper / "a", upper / "link"))
    assert measure(tmp_path / "missing") == (0, 0)


def test_a_walk_is_made_in_steps_of_at_most_the_budget(tmp_path):
    tree(tmp_path / "upper", files=30, dirs=3)
    walk = LayerWalk(tmp_path / "upper")
    steps = 1
    while not walk.step(10):
        steps += 1
    assert (walk.used, walk.inodes) == measure(tmp_path / "upper")
    assert steps >= 9  # 93 entries below the root, 10 a step


def test_a_pathological_tree_is_bounded_and_gives_a_lower_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(layer_usage, "MAX_PENDING", 2)
    tree(tmp_path / "upper", files=1, dirs=5)
    _, inodes = measure(tmp_path / "upper")
    assert 1 + 5 <= inodes < 1 + 5 + 5  # every directory seen, not every one walked


async def test_a_new_layer_is_measured_at_once_and_then_kept_until_due(tmp_path):
    clock = Clock()
    usage = LayerUsage(max_age=10, clock=clock)
    upper = tmp_path / "upper"
    tree(upper, files=3)
    first = (await usage.figures([upper]))[upper]
    assert (first.used_bytes, first.inodes) == measure(upper)
    (upper / "d0" / "more").write_bytes(b"y" * 100000)
    clock.now += 5
    assert (await usage.figures([upper]))[upper] == first  # not due: no walk
    clock.now += 6
    assert (await usage.figures([upper]))[upper] == first  # due: measured again, in the background
    await usage._worker  # type: ignore[misc]
    second = (await usage.figures([upper]))[upper]
    assert second.inodes == first.inodes + 1 and second.measured_at >= first.measured_at
    await usage.close()


async def test_a_layer_too_big_for_one_step_gets_its_figure_from_the_background_walk(tmp_path):
    usage = LayerUsage(step_entries=5, clock=Clock())
    big, small = tmp_path / "big", tmp_path / "small"
    tree(big, files=40)
    small.mkdir()
    found = await usage.figures([big, small])
    assert list(found) == [small]  # the big one has no figure yet: no call waits for its walk
    await usage._worker  # type: ignore[misc]
    assert (await usage.figures([big]))[big].inodes == 1 + 1 + 40


async def test_a_costly_layer_is_walked_less_often(tmp_path, monkeypatch):
    clock = Clock()
    usage = LayerUsage(max_age=10, cost_share=0.05, clock=clock)
    upper = tmp_path / "upper"
    tree(upper, files=3)
    real_step = LayerWalk.step

    def slow_step(self, budget):  # as if each step took 2 s
        done = real_step(self, budget)
        self.cost += 2.0
        return done

    monkeypatch.setattr(LayerWalk, "step", slow_step)
    first = (await usage.figures([upper]))[upper]
    clock.now += 11  # past max_age, but a 2 s walk waits 2 / 0.05 = 40 s
    await usage.figures([upper])
    assert usage._worker is None
    clock.now += 30
    await usage.figures([upper])
    await usage._worker  # type: ignore[misc]
    assert (await usage.figures([upper]))[upper].measured_at >= first.measured_at
    await usage.close()


async def test_a_forgotten_layer_is_not_measured_any_more(tmp_path):
    usage = LayerUsage(step_entries=5, clock=Clock())
    upper = tmp_path / "upper"
    tree(upper, files=40)
    await usage.figures([upper])
    usage.forget(upper)
    await usage._worker  # type: ignore[misc]
    assert await usage.figures([]) == {}
    await usage.close()
