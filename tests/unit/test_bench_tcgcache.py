"""bench/tcgcache.py: QEMU's `info jit` read, and the code translated between two readings counted across flushes."""

import pytest

from bench.tcgcache import CacheReading, translated_between

# What QEMU 7.2 printed here for a warm VM (tb-size=24), cut to the lines that matter and one that does not.
INFO_JIT = """Translation buffer state:
gen code size       21581859/25160704
TB count            39282
TB hash occupancy   53.45% avg chain occ. Histogram: [0,10)%|▃ ▆  █▂▇▁▄|[90,100]%

Statistics:
TB flush count      6
TB invalidate count 4749
"""


def test_info_jit_is_read() -> None:
    assert CacheReading.parse(INFO_JIT) == CacheReading(used=21581859, capacity=25160704, flushes=6)


def test_a_vm_without_a_translation_cache_reads_as_none() -> None:
    assert CacheReading.parse("") is None


def test_without_a_flush_the_translated_code_is_what_the_cache_grew_by() -> None:
    assert translated_between(CacheReading(100, 1000, 2), CacheReading(350, 1000, 2)) == 250


def test_each_flush_counts_a_full_cache() -> None:
    before, after = CacheReading(900, 1000, 6), CacheReading(300, 1000, 9)
    assert translated_between(before, after) == 100 + 2 * 1000 + 300


def test_readings_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError):
        translated_between(CacheReading(300, 1000, 9), CacheReading(900, 1000, 6))
