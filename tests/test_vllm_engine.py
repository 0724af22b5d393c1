"""vLLM as the generation engine: a served teacher's scores and samples against our own forward, and a
served student's weights against the trained student.

One `vllm serve` of the offline SmolLM2-135M target in float32, started from the serving env by
`distillspec.serving.server.ManagedServer` (the code a run uses), on a free loopback port:
  * scores: for the same token sequences, vLLM's top-k prompt log-probs equal our teacher forward's
    (`TeacherCache`'s `_topk` at temperature 1): the same ids where the log-probs are not tied within 1e-3,
    |Δ log p| <= 1e-3;
  * samples: vLLM's first sampled tokens at T 0.6, top-p 0.95 follow our processed distribution
    (`distillspec.sd.sampling.process_logits`): a χ² test, as our losslessness suite does.
`make test-vllm` runs it (marked vllm).
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_serving_env

from distillspec.serving.jobs import default_vllm_python
from distillspec.serving.server import ManagedServer

pytestmark = [pytest.mark.real_model, pytest.mark.vllm, pytest.mark.timeout(1800)]

VLLM_PY = default_vllm_python()
TOP_K = 20
TOL = 1e-3
MAX_NEW = 200  # the offline target's worked answers end within this (its EOS is then part of the sample)


@pytest.fixture(scope="module")
def target_dir():
    from distillspec.models.offline import ensure_smollm2

    require_serving_env()
    return ensure_smollm2()


@pytest.fixture(scope="module")
def managed(target_dir, tmp_path_factory):
    """The module's ManagedServer, started; the last test of the module kills it."""
    log = tmp_path_factory.mktemp("vllm_engine") / "vllm-teacher.log"
    server = ManagedServer(str(target_dir), python=VLLM_PY, log=log,
                           args=["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
                                 "--max-logprobs", "64", "--seed", "0"])
    with server:
        yield server


@pytest.fixture(scope="module")
def server(managed):
    return managed.client


@pytest.fixture(scope="module")
def teacher(target_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(target_dir)


def _sequences(tokenizer) -> list[list[int]]:
    """Chat prompts of the built-in task with a worked answer appended: what a teacher scores."""
    from distillspec.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(num_train=8, num_eval=4)
    items = task.encode(task.load("train"), tokenizer, limit=4, seed=0)
    return [list(it.input_ids) + list(it.target_ids) for it in items]


def test_served_model_is_the_configured_one(server, target_dir, teacher):
    card = server.model()
    assert card["id"] == str(target_dir) and int(card["max_model_len"]) == 1024
    _, tok = teacher
    text = "Natalia sold 48 clips in April."
    assert server.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]


def test_served_teacher_logprobs_equal_our_forward(server, teacher):
    from distillspec.rollout.teacher_cache import _topk

    model, tok = teacher
    seqs = _sequences(tok)
    served = server.score(seqs, TOP_K)
    worst, positions, tie_swaps = 0.0, 0, 0
    for seq, rows in zip(seqs, served):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, :-1]  # (L-1, V): predicts seq[1:]
        vals, idx, _ = _topk(logits, TOP_K, 1.0)
        full = torch.log_softmax(logits.float(), -1)
        assert rows[0] is None and len(rows) == len(seq)
        for t, row in enumerate(rows[1:]):
            ours = dict(zip(idx[t].tolist(), vals[t].tolist()))
            theirs_top = dict(sorted(row.items(), key=lambda kv: -kv[1])[:TOP_K])
            # every token vLLM returned (its top-k and the actual token) has our log-prob within TOL
            for tid, lp in row.items():
                worst = max(worst, abs(lp - full[t, tid].item()))
            # the same top-k ids, except where the k-th and (k+1)-th are tied within TOL
            diff = set(ours) ^ set(theirs_top)
            if diff:
                kth = vals[t, -1].item()
                assert all(abs(full[t, d].item() - kth) <= TOL for d in diff), (t, diff)
                tie_swaps += 1
            positions += 1
    print(f"\n{positions} positions, top-{TOP_K}: max |Δ log p| = {worst:.2e}, tie swaps at the k-th id: {tie_swaps}")
    assert worst <= TOL
    assert positions > 100


