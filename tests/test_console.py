"""A console a person can read: children's lines are judged by the level their formatter wrote, every line goes to
the child's log file and only the loud ones to the console; a build's percentages come a few at a time."""

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from aimind.management.commands.up import Command as Up
from aimind.supervisor import LOG_FILE_BYTES, Child, Supervisor, line_level, log_handler
from workers_app.backends import installs

ROOT = Path(__file__).resolve().parent.parent


def drained(child: Child) -> None:
    """Wait for the child to end and for its lines to be handed on (the pump thread ends at its output's end)."""
    child.popen.wait(timeout=30)
    for thread in threading.enumerate():
        if thread.name == f"log-{child.name}":
            thread.join(timeout=30)


def test_levels_are_read_from_each_formatters_lines():
    assert line_level("2026-12-01 22:00:00,123 INFO celery.worker: ready", logging.ERROR) == logging.INFO
    assert line_level("[2026-12-01 22:00:00,123: WARNING/MainProcess] lost", logging.INFO) == logging.WARNING
    assert line_level("INFO:     Started server process [42]", logging.ERROR) == logging.INFO
    assert line_level("Traceback (most recent call last):", logging.INFO) == logging.ERROR
    assert line_level('  File "x.py", line 1, in <module>', logging.ERROR) == logging.ERROR  # the traceback goes on
    assert line_level("plain words", logging.INFO) == logging.INFO


