"""Backends that are Python packages (vLLM, vox-box): each version in a virtualenv of its own under
`AIMIND_CACHE_DIR/backends/<name>/<version>/<variant>/`, installed by pip in the steps a recipe lists."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from workers_app.backends import installs
from workers_app.backends.base import BackendError, Progress


@dataclass(frozen=True)
class Recipe:
    """pip steps, each one `pip install` argument list; `constraints` hold every step; `remove` is uninstalled at
    the end (packages the install pulls in that break beside the chosen torch); `check` is a Python statement
    that must run in the new venv for the install to count."""

    steps: tuple[tuple[str, ...], ...]
    constraints: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    check: str = ""


def find(name: str, version: str, variant: str) -> Path | None:
    root = installs.install_dir(name, version, variant)
    return root if installs.is_installed(root) and (root / "bin" / "python").exists() else None


def install(name: str, version: str, variant: str, recipe: Recipe, progress: Progress = print) -> Path:
    """Install once; a second caller (another thread or process) waits for the first and reuses its work."""
    root = installs.install_dir(name, version, variant)
    with installs.install_lock(root):
        if find(name, version, variant) is not None:
            return root
        try:
            _install(name, version, variant, recipe, root, progress)
        except BackendError as exc:
            if exc.permanent:  # e.g. no such version: leave no directory that names it
                installs.discard(root)
            raise
        return root


def _install(name: str, version: str, variant: str, recipe: Recipe, root: Path, progress: Progress) -> None:
    started = time.monotonic()
    label = f"{name} {version}" + (f" ({variant})" if variant else "")
    steps: list[tuple[list[str], dict, str]] = []  # (command, extra environment, what it is)
    installs.fresh_dir(root)
    python = root / "bin" / "python"
    env = {}
    if recipe.constraints:  # through the environment, so that packages built from source obey them too
        (root.parent / f".{root.name}-constraints.txt").write_text("\n".join(recipe.constraints) + "\n")
        env["PIP_CONSTRAINT"] = str(root.parent / f".{root.name}-constraints.txt")
    steps += [(installs.pip(python, "install", *args), env, f"{name} version {version}") for args in recipe.steps]
    if recipe.remove:
        steps.append((installs.pip(python, "uninstall", "-y", *recipe.remove), {}, f"{name} clean-up"))
    if recipe.check:
        steps.append(([str(python), "-c", recipe.check], {}, f"{name} {version} import check"))
    total = len(steps) + 1

    def say(step: int):
        return lambda line: progress(f"installing {label}, step {step}/{total}: {line}")

    installs.make_venv(root, say(1))
    for number, (cmd, extra, what) in enumerate(steps, start=2):
        try:
            installs.run(cmd, say(number), env=extra, what=what)
        except BackendError as exc:
            if cmd[1] == "-c":  # the import check: installed, but broken
                raise BackendError(f"{name} {version} installed but does not import: {exc}") from None
            raise
    installs.mark_installed(root, version=version, variant=variant, seconds=round(time.monotonic() - started),
                            steps=[list(s) for s in recipe.steps], constraints=list(recipe.constraints))
    progress(f"installed {label} in {time.monotonic() - started:.0f} s")
