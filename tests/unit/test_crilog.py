from sandbox.crilog import PIECE, CriLogWriter, format_lines, pieces, timestamp
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
    writer = CriLogWriter(path, 2**20)
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
    writer = CriLogWriter(path, 2**20)
    writer.open()
    assert path.exists() and path.read_bytes() == b""
    writer.write("stdout", b"one\n", 0)
    path.rename(tmp_path / "logs" / "app.log.1")
    writer.reopen()
    assert path.exists() and path.read_bytes() == b""
    writer.write("stdout", b"two\n", 0)
    assert path.read_bytes().endswith(b"stdout F two\n")
    writer.close()


def test_formatting_bounds_what_a_chunk_of_newlines_costs():
    assert pieces(b"") == [] and pieces(b"short\n") == [b"short\n"]
    cut = pieces(b"a" * 10 + b"\n" + b"b" * 10, size=16)
    assert cut == [b"a" * 10 + b"\n", b"b" * 10]  # at the last newline of each piece
    assert pieces(b"x" * 40, size=16) == [b"x" * 16, b"x" * 16, b"x" * 8]  # no newline: cut anywhere
    data = b"\n" * (4 * PIECE)
    assert all(len(p) <= PIECE for p in pieces(data)) and b"".join(pieces(data)) == data


def test_the_log_starts_over_at_its_cap_as_conmons_does(tmp_path):
    path = tmp_path / "c.log"
    writer = CriLogWriter(path, 1000)
    writer.write("stdout", b"first\n", 0)
    inode = path.stat().st_ino
    for i in range(30):
        writer.write("stdout", f"line {i}\n".encode(), 0)
        assert path.stat().st_size <= 1000
    assert path.stat().st_ino != inode  # a new file took the path (a follower sees the change)
    assert b"first" not in path.read_bytes() and path.read_bytes().endswith(b"stdout F line 29\n")
    assert not (tmp_path / "c.log.tmp").exists()
    writer.close()
    reopened = CriLogWriter(path, 1000)  # after a restart: the size so far counts
    reopened.write("stdout", b"x" * 900 + b"\n", 0)
    assert path.read_bytes().count(b"\n") == 1
    reopened.close()


def test_a_chunk_of_newlines_is_written_in_pieces(tmp_path):
    path = tmp_path / "c.log"
    writer = CriLogWriter(path, 2**30)
    writer.write("stdout", b"\n" * 100_000, 0)
    writer.close()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 100_000 and all(parsed(line) == ("stdout", "F", "") for line in lines[:3])
