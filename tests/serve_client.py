"""Talk to a running `vllm serve`: a few chat requests with the `openai` client, then its spec-decode counters.

    .venv-vllm/bin/python tests/serve_client.py BASE_URL MODEL N_REQUESTS MAX_TOKENS

Runs in the serving environment (the `openai` client comes with vLLM); tests/test_vllm.py uses it. Prints one JSON object: the replies'
texts and usage, and every `vllm:spec_decode*` sample of the server's Prometheus `/metrics` (summed over
label sets). Loopback only: BASE_URL is http://127.0.0.1:<port>.
"""

from __future__ import annotations

import json
import sys
import urllib.request

PROMPTS = ("What is 17 + 25? Answer with the number.", "Name three primary colours.",
           "Write one sentence about the sea.", "What is the capital of France?")


def spec_counters(base_url: str) -> dict[str, float]:
    """{metric name: value} for the server's vllm:spec_decode* samples (label sets summed)."""
    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode"):
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


def main(argv: list[str]) -> int:
    from openai import OpenAI

    base_url, model, n, max_tokens = argv[0], argv[1], int(argv[2]), int(argv[3])
    if not base_url.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise SystemExit(f"refusing a non-loopback server: {base_url}")
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=300)
    replies = []
    for i in range(n):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                           max_tokens=max_tokens, temperature=0.0)
        replies.append({"text": r.choices[0].message.content, "completion_tokens": r.usage.completion_tokens})
    print(json.dumps({"replies": replies, "counters": spec_counters(base_url)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
