"""vox-box for speech models (Whisper through faster-whisper, Bark, CosyVoice …), each version in its own
virtualenv. One build serves CPU and NVIDIA GPUs: PyPI's torch carries CUDA."""

from __future__ import annotations

from pathlib import Path

from workers_app.backends import installs, venv_install
from workers_app.backends.base import Backend, BackendError, Installation, LaunchSpec, NodeInfo, Progress, register

DEFAULT_VERSION = "0.0.21"
# vox-box's own pins do not install as they are (FACTS): torch and torchaudio first, setuptools below 81 (openai-whisper
# builds from source and imports pkg_resources), huggingface-hub below 1.0 and transformers below 4.49 (Bark).
TORCH = ("torch==2.9.1", "torchaudio==2.9.1")
CONSTRAINTS = ("setuptools<81", "huggingface-hub<1.0", "transformers<4.49", *TORCH)


class VoxBox(Backend):
    name = "vox-box"
    label = "vox-box"
    default_version = DEFAULT_VERSION
    formats = frozenset({"hf", "faster-whisper"})
    categories = frozenset({"speech_to_text", "text_to_speech"})
    selectors = "scheduler_app.selectors.vox_box.SELECTORS"
    reserved_flags = frozenset({"--host", "--port", "--model", "--device", "--data-dir"})

    def variant(self, node: NodeInfo) -> str:
        return ""

    def installable(self, node: NodeInfo) -> tuple[bool, str]:
        if node.system != "Linux" or node.machine != "x86_64":
            return False, f"vox-box's dependencies have no build for {node.system} {node.machine}"
        return True, ""

    def index_packages(self) -> list[str]:
        return ["vox-box"]

    def recipe(self, version: str) -> venv_install.Recipe:
        return venv_install.Recipe(steps=(TORCH, (f"vox-box=={version}",)), constraints=CONSTRAINTS,
                                   check="import vox_box.server.model")

    def installed_versions(self, variant: str) -> list[str]:
        return installs.installed_versions(self.name)

    def _installation(self, root: Path, version: str) -> Installation:
        return Installation(self.name, version, "", root, root / "bin" / "vox-box")

    def find(self, version: str, variant: str) -> Installation | None:
        version = version or self.default_version
        root = venv_install.find(self.name, version, "")
        return self._installation(root, version) if root else None

    def install(self, version: str, variant: str, progress: Progress = print) -> Installation:
        version = version or self.default_version
        root = venv_install.install(self.name, version, "", self.recipe(version), progress)
        return self._installation(root, version)

    def command(self, spec: LaunchSpec) -> list[str]:
        if spec.installation is None:
            raise BackendError("vox-box is not installed on this worker")
        if spec.work_dir is None:
            raise BackendError("vox-box needs a data directory")
        device = "cuda:0" if spec.gpu_indexes else "cpu"  # CUDA_VISIBLE_DEVICES shows it only its placed GPU
        # Every one of these, always: vox-box's defaults are 0.0.0.0, port 80 and /var/lib/vox-box.
        return [str(spec.installation.entry), "start", "--host", spec.host, "--port", str(spec.port), "--model",
                str(spec.model_path), "--device", device, "--data-dir", str(spec.work_dir),
                *spec.backend_parameters]

    def environment(self, spec: LaunchSpec) -> dict[str, str]:
        return {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", **super().environment(spec)}  # the model is local

    def exit_is_permanent(self, returncode: int, lines: list[str], was_healthy: bool) -> bool:
        # vox-box exits 0 when it does not support the model: that will not change on a restart.
        return (returncode == 0 and not was_healthy) or super().exit_is_permanent(returncode, lines, was_healthy)


register(VoxBox())
