"""Serving a trained draft in vLLM and checking vLLM's acceptance counters against our engine.

`vllm_runner` runs inside the serving environment (`.venv-vllm`: vLLM and the standard library only);
`check` (`make vllm-check`) runs in the project environment, drives it (`jobs`), runs our engine (`ours`) and
compares (`compare`, `stats`, `render`); `commands` holds the printed commands and the rule for which pairs
vLLM can serve.
"""
