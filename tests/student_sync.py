"""The weight-sync check shared by tests/test_student_server.py (fake serving env, make test) and
tests/test_vllm_engine.py (real vLLM, make test-vllm): train a student for a few steps on rollouts its vLLM
server samples, syncing as the trainer does, then compare the server's greedy continuations with ours."""

from __future__ import annotations

from pathlib import Path

import torch

from distillspec.rollout.student_server import StudentServer
from distillspec.sd.baseline import autoregressive_generate

PROMPTS = ["Q: 12 + 7 =", "Q: 3 * 4 =", "The capital of France is", "Once upon a time", "def add(a, b):",
           "Natalia sold clips to 48 of", "1, 2, 3, 4,", "The quick brown fox"]


def left_pad(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return ids, mask


def train_and_compare(python: Path, draft_dir: Path, run_dir: Path, *, steps: int = 3, sync: bool = True,
                      lr: float = 3e-3, max_new: int = 12, args: tuple[str, ...] = ()) -> dict:
    """Train `steps` AdamW steps on the student's own served samples (sync before each step as the trainer
    does; with sync=False the pushes after the first are skipped), then push once more and return the served
    and in-process greedy continuations of PROMPTS: {"served", "ours", "before"} (lists of token lists)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(draft_dir)
    student = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    ids, mask = left_pad(tok, PROMPTS)
    eos = [tok.eos_token_id]

    def greedy_ours() -> list[list[int]]:
        student.eval()
        res = autoregressive_generate(student, ids, mask, max_new, temperature=0.0, eos_token_id=eos,
                                      pad_token_id=tok.pad_token_id)
        return [res.tokens[r, : int(res.lengths[r])].tolist() for r in range(len(PROMPTS))]

    server = StudentServer(python=python, run_dir=run_dir, tokenizer=tok, dtype="float32", max_model_len=256,
                           sync_every=1, prompt_lens=[ids.shape[1]] * len(PROMPTS), max_new_tokens=max_new,
                           args=args)
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    try:
        before = greedy_ours()
        for step in range(steps):
            if sync or step == 0:
                server.maybe_sync(step, student)
            comp, lengths = server.generate(ids, mask, max_new, temperature=1.0, top_p=1.0, eos_ids=eos,
                                            pad_id=tok.pad_token_id)
            student.train()
            seq = torch.cat([ids, comp], 1)
            att = torch.cat([mask, (torch.arange(comp.shape[1])[None] < lengths[:, None]).long()], 1)
            logits = student(seq, attention_mask=att).logits[:, ids.shape[1] - 1: -1]
            keep = att[:, ids.shape[1]:].bool()
            loss = -torch.log_softmax(logits.float(), -1).gather(-1, comp[..., None])[..., 0][keep].mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        if sync:
            server.maybe_sync(steps, student)
        out = server.generate(ids, mask, max_new, temperature=0.0, top_p=1.0, eos_ids=eos, pad_id=tok.pad_token_id)
        served = [out[0][r, : int(out[1][r])].tolist() for r in range(len(PROMPTS))]
        return {"served": served, "ours": greedy_ours(), "before": before, "syncs": len(server.sync_seconds)}
    finally:
        server.close()