def test_served_samples_follow_our_processed_distribution(server, teacher):
    """First sampled tokens of one prompt, many requests: χ² against process_logits(T 0.6, top-p 0.95)."""
    from scipy import stats

    from distillspec.sd.sampling import process_logits

    model, tok = teacher
    n = 600
    # the prefix of a worked answer where our processed distribution has the most tokens expected >= 5 times
    best = None
    for seq in _sequences(tok):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0]
        probs = process_logits(logits.float(), 0.6, 0.95)  # (L, V)
        plausible = (probs * n >= 5).sum(-1)
        t = int(plausible.argmax())
        if best is None or plausible[t] > best[0]:
            best = (int(plausible[t]), seq[: t + 1], probs[t])
    _, prompt, p = best
    samples = server.sample([prompt] * n, temperature=0.6, top_p=0.95, max_tokens=1, seed=None)
    firsts = torch.tensor([s.tokens[0] for s in samples])
    support = (p > 0).nonzero().flatten()
    assert torch.isin(firsts, support).all(), "vLLM sampled a token outside our nucleus"
    counts = torch.bincount(firsts, minlength=p.numel()).double()
    # bins with an expected count of at least 5; the rest pooled into one bin
    exp = p.double() / p.double().sum() * n  # float32 probabilities sum to 1 within ~1e-7 only
    big = exp >= 5
    obs_b = torch.cat([counts[big], counts[~big].sum()[None]])
    exp_b = torch.cat([exp[big], exp[~big].sum()[None]])
    if exp_b[-1] < 5:  # a pooled bin too small for χ²: merged into the smallest kept bin
        j = int(exp_b[:-1].argmin())
        obs_b[j] += obs_b[-1]
        exp_b[j] += exp_b[-1]
        obs_b, exp_b = obs_b[:-1], exp_b[:-1]
    res = stats.chisquare(obs_b.numpy(), exp_b.numpy())
    print(f"\n{int(big.sum())} bins + pooled, support {support.numel()}, χ² p-value {res.pvalue:.3f}")
    assert big.sum() >= 2, "the test prompt has fewer than two plausible next tokens: pick another"
    assert res.pvalue > 1e-3


def _seed_fault(target_dir, *flags: str) -> dict:
    import json
    import subprocess

    from conftest import REPO

    p = subprocess.run([str(VLLM_PY), str(REPO / "tools" / "vllm_seed_fault.py"), str(target_dir), *flags],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])


@pytest.mark.xfail(reason="vLLM 0.32 CPU build: a seeded request whose prompt is prefilled in chunks dies in "
                          "gen.set_offset (CPU generators have no offset); tools/vllm_seed_fault.py. "
                          "An XPASS means vLLM fixed it.", strict=False)
def test_vllm_cpu_seeded_request_with_chunked_prefill_minimal_repro(target_dir):
    out = _seed_fault(target_dir)
    assert out["completed"], out


def test_vllm_cpu_seed_fault_needs_both_a_seed_and_chunked_prefill(target_dir):
    """The workarounds, and the condition exactly: unseeded requests, or seeded ones prefilled whole, complete."""
    assert _seed_fault(target_dir, "--unseeded")["completed"]
    assert _seed_fault(target_dir, "--no-chunked-prefill")["completed"]


def _items(tok, n=4):
    from distillspec.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(num_train=8, num_eval=4)
    return task.encode(task.load("train"), tok, limit=n, seed=0)


def test_served_teacher_data_of_dataset_outputs_equals_the_in_process_cache(server, teacher):
    """rollout source `fixed`: the served entries equal TeacherCache's (same tokens, ids, log-probs, tail)."""
    from distillspec.rollout.served_teacher import served_entries
    from distillspec.rollout.teacher_cache import TeacherCache

    model, tok = teacher
    items, eos = _items(tok), [tok.eos_token_id]
    ours = TeacherCache(items, "fixed", top_k=TOP_K, temperature=1.0, sample_temperature=1.0, top_p=1.0,
                        max_new_tokens=48, eos_ids=eos, pad_id=tok.pad_token_id)
    ours.build(model, torch.device("cpu"), seed=0, batch_size=4, progress=False)
    served = served_entries(server, items, "fixed", top_k=TOP_K, sample_temperature=1.0, top_p=1.0,
                            max_new_tokens=48, eos_ids=eos, batch_size=4, progress=False)
    worst = 0.0
    for i, e in ours.entries.items():
        s = served[i]
        assert torch.equal(s.tokens, e.tokens)
        same = (s.topk_idx == e.topk_idx).all(-1)
        # where the id lists differ, only by a tie at the k-th place
        assert ((e.topk_logp[~same][:, -1] - s.topk_logp[~same][:, -1]).abs() <= TOL).all()
        worst = max(worst, (s.topk_logp - e.topk_logp)[same].abs().max().item())
        assert torch.allclose(s.tail_logp.exp(), e.tail_logp.exp(), atol=TOL)
    print(f"\nfixed: max |Δ log p| {worst:.2e}")
    assert worst <= TOL


