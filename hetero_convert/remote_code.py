"""The `trust_remote_code` files shipped next to every DeciLM checkpoint we write.

They are this package's own `hf/configuration_decilm.py` and `hf/modeling_decilm.py`, copied verbatim. This
module only copies files, so the converters can ship them without importing transformers (which alone took
~1.8 s of a megatron-to-hf run's start-up).
"""

from __future__ import annotations

import os
import shutil

AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
}

_HF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
_REMOTE_CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")


def remote_code_files() -> list[str]:
    """Absolute paths of the files to ship as `trust_remote_code` code (configuration first)."""
    return [os.path.join(_HF_DIR, name) for name in _REMOTE_CODE_FILES]


def write_remote_code(out_dir) -> dict:
    """Copy the remote-code files into `out_dir` and return the `auto_map` dict for its config.json.

    The caller decides whether to write the map into config.json (e.g. `config.auto_map = write_remote_code(d)`
    before `save_pretrained`, or by editing the JSON afterwards).
    """
    os.makedirs(out_dir, exist_ok=True)
    for path in remote_code_files():
        shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
    return dict(AUTO_MAP)
