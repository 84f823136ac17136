"""The model pipeline: fetch Hugging Face weights, convert them to GGUF, quantize, verify."""
