"""Hugging Face <-> Megatron conversion runs: the model context and the output publication the tools share.

The weight mapping itself (pure functions on configs and tensors) lives in ``models.hf_mapping``.
"""
