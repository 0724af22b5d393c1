"""Quick recipe probe on the offline pair: alignment (mean 1 - TV(p, q) = expected SD acceptance) of the
draft on target-sampled continuations of 8 eval prompts, before and every 10 steps of plain distillation.

    python benchmarks/alignment_probe.py <div> <source> <lr> <steps> [draft_layers]
    python benchmarks/alignment_probe.py rkl mixed 3e-4 20

Batch 4, 48 new tokens, constant lr, AdamW, clip 1.0, CPU fp32. Uses the library's rollout sampler,
completion logits and divergences (no Lightning), so a recipe can be screened in a minute or two.
"""
import sys, time, torch
from distillspec.models.loading import PairSpec
from distillspec.tasks.arithmetic import ArithmeticTask
from distillspec.lit.data import left_pad
from distillspec.evaluation import eos_token_ids
from distillspec.sd.baseline import autoregressive_generate
from distillspec.rollout.sequences import assemble
from distillspec.rollout.sources import RolloutSampler
from distillspec.models.forward import completion_logits
from distillspec.losses.divergences import divergence_loss, overlap
from distillspec.specs import RolloutSpec
torch.set_num_threads(2)
div, source, lr, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
layers = int(sys.argv[5]) if len(sys.argv) > 5 else 4
pair = PairSpec(draft=f"offline:smollm2-135m-L{layers}", target="offline:smollm2-135m", dtype="float32").load("cpu")
tok = pair.tokenizer
task = ArithmeticTask(num_train=200, num_eval=16, seed=1234, max_new_tokens=48)
tr = task.encode(task.load("train"), tok); ev = task.encode(task.load("eval"), tok)[:8]
eos = eos_token_ids(tok, pair.target); pad = tok.pad_token_id
ids, mask = left_pad([it.input_ids for it in ev], pad)
g = torch.Generator().manual_seed(0)
ref = autoregressive_generate(pair.target, ids, mask, 48, temperature=1.0, generator=g, eos_token_id=eos, pad_token_id=pad)
eval_roll = assemble(ids, mask, ref.tokens, ref.lengths, pad, "teacher")
with torch.no_grad():
    t_eval = completion_logits(pair.target, eval_roll)
def alpha():
    pair.draft.eval()
    with torch.no_grad():
        s = completion_logits(pair.draft, eval_roll)
    m = eval_roll.completion_mask()
    return float(overlap(t_eval[m], s[m]).mean())
a0 = alpha()
opt = torch.optim.AdamW([p for p in pair.draft.parameters() if p.requires_grad], lr=lr)
sampler = RolloutSampler(RolloutSpec(source=source, mix={"student":0.5,"teacher":0.5} if source=="mixed" else None), pair.draft, pair.target, eos, pad, 48)
t0 = time.time()
hist = []
for step in range(steps):
    idx = torch.randperm(len(tr), generator=torch.Generator().manual_seed(step))[:4].tolist()
    b = [tr[i] for i in idx]
    pi, pm = left_pad([it.input_ids for it in b], pad)
    r = sampler.sample(pi, pm, [it.target_ids for it in b], torch.Generator().manual_seed(100 + step))
    pair.draft.train()
    with torch.no_grad():
        tl = completion_logits(pair.target, r)
    sl = completion_logits(pair.draft, r)
    loss, _ = divergence_loss(sl, tl, r.completion_mask(), div, chunk_size=1024)
    loss.backward(); torch.nn.utils.clip_grad_norm_(pair.draft.parameters(), 1.0); opt.step(); opt.zero_grad()
    if (step + 1) % 10 == 0:
        hist.append(round(alpha(), 4))
print(f"RESULT div={div} src={source} lr={lr} steps={steps} L={layers} alpha0={a0:.4f} hist={hist} time={time.time()-t0:.0f}s", flush=True)
