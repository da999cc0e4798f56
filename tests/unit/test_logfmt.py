import logging

from core.logfmt import LogfmtFormatter


def test_fields_are_key_value_and_quoted_when_needed():
    record = logging.makeLogRecord(
        {"name": "tandem.x", "levelname": "INFO", "msg": "pulled image", "image": "a b", "n": 3, "created": 0}
    )
    line = LogfmtFormatter().format(record)
    assert line.startswith("time=1970-01-01T00:00:00.")
    assert 'msg="pulled image"' in line and 'image="a b"' in line and "n=3" in line
    assert "level=info" in line and "\n" not in line
