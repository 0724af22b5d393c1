"""Serving a trained draft in vLLM and checking vLLM's acceptance counters against our engine.

`vllm_runner` runs inside the serving environment (`.venv-vllm`: vLLM and the standard library only);
`distillspec.vllm_check` runs in the project environment, drives it, and compares.
"""
