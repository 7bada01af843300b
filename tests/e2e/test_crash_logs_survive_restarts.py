"""A backend that crashes and is restarted keeps each attempt's log: after a kill and two failed starts (its model
file went bad), the earlier attempts are still listed and readable through the API, the cause line in them."""

import os
import shutil
import signal

from tests.e2e.system import wait_until


def test_earlier_attempts_logs_stay_readable_after_two_crashes(system, deploy, tiny_models, tmp_path):
    model_file = tmp_path / "forensic.gguf"
    shutil.copyfile(tiny_models["chat"], model_file)
    model = deploy("forensic", local_path=str(model_file))
    [first] = system.wait_for_instances(model["id"], "running")

    model_file.write_text("not a model any more\n")  # the restarts that follow cannot load it
    os.kill(first["pid"], signal.SIGKILL)
    with system.client() as c:
        def two_failed_starts():
            found = c.get(f"/api/v1/instances/{first['id']}/logs/attempts").json()
            ended = [a for a in found if a["attempt"] in (2, 3) and a["ended_at"]]
            return found if len(ended) == 2 else None

        attempts = wait_until(two_failed_starts, 30, "two restarts that fail to load the model")
        shutil.copyfile(tiny_models["chat"], model_file)
        [back] = system.wait_for_instances(model["id"], "running", timeout=30, tolerate_errors=True)
        assert back["id"] == first["id"] and back["restart_count"] >= 3

        listed = c.get(f"/api/v1/instances/{first['id']}/logs/attempts").json()
        assert [a["attempt"] for a in listed][:4] == [4, 3, 2, 1] and listed[0]["current"]
        by_number = {a["attempt"]: a for a in listed}
        assert (by_number[1]["exit_code"], by_number[1]["exit"]) == (-9, "killed by signal SIGKILL")
        assert attempts[0]["attempt"] >= 3 and by_number[2]["exit_code"] == by_number[3]["exit_code"]
        for number in (2, 3):
            log = c.get(f"/api/v1/instances/{first['id']}/logs", params={"attempt": number, "tail": 1000})
            assert log.status_code == 200
            assert "error loading model" in log.text, log.text[-2000:]
        running = c.get(f"/api/v1/instances/{first['id']}/logs", params={"attempt": 4, "tail": 1000}).text
        assert "error loading model" not in running
        first_log = c.get(f"/api/v1/instances/{first['id']}/logs", params={"attempt": 1, "tail": 1000}).text
        assert "listening on" in first_log and "error loading model" not in first_log
