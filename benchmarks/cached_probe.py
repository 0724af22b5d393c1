"""Recipe probe on cached teacher data: alpha_expected (mean 1 - TV on held-out teacher samples) of a draft made
of chosen target layers, trained with a sparse top-k teacher on teacher samples computed once per prompt.

    python benchmarks/cached_probe.py [--layers 0,1,2,3] [--T 1.0] [--loss-T 1.0] [--steps 100] [--batch 8] [--ntrain 128] [--k 64]

Plain torch (no Lightning): the library's decoding loop, rollout assembly, completion logits and sparse loss.
Teacher data is saved under outputs/probe_data/ (in the repo, not a shared /tmp path another user could plant a
file at) as plain tensors, loaded with torch.load(weights_only=True), and reused by later runs with the same sizes
and temperature.
The "Recipe probe" numbers in docs/benchmarks.md come from this script.
"""
import argparse, logging, math, os, time
from dataclasses import asdict
from pathlib import Path

import torch

from distillspec.models.loading import PairSpec
from distillspec.tasks.arithmetic import ArithmeticTask
from distillspec.lit.data import left_pad
from distillspec.evaluation import eos_token_ids
from distillspec.sd.baseline import autoregressive_generate
from distillspec.rollout.sequences import Rollout, assemble
from distillspec.models.forward import completion_logits
from distillspec.losses.divergences import overlap
from distillspec.losses.sparse import sparse_divergence_loss
log = logging.getLogger("cached_probe")
DATA_DIR = Path(__file__).resolve().parents[1] / "outputs" / "probe_data"  # the repo's own, git-ignored outputs/


def data_path(ntrain: int, neval: int, T: float, tokens: int, data_dir: Path = DATA_DIR) -> Path:
    """Where the teacher data of these settings is kept (under the repo's outputs/, never a shared /tmp path)."""
    return Path(data_dir) / f"probe_data_{ntrain}_{neval}_{T}_{tokens}.pt"


