"""The demo registry's models: two small real GGUF models that ship on PyPI."""