def test_served_teacher_samples_carry_our_teachers_logprobs(server, teacher):
    """rollout source `teacher`: at every sampled position the served top-k equals our forward's on the sampled
    sequence; a completion that stopped ends with the EOS, kept in the entry as our own sampler keeps it."""
    from distillspec.rollout.served_teacher import served_entries
    from distillspec.rollout.teacher_cache import _topk

    model, tok = teacher
    items, eos = _items(tok), [tok.eos_token_id]
    served = served_entries(server, items, "teacher", top_k=TOP_K, sample_temperature=0.6, top_p=0.95,
                            max_new_tokens=MAX_NEW, eos_ids=eos, batch_size=4, progress=False)
    worst, stopped = 0.0, 0
    for i, it in enumerate(items):
        e, prompt = served[i], list(it.input_ids)
        assert 0 < e.length <= MAX_NEW and not torch.isin(e.tokens[:-1], torch.tensor(eos)).any()
        stopped += int(e.tokens[-1].item() in eos)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + e.tokens.tolist()])).logits[0, len(prompt) - 1: -1]
        vals, idx, tail = _topk(logits, TOP_K, 1.0)
        same = (idx.to(torch.int32) == e.topk_idx).all(-1)
        assert same.float().mean() > 0.9
        worst = max(worst, (vals - e.topk_logp)[same].abs().max().item())
        assert torch.allclose(tail.exp(), e.tail_logp.exp(), atol=TOL)
    print(f"\nteacher samples: max |Δ log p| {worst:.2e}, {stopped} of {len(items)} stopped at EOS")
    assert worst <= TOL
    assert stopped > 0, f"no sample reached its EOS within {MAX_NEW} tokens: the EOS case went untested"


# End to end: the same short training run with the teacher data from our loop and from vLLM. The two runs train
# on different teacher samples (vLLM's generator is not ours), so their drafts differ by at least what any change
# of teacher samples gives. docs/serving.md measured the demo (40 steps): hf 0.517, 0.514, 0.499 and vLLM 0.563,
# 0.546 (α_expected; a gap of 0.03-0.06 whose cause is not found yet); the tolerance below admits that gap and
# fails a broken served path (untrained: 0.045).
E2E = ["train.max_steps=20", "train.num_train=48", "train.eval_every=0", "sd.num_eval=16",
       "sd.measure_speedup=false", "sd.draft_quality=false", "compare_untrained=false"]
E2E_TOL = 0.08  # |Δ α_expected| between the hf and vllm runs


