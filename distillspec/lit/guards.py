"""Numerical guards of a training step (plain torch): a non-finite loss or gradient, an update that made the
draft non-finite or blew its weights up, each stopped (NonFiniteError, on every rank) before it reaches a checkpoint
or the saved draft. `strategy`: Lightning's (its `reduce`), None for one process.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

# The trained weights' L2 norm, as a multiple of its value before the first step: above WARN a warning (once),
# above LIMIT the run stops. AdamW moves each weight by about lr per step whatever the gradient's scale (clipping
# does not bound it), so weights of rms ~0.02 at lr 1e-3 move a few % per step; lr=1e30 multiplies the norm ~1e31.
WEIGHT_GROWTH_WARN = 10.0
WEIGHT_GROWTH_LIMIT = 1e3


def weight_norm(params, strategy=None) -> float:
    """L2 norm of `params`, squares summed over ranks (sharded weights count once; DDP replicas give sqrt(world)
    x the norm at every check alike, so ratios of two norms are unaffected). inf when float32 overflows."""
    params = [p.detach() for p in params]
    if not params:
        return 0.0
    sq = torch.nn.utils.get_total_norm(params).float() ** 2
    if strategy is not None:
        sq = strategy.reduce(sq, reduce_op="sum")
    return float(sq.sqrt())


def check_weight_growth(params, start_norm: float, step: int, lr: float, strategy=None, warned: bool = False) -> bool:
    """After the optimizer step of training step `step` (lr: its learning rate): raise NonFiniteError when the
    trained weights' norm exceeds WEIGHT_GROWTH_LIMIT x `start_norm` (finite but blown up, e.g. lr=1e30: every
    weight moved by ~lr), and warn once above WEIGHT_GROWTH_WARN x. Returns whether it has warned.
    params: the trained parameters; start_norm: their weight_norm before step 0 (0: no check)."""
    from distillspec.errors import NonFiniteError

    norm = weight_norm(params, strategy)
    if math.isnan(norm) or not start_norm > 0:  # NaN weights: check_finite_update / check_finite_step name them
        return warned
    growth = norm / start_norm
    if growth > WEIGHT_GROWTH_LIMIT:  # inf too: finite weights above ~1e19 overflow a float32 norm
        largest = max((float(p.detach().abs().max()) for p in params if p.numel()), default=0.0)
        size = f"{norm:.3g}, {growth:.3g} x" if math.isfinite(norm) else "beyond float32's range, vs"
        raise NonFiniteError(f"the update of training step {step} blew up the draft's weights: their norm is "
                             f"{size} its {start_norm:.3g} before training (limit {WEIGHT_GROWTH_LIMIT:g} x; largest "
                             f"|weight| {largest:.3g}; lr of the step {lr:.3g}); "
                             "stopped before this step is checkpointed, so no checkpoint or draft holds these "
                             "weights. Lower train.lr")
    if growth > WEIGHT_GROWTH_WARN and not warned:
        log.warning("training step %d: the draft's trained weights' norm has grown %.3g x since before training "
                    "(%.3g -> %.3g; lr of the step %.3g); at %g x the run stops. Is train.lr too high?", step, growth,
                    start_norm, norm, lr, WEIGHT_GROWTH_LIMIT)
        return True
    return warned


def check_finite_step(loss_sum: torch.Tensor, params, step: int, strategy=None) -> None:
    """Raise NonFiniteError (on every rank) if the step's loss or any gradient is NaN/inf.

    Called after backward and before the optimizer step, so the weights (and every checkpoint and saved
    draft) stay those of the last finite step. loss_sum: () tensor; params: the trained parameters.
    """
    from distillspec.errors import NonFiniteError

    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss_sum.device)
    bad = torch.stack([(~torch.isfinite(loss_sum)).float(), (~torch.isfinite(grad_norm)).float().to(loss_sum.device)])
    if strategy is not None:
        bad = strategy.reduce(bad, reduce_op="sum")  # every rank stops together
    if bool(bad.any()):
        what = " and ".join(n for n, b in zip(("loss", "gradient"), bad.tolist()) if b)
        raise NonFiniteError(f"non-finite {what} at training step {step} (loss sum {float(loss_sum):.4g}, "
                             f"gradient norm {float(grad_norm):.4g}); stopped before the optimizer step, so "
                             "checkpoints keep the last finite weights and no draft was saved. Lower train.lr, "
                             "set train.grad_clip, or check the models' dtype (pair.dtype=float32)")


def check_finite_update(model, outputs, step: int, strategy=None) -> None:
    """Raise NonFiniteError (on every rank) if the update of training step `step` left a NaN/inf parameter or
    non-finite outputs (huge finite weights, e.g. from lr=1e10, overflow in the forward pass).

    Called after the optimizer step and before that step is checkpointed: the next step's loss check would catch
    this, but the last step has no next one. outputs: a callable running `model` (in eval mode, no grad) on
    some of this step's sequences.
    """
    from distillspec.errors import NonFiniteError

    bad_param = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    bad_out = False
    if bad_param is None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = outputs()
        model.train(was_training)
        bad_out = not bool(torch.isfinite(out).all())
    bad = torch.tensor([float(bad_param is not None or bad_out)], device=next(model.parameters()).device)
    if strategy is not None:
        bad = strategy.reduce(bad, reduce_op="sum")  # every rank stops together
    if bool(bad.any()):
        what = (f"parameter {bad_param} holds NaN/inf" if bad_param else "its outputs on this step's sequences are "
                "NaN/inf" if bad_out else "on another rank")
        largest = max((float(p.detach().abs().max()) for p in model.parameters() if p.numel()), default=0.0)
        raise NonFiniteError(f"the update of training step {step} made the draft non-finite ({what}; largest "
                             f"|weight| {largest:.3g}); stopped before it is checkpointed, so checkpoints keep the "
                             "last finite weights and no draft was saved. Lower train.lr, set train.grad_clip, or "
                             "check the models' dtype (pair.dtype=float32)")


def assert_finite_weights(model) -> None:
    """Raise NonFiniteError naming the first parameter holding NaN/inf (never save such a draft)."""
    from distillspec.errors import NonFiniteError

    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"draft parameter {name} has non-finite values; the draft is not saved")
