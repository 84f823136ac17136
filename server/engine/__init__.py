"""The inference engine: one thread owns llama.cpp and decodes every active request in one batch per step."""