def test_training_on_served_teacher_data_reaches_the_same_acceptance(target_dir, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO

    alphas = {}
    for engine in ("hf", "vllm"):
        run_dir = tmp_path / engine
        p = subprocess.run([sys.executable, "run.py", *E2E, f"rollout.engine={engine}", "rollout.cache_store=false",
                            f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=1500)
        assert p.returncode == 0, p.stderr[-3000:]
        alphas[engine] = json.loads((run_dir / "metrics.json").read_text())["metrics"]["sd/alpha_expected"]
    print(f"\nα_expected after 20 steps: hf {alphas['hf']:.3f}, vllm {alphas['vllm']:.3f}")
    assert alphas["hf"] > 0.3 and alphas["vllm"] > 0.3  # both trained (untrained: 0.045)
    assert abs(alphas["hf"] - alphas["vllm"]) <= E2E_TOL


# Student rollouts: the served student's weights follow training (distillspec.rollout.student_server).
@pytest.mark.parametrize("sync", [True, False])
def test_served_student_follows_training(target_dir, tmp_path, sync):
    """After 3 AdamW steps on its own served samples, synced as the trainer syncs, vLLM's greedy continuations
    of 8 prompts equal the in-process student's token for token (float32); with the syncs skipped they do not."""
    from distillspec.models.offline import ensure_truncated_draft
    from student_sync import train_and_compare

    out = train_and_compare(VLLM_PY, ensure_truncated_draft(4), tmp_path / "run", sync=sync, lr=3e-3)
    changed = sum(a != b for a, b in zip(out["ours"], out["before"]))
    same = sum(a == b for a, b in zip(out["served"], out["ours"]))
    print(f"\nsync={sync}: training changed {changed} of 8 greedy continuations; served == ours on {same} of 8")
    assert changed > 0, "training did not change the greedy outputs: the check would be empty"
    if sync:
        assert out["served"] == out["ours"]
    else:
        assert out["served"] != out["ours"]


# On-policy teacher scores (rollout.teacher_location=server: distillspec.rollout.served_scores).
def test_served_scores_of_student_rollouts_equal_our_teacher_forward(server, teacher):
    """Student samples of 4 prompts (the offline pair's draft, T 1, left-padded batch, ragged lengths): the teacher
    server's top-k at every completion position equals our forward's (TeacherCache's `_topk`), the same ids where
    the k-th is not tied within TOL, |Δ log p| <= TOL; the tail masses within TOL; zeros past each length."""
    from transformers import AutoModelForCausalLM

    from distillspec.lit.data import left_pad
    from distillspec.models.forward import completion_logits
    from distillspec.models.offline import ensure_truncated_draft
    from distillspec.rollout.sequences import assemble
    from distillspec.rollout.served_scores import ServedScores
    from distillspec.rollout.teacher_cache import _topk
    from distillspec.sd.baseline import autoregressive_generate

    model, tok = teacher
    student = AutoModelForCausalLM.from_pretrained(ensure_truncated_draft(4), dtype=torch.float32).eval()
    ids, mask = left_pad([it.input_ids for it in _items(tok)], tok.pad_token_id)
    res = autoregressive_generate(student, ids, mask, 32, temperature=1.0, top_p=1.0,
                                  generator=torch.Generator().manual_seed(0), eos_token_id=[tok.eos_token_id],
                                  pad_token_id=tok.pad_token_id)
    lengths = torch.minimum(res.lengths, torch.tensor([32, 27, 21, 12]))  # ragged, as rows ended by EOS are
    roll = assemble(ids, mask, res.tokens, lengths, tok.pad_token_id, "student")
    served = ServedScores(server, TOP_K)(roll)
    with torch.no_grad():
        logits = completion_logits(model, roll)  # (B, T, V)
    vals, idx, tail = _topk(logits, TOP_K, 1.0)
    full = torch.log_softmax(logits.float(), -1)
    m = roll.completion_mask()
    assert not served.topk_idx[~m].any() and not served.topk_logp[~m].any() and not served.tail_logp[~m].any()
    worst, ties = 0.0, 0
    assert torch.allclose(served.tail_logp[m].exp(), tail[m].exp(), atol=TOL)  # tail masses (as the fixed test)
    for b, t in m.nonzero().tolist():
        s_idx = served.topk_idx[b, t]
        worst = max(worst, float((served.topk_logp[b, t] - full[b, t, s_idx]).abs().max()))
        diff = set(s_idx.tolist()) ^ set(idx[b, t].tolist())
        if diff:
            kth = vals[b, t, -1].item()
            assert all(abs(full[b, t, d].item() - kth) <= TOL for d in diff), (b, t, diff)
            ties += 1
    print(f"\n{int(m.sum())} positions of {len(lengths)} student rollouts (lengths {lengths.tolist()}), "
          f"top-{TOP_K}: max |Δ log p| = {worst:.2e}, tie swaps at the k-th id: {ties}")
    assert worst <= TOL and int(m.sum()) > 60


# End to end, on-policy: the same short run with student rollouts from our loop and from a vLLM student server
# (synced every step), three seeds each. vLLM's rollouts are not our sampler's (and not seeded per request), so a
# single pair differs by the run-to-run spread. Measured (2026-12-05, 2-core Intel Xeon, this config): α_expected
# hf seeds 0-5: 0.142 0.124 0.095 0.087 0.071 0.109 (mean 0.105, sd 0.026); vLLM seeds 0-5: 0.129 0.148 0.095
# 0.107 0.110 0.080 (mean 0.111, sd 0.024), and seed 0 again 0.090 and 0.155; untrained 0.040. A one-pair
# tolerance of 0.03 failed in CI (hf 0.142, vLLM 0.090). With sd 0.025 per run, the difference of two 3-seed
# means has sd 0.020: the tolerance is 3 of those. Both means must also clear the untrained 0.040 by 0.02 (3
# sd of a 3-seed mean below the measured means); student rollouts a broken served path made (wrong tokens, a
# stale student) fall out of one or the other. The syncs themselves are checked by the reload count here and,
# token for token, by test_served_student_follows_training.
E2E_STUDENT = ["rollout=student", "train.max_steps=6", "train.num_train=16", "train.max_new_tokens=32",
               "train.eval_every=0", "sd.num_eval=8", "sd.measure_speedup=false", "sd.draft_quality=false",
               "compare_untrained=false"]
E2E_STUDENT_SEEDS = (0, 1, 2)
E2E_STUDENT_TOL = 0.06      # |Δ| of the two engines' 3-seed mean α_expected
E2E_STUDENT_TRAINED = 0.06  # each engine's mean α_expected must exceed this (untrained: 0.040)


def test_training_on_served_student_rollouts_reaches_the_same_acceptance(target_dir, tmp_path):
    import json
    import statistics
    import subprocess
    import sys

    from conftest import REPO

    alphas = {"hf": [], "vllm": []}
    for engine in alphas:
        for seed in E2E_STUDENT_SEEDS:
            run_dir = tmp_path / f"{engine}-{seed}"
            p = subprocess.run([sys.executable, "run.py", *E2E_STUDENT, f"rollout.engine={engine}", f"seed={seed}",
                                f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=1500)
            assert p.returncode == 0, p.stderr[-3000:]
            alphas[engine].append(json.loads((run_dir / "metrics.json").read_text())["metrics"]["sd/alpha_expected"])
            if engine == "vllm":
                log = (run_dir / "vllm_logs" / "student-server.log").read_text()
                assert log.count("Reloading and processing weights took") == 5  # before steps 1-5 (step 0 started it)
    mean = {e: statistics.mean(a) for e, a in alphas.items()}
    print(f"\nα_expected after 6 on-policy steps, seeds {E2E_STUDENT_SEEDS}: "
          + "; ".join(f"{e} {' '.join(f'{a:.4f}' for a in alphas[e])} (mean {mean[e]:.4f})" for e in alphas))
    assert mean["hf"] > E2E_STUDENT_TRAINED and mean["vllm"] > E2E_STUDENT_TRAINED
    assert abs(mean["hf"] - mean["vllm"]) <= E2E_STUDENT_TOL


def _group(pgid: int) -> list[str]:
    """`pid name` of every live (not zombie) process of process group `pgid`."""
    from pathlib import Path

    out = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
        except (OSError, NotADirectoryError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[2] == str(pgid) and fields[0] != "Z":
            out.append(f"{d.name} {stat[stat.index('(') + 1:stat.rindex(')')]}")
    return out


def test_kill_9_of_the_server_leaves_no_vllm_process(managed, server):
    """Last in this module (it kills the module's server). `kill -9` of `vllm serve` orphans its EngineCore and
    Worker processes; stopping the managed server ends them all: none is alive 10 s later."""
    import os
    import signal
    import time

    from distillspec.errors import EngineError

    pgid = managed.proc.pid
    before = _group(pgid)
    assert len(before) >= 2, before  # the API server and its engine process(es)
    os.kill(pgid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(EngineError, match=r"exited \(code -9\)"):
        server.tokenize("the next request finds the server gone")
    managed.stop()
    while _group(pgid) and time.monotonic() - killed < 10:
        time.sleep(0.2)
    assert not _group(pgid), f"alive 10 s after the kill: {_group(pgid)} (before it: {before})"
