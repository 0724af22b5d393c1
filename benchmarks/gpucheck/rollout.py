"""Section 5: rollouts on vLLM, `rollout.engine=vllm` against our own loop, at full size.

Student = the small shape (Qwen3-0.6B), teacher = the big one (Qwen3-4B), random weights, in ctx.dtype (bf16).
vLLM servers from the serving env (`distillspec.serving.server.ManagedServer` / `distillspec.rollout.
student_server.StudentServer`, the code a run uses) on the same GPU, each with its own --gpu-memory-utilization
so that they and the training process fit together. The student server loads the student's weights (and
reloads them at each sync); the teacher server gets the teacher's config only and draws random weights of its
own (--load-format dummy: no 8 GB write and read of random numbers; speed does not depend on the values).
Random models have no tokenizer; vLLM loads one and decodes every sampled id with it, so each model dir gets a
word-level placeholder covering the whole vocabulary, token i = "<i>" (`vocab_tokenizer`). (With
--skip-tokenizer-init instead, the student server exited at start-up, "Tokenizer not available when
`skip_tokenizer_init=True`", on vLLM 0.32's CPU build; not narrowed down.) Requests and answers are token ids.
Rows:
  * teacher data (the demo's settings: `prompts` random prompts, T 0.6, top-p 0.95, up to `new_tokens` tokens,
    top-`top_k` log-probs per position): ours (`TeacherCache.build`, the teacher in this process) vs vLLM
    (`served_entries` through the teacher server); tokens/s = sampled tokens / the build's wall time, the
    server's start-up reported apart;
  * on-policy steps (student rollouts at T 1 of `step_batch` prompts x up to `step_new_tokens` tokens, forward
    KL, AdamW step on the student; round 0 is the warm-up, `rounds` timed): hf (rollouts in this process,
    teacher in process), vllm student (synced every step: save + reload_weights; teacher in process), vllm
    student + vllm teacher (the teacher's top-k scores from the server; the teacher is no longer in this
    process). Step s, its sync s, rollout tokens/s, and the training process's peak GPU memory
    (torch.cuda.max_memory_allocated over the timed rounds): teacher in process vs served.
The servers run with --enforce-eager by default (no CUDA-graph capture: start-up fits the section's cap; vLLM's
decode is then slower than it can be, so its tokens/s is a lower bound). Skipped, with the reason as `status`,
without CUDA (unless `cpu_vllm`: the same code on CPU with tiny shapes, `--smoke --rollout-vllm`) or without a
serving python that imports vLLM (DISTILLSPEC_VLLM_PYTHON, else .venv-vllm/bin/python). A failing part is a
row with its error; the other parts still run.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import subprocess
import tempfile
import time
import traceback
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch

from gpucheck.common import Ctx, TimeGuard, batches, build, ragged_prompts, release, timed

SMOKE_OVERRIDES = dict(head_dim=32)  # vLLM's CPU attention supports head sizes 32, 64, ... (not the smoke 16)
NO_CUDA = "skipped: no CUDA (--smoke starts no vLLM servers: two CPU start-ups of ~30 s each put the section " \
          "over a minute; --smoke --rollout-vllm runs it)"
CUDA_PROBE = "import torch; print(torch.cuda.is_available())"


def vocab_tokenizer(vocab_size: int, eos_id: int):
    """A placeholder tokenizer over the whole vocabulary: token i is "<i>" (word level, space separated),
    pad/unk = id 0, EOS = `eos_id`; what vLLM loads next to random weights (it decodes any sampled id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [f"<{i}>" for i in range(vocab_size)]
    tok = Tokenizer(models.WordLevel(vocab={n: i for i, n in enumerate(names)}, unk_token=names[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=names[0], unk_token=names[0],
                                   eos_token=names[eos_id])


def skip_reason(ctx: Ctx, cpu_vllm: bool, timeout: float = 120.0) -> tuple[str | None, Path, str | None]:
    """(a "skipped: ..." status or None, the serving python, its vLLM version)."""
    from distillspec.errors import ConfigError
    from distillspec.serving.env import check_serving_python
    from distillspec.serving.jobs import VLLM_PY_ENV, default_vllm_python

    python = default_vllm_python()
    if ctx.device.type != "cuda" and not cpu_vllm:
        return NO_CUDA, python, None
    try:
        version = check_serving_python(python, timeout=timeout)
    except ConfigError as exc:
        return f"skipped: no vLLM serving python ({exc}; or set {VLLM_PY_ENV})", python, None
    if ctx.device.type == "cuda":  # a CPU build of vLLM (e.g. a carried .venv-vllm from a CPU machine) would
        try:
            seen = subprocess.run([str(python), "-c", CUDA_PROBE], capture_output=True, text=True,
                                  timeout=timeout).stdout.strip().splitlines()[-1:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            seen = [f"{type(exc).__name__}"]
        if seen != ["True"]:  # run the 4B teacher on the CPU: not a GPU number
            return (f"skipped: the vLLM serving python {python} (vLLM {version}) sees no CUDA (a CPU build?); "
                    f"give a CUDA one with {VLLM_PY_ENV}"), python, version
    return None, python, version


@contextlib.contextmanager
def _ready_within(seconds: float):
    """StudentServer starts its ManagedServer with the default 900 s ready timeout; bound it by the section's
    time left, so a server that never comes up is an error row, not a hang past the cap."""
    import distillspec.serving.server as srv

    orig = srv.ManagedServer
    srv.ManagedServer = functools.partial(orig, ready_timeout=seconds)
    try:
        yield
    finally:
        srv.ManagedServer = orig


def server_args(ctx: Ctx, *, mem: float, eager: bool) -> list[str]:
    """`vllm serve` arguments of both servers on CUDA: this server's share of the GPU (and no graph capture)."""
    args = []
    if ctx.device.type == "cuda":
        args += ["--gpu-memory-utilization", f"{mem:g}"] + (["--enforce-eager"] if eager else [])
    return args


class Runner:
    """The section's state: rows, skipped parts, errors; `part(name, fn)` runs one part and keeps going."""

    def __init__(self, ctx: Ctx, guard: TimeGuard) -> None:
        self.ctx, self.guard = ctx, guard
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.errors: list[str] = []

    def part(self, name: str, fn):
        """fn() or None: None when the guard has no time left (skipped) or fn raised (an error row)."""
        if self.guard.left() <= 0:
            self.skipped.append(f"{name}: time guard")
            return None
        try:
            return fn()
        except Exception as exc:  # one part's failure must not lose the others
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}"[:1500])
            self.rows.append({"part": name, "key": "failed", "configuration": "FAILED",
                              "note": f"{type(exc).__name__}: {exc}"[:300]})
            traceback.print_exc()
            return None


def on_policy_rounds(ctx: Ctx, guard: TimeGuard, opt, prompts, *, batch: int, rounds: int, rollout, loss_fn) -> dict:
    """1 + `rounds` on-policy steps: rollout(round, ids, mask) -> (completions (B, T), lengths (B,), sync s);
    loss_fn(rollout) -> (scalar loss, teacher s); backward, AdamW step. Means over the timed rounds (round 0,
    the warm-up, is not timed) and the peak GPU memory over them."""
    from distillspec.rollout.sequences import assemble

    stats = {"tokens": 0, "rollout_s": 0.0, "sync_s": [], "step_s": [], "score_s": [], "timed": 0}
    for r in range(rounds + 1):
        if r > 0 and guard.left() <= 0:
            break
        if r == 1:
            ctx.reset_peak()
        ids, mask = next(batches(ctx, prompts[r * batch:(r + 1) * batch], batch))
        ctx.sync()
        t0 = time.perf_counter()
        comp, lengths, sync_s = rollout(r, ids, mask)
        ctx.sync()
        t1 = time.perf_counter()
        roll = assemble(ids, mask, comp.to(ctx.device), lengths.to(ctx.device), 0, "student")
        loss, score_s = loss_fn(roll)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.sync()
        if r > 0:
            stats["tokens"] += int(lengths.sum())
            stats["rollout_s"] += t1 - t0 - sync_s
            stats["sync_s"].append(sync_s)
            stats["score_s"].append(score_s)
            stats["step_s"].append(time.perf_counter() - t0)
            stats["timed"] += 1
    n = stats["timed"]
    mean = (lambda k: sum(stats[k]) / n) if n else (lambda k: None)  # noqa: E731
    return {"steps_timed": n, "batch": batch, "tokens": stats["tokens"], "step_s": mean("step_s"),
            "sync_s": mean("sync_s"), "teacher_score_s": mean("score_s"),
            "tokens_per_s": stats["tokens"] / stats["rollout_s"] if stats["rollout_s"] > 0 else None,
            "peak_gib": ctx.peak_gib() if n else None}


def dense_loss(ctx: Ctx, student, teacher):
    """Forward KL against the in-process teacher's full distributions (chunked, as training runs it)."""
    from distillspec.losses.divergences import divergence_loss
    from distillspec.models.forward import completion_logits

    def fn(roll):
        t0 = time.perf_counter()
        with torch.no_grad():
            t_logits = completion_logits(teacher, roll)
        ctx.sync()
        score_s = time.perf_counter() - t0
        loss, _ = divergence_loss(completion_logits(student, roll), t_logits, roll.completion_mask(), "fkl",
                                  chunk_size=1024)
        return loss, score_s
    return fn


def served_loss(student, client, top_k: int):
    """Forward KL against the served teacher's top-k scores (rollout.teacher_location=server: ServedScores)."""
    from distillspec.losses.sparse import sparse_divergence_loss
    from distillspec.models.forward import completion_logits
    from distillspec.rollout.served_scores import ServedScores

    scores = ServedScores(client, top_k)

    def fn(roll):
        t0 = time.perf_counter()
        sp = scores(roll)
        score_s = time.perf_counter() - t0
        loss, _ = sparse_divergence_loss(completion_logits(student, roll), sp.topk_idx, sp.topk_logp,
                                         roll.completion_mask(), "fkl", chunk_size=1024, tail_logp=sp.tail_logp)
        return loss, score_s
    return fn


def run(ctx: Ctx, guard: TimeGuard, *, cpu_vllm: bool = False, prompts: int = 96, prompt_len: int = 64,
        new_tokens: int = 64, top_k: int = 64, data_batch: int = 48, step_batch: int = 16,
        step_new_tokens: int = 128, rounds: int = 2, student_shape: str = "qwen3-0.6b",
        teacher_shape: str = "qwen3-4b", teacher_mem: float = 0.35, student_mem: float = 0.15,
        eager: bool = True) -> dict:
    """The section's result: {"status": "ran" | "ran, n part(s) failed" | "skipped: <reason>", "rows", "summary",
    "skipped", "errors", "settings", ...} (plain values for JSON)."""
    reason, python, version = skip_reason(ctx, cpu_vllm, timeout=max(min(guard.left(), 120.0), 10.0))
    settings = {"prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens, "top_k": top_k,
                "data_batch": data_batch, "step_batch": step_batch, "step_new_tokens": step_new_tokens,
                "rounds": rounds, "teacher_mem": teacher_mem, "student_mem": student_mem, "enforce_eager": eager}
    out = {"status": reason or "ran", "vllm": version, "python": str(python), "shapes": [student_shape, teacher_shape],
           "settings": settings, "rows": [], "summary": {}, "skipped": [], "errors": []}
    if reason:
        return out
    runner = Runner(ctx, guard)
    try:
        with tempfile.TemporaryDirectory(prefix="gpucheck_rollout_") as tmp, contextlib.ExitStack() as stack:
            _measure(ctx, guard, runner, stack, Path(tmp), python, out, settings, student_shape, teacher_shape)
    finally:
        release()
        out.update(rows=runner.rows, skipped=runner.skipped, errors=runner.errors, summary=summary(runner.rows))
    if runner.errors:
        out["status"] = f"ran, {len(runner.errors)} part(s) failed"
    return out


def _measure(ctx, guard, runner, stack, tmp, python, out, s, student_shape, teacher_shape) -> None:
    from distillspec.rollout.served_teacher import served_entries
    from distillspec.rollout.student_server import StudentServer
    from distillspec.rollout.teacher_cache import TeacherCache
    from distillspec.sd.baseline import autoregressive_generate
    from distillspec.serving.jobs import available_memory, kv_cache_bytes
    from distillspec.serving.server import ManagedServer

    over = SMOKE_OVERRIDES if ctx.smoke else {}
    dtype = str(ctx.dtype).split(".")[-1]
    student = build(ctx, student_shape, seed=4, **over)
    teacher = build(ctx, teacher_shape, seed=5, **over)
    # built from a config, not loaded: vLLM needs the class name to pick a generator
    student.config.architectures = [type(student).__name__]
    teacher.config.architectures = [type(teacher).__name__]
    vocab = teacher.config.vocab_size
    eos_id = teacher.config.eos_token_id
    eos = [int(eos_id)] if isinstance(eos_id, int) and eos_id < vocab else [vocab - 1]  # random weights: rare
    data_items = [SimpleNamespace(input_ids=p, target_ids=None)
                  for p in ragged_prompts(s["prompts"], s["prompt_len"], vocab, ctx.seed + 3)]
    step_prompts = ragged_prompts(s["step_batch"] * (s["rounds"] + 1), s["prompt_len"], vocab, ctx.seed + 4)
    step_len = _round_up(s["prompt_len"] + s["step_new_tokens"] + 1)
    teacher_len = _round_up(s["prompt_len"] + max(s["new_tokens"], s["step_new_tokens"]) + 1)
    cache_kw = dict(top_k=s["top_k"], temperature=1.0, sample_temperature=0.6, top_p=0.95, eos_ids=eos, pad_id=0)
    data_note = f"{len(data_items)} prompts x {s['new_tokens']} tokens, T 0.6, top-p 0.95, top-{s['top_k']} log-probs"
    step_note = f"{s['step_batch']} prompts x {s['step_new_tokens']} tokens, T 1; forward KL; AdamW"
    tokenizer = vocab_tokenizer(vocab, eos[0])

    # 1. teacher data, ours: TeacherCache.build with the teacher in this process (a short warm-up first)
    def ours_data():
        TeacherCache(data_items[:2], "teacher", max_new_tokens=4, **cache_kw).build(
            teacher, ctx.device, seed=0, batch_size=2, progress=False)
        cache = TeacherCache(data_items, "teacher", max_new_tokens=s["new_tokens"], **cache_kw)
        ctx.reset_peak()
        _, secs = timed(ctx, cache.build, teacher, ctx.device, seed=0, batch_size=s["data_batch"], progress=False)
        tokens = sum(e.length for e in cache.entries.values())
        runner.rows.append({"part": "teacher data", "key": "data_ours",
                            "configuration": "ours: TeacherCache.build, teacher in process", "tokens": tokens,
                            "seconds": secs, "tokens_per_s": tokens / secs, "peak_gib": ctx.peak_gib(),
                            "note": data_note})
    runner.part("teacher data, ours", ours_data)

    def save_teacher():  # its config and tokenizer: the server draws its own random weights (--load-format dummy)
        teacher.config.save_pretrained(tmp / "teacher")
        tokenizer.save_pretrained(tmp / "teacher")
        return True
    saved = runner.part("teacher config (for its server)", save_teacher)

    # 2. on-policy steps with the teacher in process: student rollouts ours (hf), then on the student's server
    student.requires_grad_(True).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    optimizer_steps = itertools.count()  # the server syncs when a new optimizer step comes (sync_every 1)

    def steps_row(key, configuration, rollout, loss_fn, note=""):
        res = on_policy_rounds(ctx, guard, opt, step_prompts, batch=s["step_batch"], rounds=s["rounds"],
                               rollout=rollout, loss_fn=loss_fn)
        runner.rows.append({"part": "on-policy steps", "key": key, "configuration": configuration, **res,
                            "note": "; ".join(x for x in (step_note, note) if x)})

    def hf_rollout(step, ids, mask):
        next(optimizer_steps)
        student.eval()
        res = autoregressive_generate(student, ids, mask, s["step_new_tokens"], temperature=1.0, eos_token_id=eos,
                                      pad_token_id=0)
        student.train()
        return res.tokens, res.lengths, 0.0

    runner.part("on-policy steps, hf", lambda: steps_row(
        "steps_hf", "hf: student rollouts in process, teacher in process", hf_rollout,
        dense_loss(ctx, student, teacher)))

    server = StudentServer(python=python, run_dir=tmp / "student", tokenizer=tokenizer, dtype=dtype,
                           max_model_len=step_len, sync_every=1, prompt_lens=[len(p) for p in step_prompts],
                           max_new_tokens=s["step_new_tokens"], seed=0,
                           args=server_args(ctx, mem=s["student_mem"], eager=s["enforce_eager"]))
    stack.callback(server.close)
    stack.callback(lambda: out.update(student_syncs=len(server.sync_seconds)))  # the first one started it

    def vllm_rollout(step, ids, mask):
        t0 = time.perf_counter()
        if server.client is None:  # the first sync starts the server (round 0 of the first vllm row: not timed)
            with _ready_within(max(guard.left(), 30.0)):
                server.maybe_sync(next(optimizer_steps), student)
            server.client.timeout = max(guard.left(), 60.0)
            out.setdefault("server_start_s", {})["student"] = time.perf_counter() - t0
        else:
            server.maybe_sync(next(optimizer_steps), student)
        sync_s = time.perf_counter() - t0
        comp, lengths = server.generate(ids, mask, s["step_new_tokens"], temperature=1.0, top_p=1.0, eos_ids=eos,
                                        pad_id=0)
        return comp, lengths, sync_s

    runner.part("on-policy steps, vllm student", lambda: steps_row(
        "steps_vllm", "vllm student (synced every step), teacher in process", vllm_rollout,
        dense_loss(ctx, student, teacher), "round 0 (not timed) started the student server"))

    # 3. the teacher leaves this process: teacher data and on-policy scores from its server
    gone = weakref.ref(teacher)
    del teacher
    release()
    out["teacher_freed"] = gone() is None  # nothing here still holds it (else the served peak would include it)
    if not saved:
        runner.skipped.append("teacher server: the teacher was not saved")
        return

    def teacher_server():
        t0 = time.perf_counter()
        args = ["--dtype", dtype, "--max-model-len", str(teacher_len), "--max-logprobs", str(s["top_k"]),
                "--seed", "0", "--load-format", "dummy",
                *server_args(ctx, mem=s["teacher_mem"], eager=s["enforce_eager"])]
        if ctx.device.type != "cuda":  # as rollout_engine on a CPU: no graphs, a KV space sized to the work
            args.append("--enforce-eager")
            lens = [len(it.input_ids) for it in data_items]
            kv = kv_cache_bytes(lens, max(s["new_tokens"], s["step_new_tokens"]), 0, teacher_len,
                                [str(tmp / "teacher")], available_memory())  # no weights file: KV sized alone
            args += ["--kv-cache-memory-bytes", str(kv)] if kv is not None else []
        srv = ManagedServer(str(tmp / "teacher"), python=python, log=tmp / "teacher-server.log",
                            ready_timeout=max(guard.left(), 30.0), args=args)
        client = stack.enter_context(srv)
        client.timeout = max(guard.left(), 60.0)
        out.setdefault("server_start_s", {})["teacher"] = time.perf_counter() - t0
        return client
    client = runner.part("teacher server start", teacher_server)
    if client is None:
        return

    def vllm_data():
        kw = dict(top_k=s["top_k"], sample_temperature=0.6, top_p=0.95, eos_ids=eos, progress=False)
        served_entries(client, data_items[:2], "teacher", max_new_tokens=4, batch_size=2, **kw)  # warm-up
        ctx.reset_peak()
        t0 = time.perf_counter()
        entries = served_entries(client, data_items, "teacher", max_new_tokens=s["new_tokens"],
                                 batch_size=s["data_batch"], **kw)
        secs = time.perf_counter() - t0
        tokens = sum(e.length for e in entries.values())
        runner.rows.append({"part": "teacher data", "key": "data_vllm",
                            "configuration": "vllm: served_entries, teacher server", "tokens": tokens,
                            "seconds": secs, "tokens_per_s": tokens / secs, "peak_gib": ctx.peak_gib(),
                            "note": f"{data_note}; server start {out['server_start_s']['teacher']:.0f} s apart"})
    runner.part("teacher data, vllm", vllm_data)
    if server.client is None:  # its start failed above: not a second try
        runner.skipped.append("on-policy steps, vllm student + teacher server: no student server")
        return
    runner.part("on-policy steps, vllm student + teacher server", lambda: steps_row(
        "steps_vllm_served", "vllm student + vllm teacher (teacher not in this process)", vllm_rollout,
        served_loss(student, client, s["top_k"]), "teacher top-k scores from its server"))
    student.requires_grad_(False).eval()


def _round_up(n: int, block: int = 256) -> int:
    return -(-n // block) * block


def summary(rows: list[dict]) -> dict:
    """Ratios of the measured rows (None where a side is missing)."""
    by = {r["key"]: r for r in rows}

    def get(key, field):
        return by.get(key, {}).get(field)

    def ratio(a, b):
        return a / b if a is not None and b else None

    in_proc, served = get("steps_vllm", "peak_gib"), get("steps_vllm_served", "peak_gib")
    return {"teacher_data_vllm_vs_ours": ratio(get("data_vllm", "tokens_per_s"), get("data_ours", "tokens_per_s")),
            "rollout_vllm_vs_hf": ratio(get("steps_vllm", "tokens_per_s"), get("steps_hf", "tokens_per_s")),
            "step_speedup_vllm_vs_hf": ratio(get("steps_hf", "step_s"), get("steps_vllm", "step_s")),
            "peak_gib_teacher_in_process": in_proc, "peak_gib_teacher_served": served,
            "peak_gib_saved": None if in_proc is None or served is None else in_proc - served}
