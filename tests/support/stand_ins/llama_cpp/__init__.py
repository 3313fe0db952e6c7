"""A stand-in for llama-cpp-python, for the tests of its launcher when the real package is absent.

Only `python -m llama_cpp.server` exists here (see `llama_cpp/server/__main__.py`); the
directory holding this package goes first on the PYTHONPATH of the proxy under test, and only
when the real llama-cpp-python is not installed (tests/support/llama_cpp_python.py)."""
