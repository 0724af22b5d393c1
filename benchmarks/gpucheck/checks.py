"""Sections 3 and 4: greedy SD equals greedy target decoding (fp32), and the chunked loss's peak memory.

Section 3. Target = the small shape (Qwen3-0.6B) with random weights in float32 (TF32 off), initializer range
0.2 (so every layer shapes the next token: varied, context-dependent outputs) and an untied head; draft = a
copy whose head gets Gaussian noise of `head_noise` x its std. Both run every layer with their own KV
caches, and the noisy head flips some greedy choices, so blocks are partly accepted (acceptance ~0.5 on
CPU at this width) and the ragged-rollback path is exercised. Ragged left-padded prompts, greedy. Rows of our SD engine are
compared with our target-only decoding and with HF `generate` of the same batch. float32 because bf16
kernels may round differently for different batch shapes (a near-tie could then flip a greedy choice
without any engine error); a rare fp32 mismatch on random weights is still possible for the same reason.

Section 4. Student logits (requires grad) and teacher logits of shape (B, T, V) = (16, 312, 151,936) in
bf16 through `divergence_loss` forward + backward, chunked (div.chunk_size) and, when the card has room,
unchunked: peak GPU memory above the inputs (torch.cuda.max_memory_allocated). Smoke: tiny sizes on CPU
(the code path only; no allocator statistics on CPU).
"""

from __future__ import annotations

import torch

from gpucheck.common import Ctx, TimeGuard, batches, build, ragged_prompts, release, timed

GIB = 1024 ** 3


def greedy_equality(ctx: Ctx, guard: TimeGuard, *, shape: str = "qwen3-0.6b", head_noise: float = 0.1,
                    batch: int = 8, prompt_len: int = 64, new_tokens: int = 64, gamma: int = 5) -> dict:
    """Rows equal between SD, our target-only and HF generate (greedy, float32)."""
    import copy

    from distillspec.sd.baseline import autoregressive_generate
    from distillspec.sd.engine import SpeculativeDecoder

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        target = build(ctx, shape, dtype=torch.float32, seed=3, initializer_range=0.2, tie_word_embeddings=False)
        draft = copy.deepcopy(target)
        with torch.no_grad():
            head = draft.get_output_embeddings().weight
            g = torch.Generator(device=ctx.device).manual_seed(7)
            head.add_(head_noise * head.std() * torch.randn(head.shape, generator=g, device=ctx.device))
        target.generation_config.eos_token_id = None
        prompts = ragged_prompts(batch, prompt_len, target.config.vocab_size, ctx.seed + 1)
        ids, mask = next(batches(ctx, prompts, batch))
        dec = SpeculativeDecoder(draft, target, gamma=gamma, temperature=0.0, eos_token_id=None, pad_token_id=0)
        sd, sd_s = timed(ctx, dec.generate, ids, mask, new_tokens)
        ar, ar_s = timed(ctx, autoregressive_generate, target, ids, mask, new_tokens, temperature=0.0,
                         eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            hf = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                 eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
        rows_sd, rows_ar = sd.tokens.tolist(), ar.tokens.tolist()
        first_diff = [next((t for t, (a, b) in enumerate(zip(x, y)) if a != b), None)
                      for x, y in zip(rows_sd, rows_ar)]
        out = {"shape": shape, "head_noise": head_noise, "B": batch, "new_tokens": new_tokens, "gamma": gamma,
               "sd_equals_target": sum(x == y for x, y in zip(rows_sd, rows_ar)),
               "target_equals_hf": sum(x == y for x, y in zip(rows_ar, hf.tolist())), "rows": batch,
               "first_mismatch_per_row": first_diff,
               "alpha": float(sd.num_accepted.sum()) / float(sd.num_drafted.sum()),
               "sd_seconds": sd_s, "target_seconds": ar_s}
        # the static KV path (and, on CUDA with time left, its CUDA graphs) must give the same rows
        paths = [("static", False)] + ([("graph", True)] if ctx.device.type == "cuda" else [])
        for name, comp in paths:
            if guard.left() <= 0:
                out.setdefault("skipped", []).append(name)
                continue
            dec = SpeculativeDecoder(draft, target, gamma=gamma, temperature=0.0, eos_token_id=None, pad_token_id=0,
                                     kv="static", compile=comp)
            rows = dec.generate(ids, mask, new_tokens).tokens.tolist()
            ar_rows = autoregressive_generate(target, ids, mask, new_tokens, temperature=0.0, eos_token_id=None,
                                              pad_token_id=0, kv="static", compile=comp).tokens.tolist()
            out[f"sd_{name}_equals_target"] = sum(x == y for x, y in zip(rows, rows_ar))
            out[f"target_{name}_equals_target"] = sum(x == y for x, y in zip(ar_rows, rows_ar))
        del target, draft
        return out
    finally:
        from distillspec.sd.static_cache import release_static_caches

        torch.backends.cuda.matmul.allow_tf32 = tf32
        release_static_caches()
        release()


def loss_memory(ctx: Ctx, guard: TimeGuard, *, batch: int = 16, tokens: int = 312, vocab: int = 151_936,
                chunk_sizes=(1024, None), divergence: str = "fkl") -> list[dict]:
    """Peak GPU memory of the loss's forward + backward above the (B, T, V) inputs, per chunk size."""
    from distillspec.losses.divergences import divergence_loss

    out = []
    for chunk in chunk_sizes:
        row = {"divergence": divergence, "B": batch, "T": tokens, "V": vocab, "chunk_size": chunk}
        need = 8 * batch * tokens * vocab * 4 if chunk is None else 0  # float32 temporaries, unchunked
        free = torch.cuda.mem_get_info(ctx.device)[0] if ctx.device.type == "cuda" else None
        if guard.left() <= 0 or (free is not None and need > 0.8 * free):
            row["skipped"] = "time guard" if guard.left() <= 0 else f"needs ~{need / GIB:.0f} GiB"
            out.append(row)
            continue
        g = torch.Generator(device=ctx.device).manual_seed(0)
        student = torch.randn(batch, tokens, vocab, generator=g, device=ctx.device, dtype=torch.bfloat16)
        teacher = torch.randn(batch, tokens, vocab, generator=g, device=ctx.device, dtype=torch.bfloat16)
        student.requires_grad_(True)
        mask = torch.ones(batch, tokens, dtype=torch.bool, device=ctx.device)
        ctx.sync()
        base = ctx.allocated_gib()
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)

        def step():
            loss, _ = divergence_loss(student, teacher, mask, divergence, chunk_size=chunk)
            loss.backward()
            return loss

        loss, secs = timed(ctx, step)
        peak = ctx.peak_gib()
        row.update({"finite": bool(torch.isfinite(loss)), "seconds": secs,
                    "inputs_gib": 2 * student.numel() * 2 / GIB, "grad_gib": student.numel() * 2 / GIB,
                    "peak_above_inputs_gib": None if peak is None else peak - base})
        out.append(row)
        del student, teacher, mask, loss
        release()
    return out
