"""llama-inference: a CPU inference server for LLaMA-family GGUF models, on llama.cpp."""

__version__ = "0.1.0"
