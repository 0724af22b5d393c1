"""Learning-rate probe on a run's teacher data: a few AdamW steps per lr, and what each step does to the loss.

    python benchmarks/probe_lr.py experiment=qwen_coder_gsm8k method=fkl --lrs 3e-5 1e-5 3e-6 --steps 2
    python benchmarks/probe_lr.py pair=tiny task=arithmetic --lrs 1e-3 1e-4

Positional arguments are run.py overrides: the probe composes the run's configuration, reads (or makes) its
teacher data exactly as that run would (rollout=teacher or fixed, the sparse top-k teacher), and loads its draft
in the run's precision (trainer.precision bf16-mixed: bf16 autocast). For each --lrs value it starts from the
untrained draft and takes --steps AdamW steps at that constant lr (no warm-up, the run's batch size, weight decay
and gradient clipping) on consecutive batches of the training prompts. After each step it prints the loss of the
batch it just stepped on, before and after the step, and the loss and the teacher-student overlap (1 - TV of the
top-k buckets at the loss temperature) on the last --val-batches batches of the training prompts, which no step
trains on.

What it shows: the first AdamW steps move every weight by about lr in the direction of its gradient's sign,
whatever the gradient's size, so an lr that suits a draft trained from scratch can wreck a competent one in one
step. A step that raises the loss of the very batch it stepped on is too large. It costs a few forward and
backward passes per lr, against minutes per point of the held-out acceptance curve (train.curve=heldout), which
picks among the lrs that pass.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def batch_loss(model, cache, indices, objective, autocast: bool, grad: bool) -> tuple[float, float]:
    """(loss, overlap) of the sparse divergence on the cached rollouts of `indices`; backward when `grad`."""
    import torch

    from distillspec.losses.sparse import bucket_stats, sparse_divergence_loss
    from distillspec.models.forward import completion_outputs

    roll = cache.rollout(indices, next(model.parameters()).device)
    mask = roll.completion_mask()
    amp = torch.autocast(mask.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with amp, torch.set_grad_enabled(grad):
        x, head = completion_outputs(model, roll, int(mask.sum()), objective.chunk_size)
        aux: dict = {}
        loss, _ = sparse_divergence_loss(x, roll.topk_idx, roll.topk_logp, mask, objective.divergence,
                                         temperature=objective.temperature, beta=objective.beta,
                                         alpha=objective.alpha, chunk_size=objective.chunk_size,
                                         tail_logp=roll.tail_logp, to_logits=head, aux=aux)
    if grad:
        loss.backward()
    _, overlap = bucket_stats(aux["student_buckets"], aux["teacher_buckets"])
    return float(loss.detach()), float(overlap) / max(int(mask.sum()), 1)


def probe(model, cache, n_items: int, lrs, steps: int, val_batches: int, train, objective, autocast: bool):
    """Rows (lr, step, batch loss before, after, val loss, val overlap); step 0 is the untrained draft."""
    import torch

    bs = train.batch_size
    if n_items < (steps + val_batches) * bs:
        raise SystemExit(f"{n_items} training prompts are fewer than (--steps {steps} + --val-batches "
                         f"{val_batches}) x train.batch_size {bs}; raise train.num_train or lower them")
    val = [list(range(n_items - (v + 1) * bs, n_items - v * bs)) for v in range(val_batches)]

    def validate() -> tuple[float, float]:
        pairs = [batch_loss(model, cache, idx, objective, autocast, grad=False) for idx in val]
        return tuple(sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))

    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = [("untrained", 0, float("nan"), float("nan"), *validate())]
    print(format_row(rows[0]), flush=True)
    for lr in lrs:
        model.load_state_dict(start)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)
        for step in range(steps):
            idx = list(range(step * bs, (step + 1) * bs))
            before, _ = batch_loss(model, cache, idx, objective, autocast, grad=True)
            if train.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            after, _ = batch_loss(model, cache, idx, objective, autocast, grad=False)
            rows.append((f"{lr:g}", step + 1, before, after, *validate()))
            print(format_row(rows[-1]), flush=True)
    model.load_state_dict(start)
    return rows


HEADER = ("| lr | step | stepped batch: loss before | after | held-back batches: loss | overlap |\n"
          "|---|---|---|---|---|---|")


def format_row(r) -> str:
    lr, step, before, after, val_loss, val_overlap = r
    cell = (lambda x: "–" if x != x else f"{x:.4f}")
    return f"| {lr} | {step} | {cell(before)} | {cell(after)} | {val_loss:.4f} | {val_overlap:.4f} |"


def main(argv: list[str] | None = None) -> list[tuple]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="run.py overrides (experiment=..., method=..., pair=...)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-5, 3e-6])
    ap.add_argument("--steps", type=int, default=2, help="AdamW steps per lr")
    ap.add_argument("--val-batches", type=int, default=2, help="held-back batches of training prompts")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.val_batches < 1 or any(lr < 0 for lr in args.lrs):
        raise SystemExit(f"--steps and --val-batches must be >= 1 and --lrs >= 0; got {args.steps}, "
                         f"{args.val_batches}, {args.lrs}")

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from distillspec import teacherless
    from distillspec.resolvers import register
    from distillspec.run_phases import load_data, load_models
    from distillspec.runner import resolve_device, validate

    register()  # the config's resolvers, as run.py registers them
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*args.overrides, "stage=train"], return_hydra_config=True)
    with tempfile.TemporaryDirectory() as tmp:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = tmp
        HydraConfig.instance().set_config(cfg)  # as in a run: the config's ${choice:...} values read it
        s = validate(cfg, Path(tmp), REPO)
    if s.rollout.source not in ("teacher", "fixed"):
        raise SystemExit(f"the probe trains on stored teacher data: rollout.source must be teacher or fixed, "
                         f"got {s.rollout.source!r}")
    device = resolve_device(cfg.trainer.accelerator)
    data = load_data(s)
    s.train = dataclasses.replace(s.train, release_target=True)  # the draft only (the target: for missing data)
    models = load_models(s, data, device)
    loader = teacherless.TargetLoader(s.pair, device)
    caches = teacherless.teacher_data(s.rollout, models, data.train_items, device=device, seed=s.seed,
                                      temperature=s.objective.temperature, max_new_tokens=s.train_tokens,
                                      engine=None, load_teacher=loader)
    loader.release()
    cache = caches[s.rollout.source]
    autocast = str(cfg.trainer.precision).startswith("bf16")
    print(f"draft {s.pair.draft}, {s.objective.divergence} at T {s.objective.temperature}, batch "
          f"{s.train.batch_size}, {'bf16 autocast' if autocast else 'float32'}\n{HEADER}", flush=True)
    model = models.draft
    model.train()
    return probe(model, cache, len(data.train_items), args.lrs, args.steps, args.val_batches, s.train,
                 s.objective, autocast)


if __name__ == "__main__":
    main()
