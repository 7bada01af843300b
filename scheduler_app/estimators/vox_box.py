"""Resource needs of speech models under vox-box: a table by architecture, scaled by weight size.

vox-box loads the whole model into RAM (CPU) or VRAM (GPU) and adds a runtime that depends on the
family: Whisper (CTranslate2/faster-whisper) needs little beyond its weights; Bark and CosyVoice load
several sub-models and torch. The numbers are allowances an operator can read, not measurements of
every model: runtime + weights × factor.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024**2

# family: (runtime bytes, weight multiplier). vox-box 0.0.21 imports torch and every family's code whatever it
# serves: whisper-base (145 MB) measured 1.19 GiB RSS after a transcription, 1.45 GiB after several; a 12 MB Bark
# 0.8 GiB (bench/backends.py).
VOX_BOX_TABLE: dict[str, tuple[int, float]] = {
    "whisper": (1300 * MIB, 1.5),
    "bark": (1536 * MIB, 1.3),
    "cosyvoice": (2048 * MIB, 1.3),
    "default": (1300 * MIB, 1.5),
}


@dataclass
class VoxBoxClaim:
    bytes: int
    family: str


def family_of(architectures: list[str], path_name: str = "") -> str:
    text = (" ".join(architectures) + " " + path_name).lower()
    for family in VOX_BOX_TABLE:
        if family != "default" and family in text:
            return family
    return "default"


def vox_box_claim(weight_bytes: int, architectures: list[str], path_name: str = "") -> VoxBoxClaim:
    family = family_of(architectures, path_name)
    runtime, factor = VOX_BOX_TABLE[family]
    return VoxBoxClaim(int(runtime + weight_bytes * factor), family)
