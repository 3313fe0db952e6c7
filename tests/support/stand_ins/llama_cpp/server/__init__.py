"""The stand-in's `llama_cpp.server`: run it as `python -m llama_cpp.server` (`__main__.py`)."""
