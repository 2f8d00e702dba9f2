"""hetero-convert: heterogeneous (Nemotron-NAS / DeciLM) checkpoints between HuggingFace and Megatron-Core.

The flow, module by module: plan (config.json -> per-layer plan) -> layout (TP/PP feasibility) -> spec
(megatron-core config and layer specs) -> mappings (declarative HF<->Megatron tables) -> io (safetensors and
DCP readers/writers) -> convert -> verify.
"""

__version__ = "0.1.0"