def test_the_console_gets_warnings_and_errors_and_the_file_gets_everything(tmp_path, capsys):
    code = ("import sys; print('2026-12-01 10:00:00,000 INFO web: quiet detail'); "
            "print('2026-12-01 10:00:00,001 WARNING web: something to look at'); "
            "print('Traceback (most recent call last):'); print('  File \"x\", line 1'); "
            "print('ValueError: boom'); print('2026-12-01 10:00:00,002 INFO web: quiet again')")
    supervisor = Supervisor({}, tmp_path)
    child = supervisor.spawn(Child("web", [sys.executable, "-c", code]))
    child.popen.wait()
    deadline = time.monotonic() + 5
    while "quiet again" not in (tmp_path / "logs" / "web.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    shown = capsys.readouterr().out.splitlines()
    assert shown == ["web: 2026-12-01 10:00:00,001 WARNING web: something to look at",
                     "web: Traceback (most recent call last):", 'web:   File "x", line 1', "web: ValueError: boom"]
    written = (tmp_path / "logs" / "web.log").read_text().splitlines()
    assert written[0] == "2026-12-01 10:00:00,000 INFO web: quiet detail" and len(written) == 6


def test_a_builds_percentages_come_every_few_percent(tmp_path, monkeypatch):
    monkeypatch.setenv("AIMIND_CACHE_DIR", str(tmp_path))  # its whole output goes to the install transcript there
    lines = "; ".join(f"print('[{p:3d}%] Building CXX object file{p}.cpp.o')" for p in range(0, 101))
    shown: list[str] = []
    installs.run([sys.executable, "-c", lines], shown.append, what="building llama.cpp 0.3.36")
    percents = [line for line in shown if line.startswith("building llama.cpp 0.3.36: ")]
    assert percents[0].endswith(": 0 %") and percents[-1].endswith(": 100 %") and len(percents) == 21
    assert not any("Building CXX" in line for line in shown if not line.startswith("$ "))  # but the command
    kept = [line for line in installs.transcript_path().read_text().splitlines() if line.startswith("[")]
    assert len(kept) == 101 and kept[-1] == "[100%] Building CXX object file100.cpp.o"  # the transcript has them all


def test_at_info_the_console_gets_info_lines_too(tmp_path, capsys):
    code = "print('2026-12-01 10:00:00,000 INFO web: ready'); print('2026-12-01 10:00:00,001 DEBUG web: detail')"
    child = Supervisor({}, tmp_path, console_level=logging.INFO).spawn(Child("web", [sys.executable, "-c", code]))
    drained(child)
    assert capsys.readouterr().out.splitlines() == ["web: 2026-12-01 10:00:00,000 INFO web: ready"]
    assert len((tmp_path / "logs" / "web.log").read_text().splitlines()) == 2


# `up` reads AIMIND_LOG_LEVEL at start: its own INFO lines and its children's reach the console only when asked for.
UP_CONSOLE = """
import logging, sys, threading, django
django.setup()
from pathlib import Path
from aimind.management.commands.up import Command
from aimind.supervisor import Child, Supervisor
level = Command.configure_logging()
logging.getLogger("aimind.up").info("up: an info line")
logging.getLogger("aimind.up").warning("up: a warning")
child = Supervisor({}, Path(sys.argv[1]), level).spawn(Child("web", [sys.executable, "-c",
    "print('2026-12-01 10:00:00,000 INFO web: ready'); print('2026-12-01 10:00:00,001 WARNING web: slow disk')"]))
child.popen.wait()
[t.join(30) for t in threading.enumerate() if t.name == "log-web"]
"""


def run_up_console(data_dir: Path, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "AIMIND_LOG_LEVEL"}
    environment.update(AIMIND_DATA_DIR=str(data_dir), DJANGO_SETTINGS_MODULE="aimind.settings", **env)
    done = subprocess.run([sys.executable, "-c", UP_CONSOLE, str(data_dir)], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout + done.stderr


def test_aimind_log_level_info_turns_the_console_up(tmp_path):
    quiet = run_up_console(tmp_path / "quiet")
    assert "up: a warning" in quiet and "web: slow disk" in quiet
    assert "up: an info line" not in quiet and "web: ready" not in quiet
    loud = run_up_console(tmp_path / "loud", AIMIND_LOG_LEVEL="INFO")
    for line in ("up: an info line", "up: a warning", "web: 2026-12-01 10:00:00,000 INFO web: ready",
                 "web: slow disk"):
        assert line in loud, line
    assert "up: an info line" in (tmp_path / "quiet" / "logs" / "up.log").read_text()  # the file has it either way


def test_log_files_rotate_and_keep_three_old_ones(tmp_path):
    code = "for i in range(60): print(f'2026-12-01 10:00:00,000 INFO web: line {i:02d} ' + 'x' * 40)"
    child = Supervisor({}, tmp_path, log_file_bytes=400).spawn(Child("web", [sys.executable, "-c", code]))
    drained(child)
    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["web.log", "web.log.1", "web.log.2", "web.log.3"]
    assert all(p.stat().st_size <= 400 for p in logs.iterdir())
    assert (logs / "web.log").read_text().splitlines()[-1].startswith("2026-12-01 10:00:00,000 INFO web: line 59")
    newest_rotated = (logs / "web.log.1").read_text().splitlines()
    current = (logs / "web.log").read_text().splitlines()
    assert int(newest_rotated[-1].split()[5]) + 1 == int(current[0].split()[5])  # no line lost at the seam
    handler = log_handler(tmp_path / "logs" / "up.log")
    assert (handler.maxBytes, handler.backupCount) == (LOG_FILE_BYTES, 3)  # what a real run rotates at
    handler.close()


def test_the_summary_says_where_the_first_admin_password_is(settings, tmp_path, monkeypatch):
    settings.DATA_DIR = tmp_path
    monkeypatch.delenv("AIMIND_BOOTSTRAP_PASSWORD", raising=False)
    (tmp_path / "initial_admin_password").write_text("secret\n")
    text = Up.summary_text()
    assert f"sign in as user admin, first password in {tmp_path / 'initial_admin_password'}" in text
    assert "secret" not in text
    assert f"logs: {tmp_path / 'logs'}/" in text and f"token in {tmp_path / 'token'}" in text


def test_the_summary_names_the_setting_when_the_password_came_from_it(settings, tmp_path, monkeypatch):
    settings.DATA_DIR = tmp_path
    monkeypatch.setenv("AIMIND_BOOTSTRAP_PASSWORD", "chosen")
    text = Up.summary_text()
    assert "sign in as user admin (AIMIND_BOOTSTRAP_PASSWORD)" in text and "chosen" not in text
    monkeypatch.delenv("AIMIND_BOOTSTRAP_PASSWORD")
    assert "sign in as user admin\n" in Up.summary_text()  # made earlier, its file gone: no place to point at
