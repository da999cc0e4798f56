"""The guest's Python: the standard library the agent imports, found by following its imports."""

import sys
import sysconfig
from pathlib import Path

from vm_backend.guest_image import python_bundle


def test_the_guest_gets_the_stdlib_the_agent_imports_and_not_the_rest(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = {str(p.relative_to(stdlib)) for p in python_bundle.agent_imports(stdlib, tmp_path)}
    for needed in ("asyncio/base_events.py", "json/decoder.py", "runpy.py", "encodings/utf_8.py", "_strptime.py"):
        assert needed in found
    for unused in ("tkinter/__init__.py", "sqlite3/__init__.py", "turtle.py", "idlelib/__init__.py"):
        assert unused not in found
    assert sys.version_info[:2] == (3, 11)  # the guest's version: its stdlib is what the finder reads
