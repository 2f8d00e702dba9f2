"""transformers implementation of DeciLM / Nemotron-NAS, registered with the Auto classes.

Importing this package registers:
  - model_type "nemotron-nas" (the released checkpoints) -> DeciLMConfig / DeciLMForCausalLM;
  - model_type "deci" (e.g. TensorRT-LLM's DeciLM-format test configs) -> a subclass that only differs in
    `model_type`, so such configs load without remote code and are saved back as "deci".

The two implementation files are also the remote code shipped with converted checkpoints:
`write_remote_code(out_dir)` copies them next to a checkpoint and returns the `auto_map` for its config.json.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_decilm import (
    AttentionConfig,
    BlockConfig,
    DeciLMConfig,
    FFNConfig,
    ffn_mult_to_intermediate_size,
    parse_block_config,
)
from .modeling_decilm import DeciLMForCausalLM, DeciLMModel, DeciLMPreTrainedModel
# Re-exported: the copying lives outside this package so converters need not import transformers.
from ..remote_code import AUTO_MAP, remote_code_files, write_remote_code


class DeciConfig(DeciLMConfig):
    """Same model, for config.json files that say `"model_type": "deci"`."""

    model_type = "deci"

    # Version note: transformers 5.x turns every config subclass into a dataclass and, when the subclass does
    # not define `__init__` itself, generates one that bypasses DeciLMConfig.__init__ (block_configs would stay
    # raw dicts). Defining it here keeps the parent's parsing.
    def __init__(self, **kwargs):
        super().__init__(**kwargs)


class DeciModel(DeciLMModel):
    config_class = DeciConfig


class DeciForCausalLM(DeciLMForCausalLM):
    config_class = DeciConfig


def _register() -> None:
    families = ((DeciLMConfig, DeciLMModel, DeciLMForCausalLM), (DeciConfig, DeciModel, DeciForCausalLM))
    for config_cls, base_cls, lm_cls in families:
        # exist_ok: re-importing (e.g. importlib.reload in tests) must not fail.
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)


_register()


__all__ = [
    "AUTO_MAP",
    "AttentionConfig",
    "BlockConfig",
    "DeciConfig",
    "DeciForCausalLM",
    "DeciLMConfig",
    "DeciLMForCausalLM",
    "DeciLMModel",
    "DeciLMPreTrainedModel",
    "DeciModel",
    "FFNConfig",
    "ffn_mult_to_intermediate_size",
    "parse_block_config",
    "remote_code_files",
    "write_remote_code",
]
