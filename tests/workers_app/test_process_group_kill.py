"""Backends run in their own process group and are ended with it, children included."""

import sys
import time

import psutil

from workers_app import processes


def test_terminate_group_ends_the_process_and_its_children(tmp_path):
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);" \
             " time.sleep(60)"
    popen = processes.start([sys.executable, "-c", script], env={}, log_path=tmp_path / "x.log")
    time.sleep(0.5)
    tree = [popen.pid] + [c.pid for c in psutil.Process(popen.pid).children(recursive=True)]
    assert len(tree) == 2
    processes.terminate_group(popen.pid, popen, grace=2)
    time.sleep(0.1)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in tree)


def test_process_ignoring_sigterm_is_killed(tmp_path):
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    popen = processes.start([sys.executable, "-c", script], env={}, log_path=tmp_path / "x.log")
    time.sleep(0.3)
    processes.terminate_group(popen.pid, popen, grace=0.5)
    assert popen.poll() is not None


def test_exit_is_described_with_code_or_signal():
    assert processes.describe_exit(1) == "exited with code 1"
    assert processes.describe_exit(-9) == "killed by signal SIGKILL"


def test_tail_shows_only_the_latest_run(tmp_path):
    log = tmp_path / "i.log"
    log.write_text("=== 2026 starting: a\nold error\n=== 2026 starting: b\nnew line\n")
    assert processes.tail_lines(log) == ["new line"]
    assert processes.tail_lines(log, current_run_only=False)[-1] == "new line"
