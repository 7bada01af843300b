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
        started = time.monotonic()
        installs.fresh_dir(root)
        total = len(recipe.steps) + 1 + bool(recipe.remove) + bool(recipe.check)
        step = 1

        label = f"{name} {version}" + (f" ({variant})" if variant else "")

        def say(line: str) -> None:
            progress(f"installing {label}, step {step}/{total}: {line}")

        python = installs.make_venv(root, say)
        env = {}
        if recipe.constraints:  # through the environment, so that packages built from source obey them too
            constraints = root / "constraints.txt"
            constraints.write_text("\n".join(recipe.constraints) + "\n")
            env["PIP_CONSTRAINT"] = str(constraints)
        for args in recipe.steps:
            step += 1
            installs.run(installs.pip(python, "install", *args), say, env=env, what=f"{name} version {version}")
        if recipe.remove:
            step += 1
            installs.run(installs.pip(python, "uninstall", "-y", *recipe.remove), say, what=f"{name} clean-up")
        if recipe.check:
            step += 1
            try:
                installs.run([str(python), "-c", recipe.check], say, what=f"{name} {version} import check")
            except BackendError as exc:
                raise BackendError(f"{name} {version} installed but does not import: {exc}") from None
        installs.mark_installed(root, version=version, variant=variant, seconds=round(time.monotonic() - started),
                                steps=[list(s) for s in recipe.steps], constraints=list(recipe.constraints))
        progress(f"installed {label} in {time.monotonic() - started:.0f} s")
        return root
