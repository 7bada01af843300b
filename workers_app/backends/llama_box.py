"""llama.cpp's llama-server ("llama-box" in the product's words) for GGUF models."""

from __future__ import annotations

from pathlib import Path

from workers_app.backends import llama_box_install
from workers_app.backends.base import Backend, BackendError, LaunchSpec, register
from workers_app.backends.params import as_separate_arguments, flag_names


class LlamaBox(Backend):
    name = "llama-box"
    reserved_flags = frozenset({"--host", "--port", "-m", "--model", "--alias", "-a"})

    def ensure_installed(self, version: str = "") -> None:
        if llama_box_install.find() is None:
            llama_box_install.build()

    def resolve_model_path(self, path: Path) -> Path:
        from scheduler_app.estimate import gguf_files_under

        if not path.exists():
            raise BackendError(f"local_path {path} does not exist on this worker", permanent=True)
        files = gguf_files_under(path)
        if not files:
            raise BackendError(f"no .gguf file found at {path}", permanent=True)
        return files[0]  # llama.cpp finds the other split parts itself

    def command(self, spec: LaunchSpec) -> list[str]:
        binaries = llama_box_install.find()
        if binaries is None:
            raise BackendError("llama-server is not installed on this worker (run `make setup`)")
        user = as_separate_arguments(list(spec.backend_parameters))
        given = flag_names(user)
        cmd = [str(binaries.server), "--host", spec.host, "--port", str(spec.port), "-m", str(spec.model_path),
               "--alias", spec.model_name]
        if not given & {"-ngl", "--n-gpu-layers", "--gpu-layers"}:
            cmd += ["-ngl", str(spec.claim.get("offload_layers", 0) if spec.gpu_indexes else 0)]
        if spec.gpu_indexes and len(spec.gpu_indexes) > 1 and spec.claim.get("tensor_split") \
                and not given & {"-ts", "--tensor-split"}:
            cmd += ["--tensor-split", ",".join(f"{x:g}" for x in spec.claim["tensor_split"])]
        if not given & {"-c", "--ctx-size"} and spec.claim.get("ctx_size"):
            cmd += ["--ctx-size", str(spec.claim["ctx_size"])]
        if not given & {"--cache-ram", "-cram"}:
            cmd += ["--cache-ram", "0"]  # the prompt cache grows to 8 GiB by default: only when asked, and estimated
        if "embedding" in spec.categories and not given & {"--embedding", "--embeddings"}:
            cmd.append("--embeddings")
        if "reranker" in spec.categories and "--rerank" not in given:
            cmd.append("--rerank")
        return cmd + user


register(LlamaBox())
