"""vLLM beside distillspec: serving a trained draft, checking vLLM's acceptance counters against our engine, and
vLLM servers as the engine that makes training data (rollout.engine=vllm).

`vllm_runner` runs inside the serving environment (`.venv-vllm`: vLLM and the standard library only);
`check` (`make vllm-check`) runs in the project environment, drives it (`jobs`), runs our engine (`ours`) and
compares (`compare`, `stats`, `render`); `commands` holds the printed commands and the rule for which pairs
vLLM can serve; `env` checks the serving env; `server` starts and stops vLLM servers, `client` talks to them.
"""
