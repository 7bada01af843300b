"""A console a person can read: children's lines are judged by the level their formatter wrote, every line goes to
the child's log file and only the loud ones to the console; a build's percentages come a few at a time."""

import logging
import sys
import time

from aimind.supervisor import Child, Supervisor, line_level
from workers_app.backends import installs


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


def test_a_builds_percentages_come_every_few_percent():
    lines = "; ".join(f"print('[{p:3d}%] Building CXX object file{p}.cpp.o')" for p in range(0, 101))
    shown: list[str] = []
    installs.run([sys.executable, "-c", lines], shown.append, what="building llama.cpp 0.3.36")
    percents = [line for line in shown if line.startswith("building llama.cpp 0.3.36: ")]
    assert percents[0].endswith(": 0 %") and percents[-1].endswith(": 100 %") and len(percents) == 21
    assert not any("Building CXX" in line for line in shown if not line.startswith("$ "))  # but the command
