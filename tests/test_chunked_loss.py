"""The sparse loss from hidden states and the output head, chunk by chunk (distillspec.losses.sparse with
`to_logits`, distillspec.models.forward.completion_hidden): the same loss and gradients as from the full logits,
with the logits never formed for more than one chunk of positions."""

from __future__ import annotations

import pytest
import torch

from distillspec.losses.sparse import bucket_stats, sparse_divergence_loss, student_buckets, teacher_buckets
from distillspec.models.forward import completion_hidden, completion_logits, completion_outputs, output_head

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingHead(torch.nn.Linear):
    """An output head that records how many rows each call maps."""

    def __init__(self, h, v, dtype):
        super().__init__(h, v, bias=False, dtype=dtype)
        self.rows: list[int] = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return super().forward(x)


def case(dtype, b=3, t=7, h=8, v=29, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=dtype).requires_grad_(True)
    head = CountingHead(h, v, dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g, dtype=dtype))
    teacher = torch.log_softmax(torch.randn(b, t, v, generator=g, dtype=dtype) * 2, -1)
    vals, idx = teacher.topk(k, -1)
    tail = teacher.scatter(-1, idx, float("-inf")).logsumexp(-1)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    return hidden, head, idx, vals, tail, mask


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("dtype, chunk", [(torch.float64, 4), (torch.float64, 1), (torch.float32, 6),
                                          (torch.float32, 1024)])
def test_chunked_from_hidden_equals_the_full_logits_loss(name, dtype, chunk):
    hidden, head, idx, vals, tail, mask = case(dtype)
    kw = dict(temperature=0.7, normalizer=5.0, tail_logp=tail)
    ref, ref_tok = sparse_divergence_loss(head(hidden), idx, vals, mask, name, chunk_size=None, **kw)
    g_ref = torch.autograd.grad(ref, [hidden, head.weight])
    head.rows.clear()
    aux: dict = {}
    got, got_tok = sparse_divergence_loss(hidden, idx, vals, mask, name, chunk_size=chunk, to_logits=head, aux=aux,
                                          **kw)
    g_got = torch.autograd.grad(got, [hidden, head.weight])
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_tok, ref_tok)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)
    n = int(mask.sum())
    assert max(head.rows) == min(chunk, n) and sum(head.rows) == 2 * n  # forward, then recomputed in backward
    sb = student_buckets(head(hidden).detach()[mask], idx[mask], 0.7)
    tb = teacher_buckets(vals[mask], tail[mask])
    for a, b in zip(bucket_stats(aux["student_buckets"], aux["teacher_buckets"]), bucket_stats(sb, tb)):
        torch.testing.assert_close(a, b)


def test_the_old_logits_path_is_unchanged_by_chunking():
    """Given logits, chunked (checkpointed) and unchunked values and gradients agree."""
    hidden, head, idx, vals, tail, mask = case(torch.float64)
    logits = head(hidden).detach().requires_grad_(True)
    a, _ = sparse_divergence_loss(logits, idx, vals, mask, "rkl", chunk_size=None, tail_logp=tail)
    b, _ = sparse_divergence_loss(logits, idx, vals, mask, "rkl", chunk_size=3, tail_logp=tail)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, logits)[0], torch.autograd.grad(b, logits)[0])


def test_completion_hidden_gives_the_models_logits_and_gradients():
    from distillspec.models.tiny import tiny_llama
    from distillspec.rollout.sequences import assemble

    model = tiny_llama(num_layers=2).train()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 100, (2, 5), generator=g)
    pmask = torch.ones(2, 5, dtype=torch.long)
    pmask[1, :2] = 0  # left padding
    comp = torch.randint(3, 100, (2, 4), generator=g)
    roll = assemble(prompts, pmask, comp, torch.tensor([4, 2]), 0, "teacher")
    mask = roll.completion_mask()
    teacher = torch.log_softmax(torch.randn(2, 4, 104, generator=g), -1)
    vals, idx = teacher.topk(8, -1)

    logits = completion_logits(model, roll)
    assert completion_outputs(model, roll, rows=6, chunk_size=6)[1] is None  # one chunk: the logits
    hidden, head = completion_outputs(model, roll, rows=6, chunk_size=2)
    assert head is model.get_output_embeddings()
    torch.testing.assert_close(head(hidden), logits, rtol=1e-5, atol=1e-5)
    ref, _ = sparse_divergence_loss(logits, idx, vals, mask, "fkl", chunk_size=None)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    got, _ = sparse_divergence_loss(hidden, idx, vals, mask, "fkl", chunk_size=2, to_logits=head)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_models_that_change_logits_after_the_head_are_refused():
    from distillspec.models.tiny import tiny_llama

    model = tiny_llama(num_layers=1)
    assert output_head(model) is model.get_output_embeddings()
    model.config.final_logit_softcapping = 30.0
    assert output_head(model) is None
    with pytest.raises(ValueError, match="use completion_logits"):
        completion_hidden(model, None)