def save_data(path: Path, evd: list, trd: list) -> None:
    """Write [(Rollout, teacher logits)] lists as plain tensors and strings (loadable with weights_only=True),
    atomically (temp file in the same dir, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"eval": [(asdict(r), tl) for r, tl in evd], "train": [(asdict(r), tl) for r, tl in trd]}, tmp)
    os.replace(tmp, path)


def load_data(path: Path) -> tuple[list, list] | None:
    """The saved (eval, train) lists, or None when missing or unreadable. weights_only=True: a file that would
    run code when unpickled is refused, never executed."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return tuple([(Rollout(**r), tl) for r, tl in data[k]] for k in ("eval", "train"))
    except Exception as err:  # noqa: BLE001 - rebuilt below
        log.warning("ignoring unreadable teacher data %s (%s); recomputing it", path, err)
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0,1,2,3")
    ap.add_argument("--train", default="all")  # all | layers
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ntrain", type=int, default=128)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--div", default="fkl")
    ap.add_argument("--T", type=float, default=1.0)
    ap.add_argument("--loss-T", type=float, default=1.0)  # temperature both distributions are taken at in the loss
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--neval", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pair = PairSpec(draft="offline:smollm2-135m-L4", target="offline:smollm2-135m", dtype="float32").load("cpu")
    tgt = pair.target; tok = pair.tokenizer
    # draft = chosen target layers
    layers = [int(x) for x in a.layers.split(",")]
    cfg = tgt.config.to_dict(); cfg["num_hidden_layers"] = len(layers); cfg.pop("layer_types", None)
    draft = type(tgt)(type(tgt.config).from_dict(cfg))
    sd = {}
    for k, v in tgt.state_dict().items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i in layers: sd[k.replace(f"model.layers.{i}.", f"model.layers.{layers.index(i)}.", 1)] = v.clone()
        else: sd[k] = v.clone()
    draft.load_state_dict(sd, strict=True); draft.tie_weights()
    if a.train == "layers":
        draft.model.embed_tokens.weight.requires_grad_(False)
    task = ArithmeticTask(num_train=max(a.ntrain, 16), num_eval=a.neval, seed=1234, max_new_tokens=a.tokens)
    tr = task.encode(task.load("train"), tok)[: a.ntrain]; ev = task.encode(task.load("eval"), tok)[: a.neval]
    eos = eos_token_ids(tok, tgt); pad = tok.pad_token_id
    def teacher_data(items, seed, bs=16):
        out = []
        for i in range(0, len(items), bs):
            b = items[i:i+bs]
            ids, mask = left_pad([it.input_ids for it in b], pad)
            g = torch.Generator().manual_seed(seed + i)
            res = autoregressive_generate(tgt, ids, mask, a.tokens, temperature=a.T, generator=g, eos_token_id=eos, pad_token_id=pad)
            r = assemble(ids, mask, res.tokens, res.lengths, pad, "teacher")
            with torch.no_grad():
                tl = completion_logits(tgt, r)
            out.append((r, tl))
        return out
    t0 = time.time()
    fn = data_path(a.ntrain, a.neval, a.T, a.tokens)
    saved = load_data(fn)
    if saved is not None:
        evd, trd = saved
        t1 = t2 = time.time()
    else:
        evd = teacher_data(ev, 999)
        t1 = time.time()
        trd = teacher_data(tr, 0)
        t2 = time.time()
        save_data(fn, evd, trd)
    # sparse cache of train
    cache = []
    for r, tl in trd:
        lp = torch.log_softmax(tl.float() / a.loss_T, -1)
        v, i = lp.topk(a.k, -1)
        for j in range(r.input_ids.shape[0]):
            cache.append((r, j, i[j], v[j]))
    print(f"layers {layers} teacher gen eval {t1-t0:.0f}s train {t2-t1:.0f}s ({sum(int(r.lengths.sum()) for r,_ in trd)} tok)", flush=True)
    def alpha():
        draft.eval(); tot = n = 0.0
        with torch.no_grad():
            for r, tl in evd:
                s = completion_logits(draft, r); m = r.completion_mask()
                ov = overlap(tl[m], s[m]) if a.T == 1.0 else overlap(tl[m] / a.T, s[m] / a.T)
                tot += float(ov.sum()); n += int(m.sum())
        return tot / n
    hist = [(0, round(alpha(), 4))]
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / max(a.steps, 1))))
    tt = time.time(); ttrain = 0.0
    for step in range(a.steps):
        perm = torch.randperm(len(cache), generator=torch.Generator().manual_seed(step // max(1, len(cache) // a.batch)))
        pos = (step * a.batch) % len(cache)
        sel = [cache[int(x)] for x in perm[pos:pos + a.batch]]
        # rebuild a batch: left-pad prompts, right-pad completions
        from distillspec.lit.data import left_pad as lp_
        prompts = []; comps = []; lens = []
        for r, j, i, v in sel:
            L = r.prompt_len; ids = r.input_ids[j]; msk = r.attention_mask[j]
            prompts.append(ids[:L][msk[:L].bool()].tolist()); comps.append(ids[L:]); lens.append(r.lengths[j])
        pi, pm = lp_(prompts, pad)
        W = max(int(l) for l in lens)
        comp = torch.full((len(sel), W), pad); ti = torch.zeros(len(sel), W, a.k, dtype=torch.long); tv = torch.full((len(sel), W, a.k), -1000.0)
        for b, ((r, j, i, v), c, l) in enumerate(zip(sel, comps, lens)):
            l = int(l); comp[b, :l] = c[:l]; ti[b, :l] = i[:l]; tv[b, :l] = v[:l]
        rr = assemble(pi, pm, comp, torch.stack(lens), pad, "teacher")
        s0 = time.time()
        draft.train()
        sl = completion_logits(draft, rr)
        loss, _ = sparse_divergence_loss(sl, ti, tv, rr.completion_mask(), a.div, temperature=a.loss_T,
                                         chunk_size=None)
        loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad(); sched.step()
        ttrain += time.time() - s0
        if (step + 1) % a.every == 0:
            hist.append((step + 1, round(alpha(), 4)))
            print(hist[-1], f"{ttrain/(step+1):.2f}s/step", flush=True)
    print(f"RESULT {vars(a)} hist={hist} train_s={ttrain:.0f} total={time.time()-t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
