from sandbox.crilog import CriLogWriter, format_lines, timestamp
from tests.support.pods import CRI_LOG_LINE


def parsed(line: bytes) -> tuple[str, str, str]:
    match = CRI_LOG_LINE.match(line.decode())
    assert match is not None, line
    return match.groups()[1:]


def test_timestamp_is_rfc3339_nano_utc():
    assert timestamp(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert timestamp(0) == "1970-01-01T00:00:00.000000000Z"


def test_complete_and_partial_lines():
    out = format_lines("stdout", b"hello\nwor", 0).splitlines()
    assert [parsed(line) for line in out] == [("stdout", "F", "hello"), ("stdout", "P", "wor")]
    assert format_lines("stderr", b"", 0) == b""
    (empty,) = format_lines("stderr", b"\n", 0).splitlines()
    assert parsed(empty) == ("stderr", "F", "")


def test_writer_appends_and_reopens(tmp_path):
    path = tmp_path / "logs" / "c.log"
    writer = CriLogWriter(path)
    writer.write("stdout", b"one\n", 1)
    path.rename(tmp_path / "rotated.log")
    writer.write("stdout", b"two\n", 2)  # still the old file until reopened
    writer.reopen()
    writer.write("stderr", b"three\n", 3)
    writer.close()
    assert (tmp_path / "rotated.log").read_bytes().count(b"\n") == 2
    assert path.read_bytes().endswith(b"stderr F three\n")


def test_the_log_exists_from_open_and_reopen_makes_a_new_file(tmp_path):
    path = tmp_path / "logs" / "app.log"
    writer = CriLogWriter(path)
    writer.open()
    assert path.exists() and path.read_bytes() == b""
    writer.write("stdout", b"one\n", 0)
    path.rename(tmp_path / "logs" / "app.log.1")
    writer.reopen()
    assert path.exists() and path.read_bytes() == b""
    writer.write("stdout", b"two\n", 0)
    assert path.read_bytes().endswith(b"stdout F two\n")
    writer.close()
