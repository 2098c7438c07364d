"""fastvlm: fused kernels for the vision-to-LLM path of vision-language models."""
__version__ = "0.1.0"
