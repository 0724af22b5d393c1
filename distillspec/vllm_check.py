"""Serve a finished run's draft in vLLM and compare vLLM's own acceptance counters with our engine's.

    python -m distillspec.vllm_check outputs/<run>            # or: make vllm-check RUN=outputs/<run>

Runs in the project environment; vLLM runs in the serving environment (`make vllm` -> .venv-vllm, or
--vllm-python / $DISTILLSPEC_VLLM_PYTHON), one process per generation (`distillspec.serving.vllm_runner`).
From the run dir it takes the composed config (run_config.json) and metrics.json: the same eval prompts
(task, chat template, prompt cap, seed, sd.num_eval), sampling (T, top-p), gamma, max_new_tokens, target,
and the draft (`<run>/draft` when the run trained one, else the draft it evaluated).

What it runs:
  ours:  SD in the run's block alignment and in vLLM's (`first_token=prefill`), same seeds as the run; at
         T > 0 also draft = target (every drafted token must be accepted).
  vLLM:  target alone (tokens/s), and the draft with vLLM's default draft sampling; at T > 0 also
         draft_sample_method=probabilistic and, for each mode, draft = target (the self-draft sanity row).
Writes `vllm_metrics.json` and `vllm_check.md` beside metrics.json and logs the table. The comparison and
its conventions are in `distillspec.serving.compare`. Exit 0 when the check ran (disagreements are
flagged in the table, never hidden), 2 when it could not run (no serving env, unfinished run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distillspec import constants as C
from distillspec.errors import ConfigError
from distillspec.serving import compare as cmp

log = logging.getLogger("distillspec")

VLLM_PY_ENV = "DISTILLSPEC_VLLM_PYTHON"
RESULT_FILE = "vllm_metrics.json"
TABLE_FILE = "vllm_check.md"
VLLM_MODES = ("greedy", "probabilistic")  # vLLM 0.32 draft_sample_method values; "greedy" is its default
REPO = Path(__file__).resolve().parent.parent


def default_vllm_python() -> Path:
    env = os.environ.get(VLLM_PY_ENV)
    return Path(env) if env else REPO / ".venv-vllm" / "bin" / "python"


def vllm_command(run_dir: Path) -> str:
    """The line a user types to run this check on `run_dir` (printed at the end of training runs)."""
    return f"make vllm-check RUN={run_dir}"


def serve_command(target_dir: str, draft_dir: str, gamma: int, port: int = 8000) -> str:
    """The `vllm serve` line that serves `draft_dir` as the draft of `target_dir` (serving env's vllm)."""
    spec = json.dumps({"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": int(gamma)})
    return (f".venv-vllm/bin/vllm serve {target_dir} --dtype float32 --max-model-len 1024 --enforce-eager "
            f"--host 127.0.0.1 --port {port} --speculative-config '{spec}'")


@dataclasses.dataclass
class RunInfo:
    run_dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    draft: str   # model name or dir as our loaders take it
    target: str


def load_run(run_dir: Path) -> RunInfo:
    """A finished run's config and metrics; ConfigError naming what is missing."""
    cfg_file, met_file = run_dir / C.RUN_CONFIG_FILE, run_dir / C.METRICS_FILE
    for f in (cfg_file, met_file):
        if not f.is_file():
            raise ConfigError(f"{run_dir} is not a finished run: {f.name} is missing (run `python run.py ...` "
                              "to the end first; the check compares against its evaluation)")
    metrics = json.loads(met_file.read_text())
    if "metrics" not in metrics:
        raise ConfigError(f"{met_file} has no evaluation (stage={metrics.get('stage')!r}); check a run with "
                          "stage=train_eval or stage=eval")
    draft = str(run_dir / "draft") if (run_dir / "draft" / "config.json").is_file() else str(metrics["draft"])
    return RunInfo(run_dir, json.loads(cfg_file.read_text()), metrics, draft, str(metrics["target"]))


def build_specs(info: RunInfo):
    """(task, sd spec, seed, max_new_tokens) of the run, through the same `_target_` nodes as the runner."""
    from omegaconf import OmegaConf

    from distillspec.runner import absolutize, build

    cfg = OmegaConf.create(info.config)
    for key in ("path", "train_path"):
        if cfg.task.get(key) is not None:
            cfg.task[key] = absolutize(cfg.task[key], Path.cwd())
    task, sd = build(cfg.task, "task"), build(cfg.sd, "sd")
    if sd.gamma == "auto":
        sd = dataclasses.replace(sd, gamma=int(info.metrics["metrics"][C.GAMMA]))
    return task, sd, int(cfg.seed), int(sd.max_new_tokens or task.max_new_tokens)


def our_counts(result, gamma: int) -> dict[str, Any]:
    """compare.counts_summary of an SDResult plus tau and E[p(argmax q)]; outputs as token lists."""
    from distillspec.sd.metrics import sd_metrics

    m = sd_metrics(result, gamma)
    # counted from the trace (not rebuilt from the rates): blocks whose k-th drafted token was accepted
    per_pos = result.trace_pos[result.trace_accepted].long().bincount(minlength=gamma)[:gamma].tolist()
    # accepted as vLLM counts them: every verification outcome, also those EOS or the cap then cut
    out = cmp.counts_summary(int(result.num_blocks.sum()), int(result.num_drafted.sum()),
                             int(result.trace_accepted.sum()), per_pos)
    out.update(tau=m[C.BLOCK_EFFICIENCY], alpha_tok=m[C.ALPHA_TOK], num_accepted_emitted=int(result.num_accepted.sum()), alpha_expected=m[C.ALPHA_EXPECTED],
               alpha_greedy_draft=m[C.ALPHA_GREEDY_DRAFT], num_output_tokens=int(result.lengths.sum()),
               outputs=[result.tokens[i, : int(result.lengths[i])].tolist() for i in range(result.lengths.shape[0])])
    return out


def run_ours(draft, target, tokenizer, task, items, sd, max_new: int, seed: int, first_token: str) -> dict:
    """Our SD on the run's prompts (same batches and seeds as its evaluation), rows in item order."""
    from distillspec.evaluation import SDEvaluator, concat_results
    from distillspec.lit.data import prompt_loader

    spec = dataclasses.replace(sd, measure_speedup=False, draft_quality=False, compute_quality=False,
                               speed_warmup=False, first_token=first_token)
    ev = SDEvaluator(draft, target, tokenizer, spec, task, items, max_new, seed)
    outcomes = [ev.evaluate_batch(b, i) for i, b in enumerate(prompt_loader(items, sd.batch_size, tokenizer.pad_token_id))]
    result = concat_results([o.result for o in outcomes])
    order = torch.cat([o.index for o in outcomes]).argsort()
    counts = our_counts(result, sd.gamma)
    counts["outputs"] = [counts["outputs"][int(i)] for i in order]
    return counts


def run_vllm(python: Path, job: dict, workdir: Path, timeout: float) -> dict:
    """One vllm_runner process; its JSON result (RuntimeError with the tail of its log when it fails)."""
    tag = job["tag"]
    job_file, out_file, log_file = (workdir / f"{tag}.{s}" for s in ("job.json", "out.json", "log"))
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
           "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with open(log_file, "w") as logf:
        proc = subprocess.run([str(python), "-m", "distillspec.serving.vllm_runner", str(job_file), str(out_file)],
                              stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=str(REPO))
    if proc.returncode != 0 or not out_file.is_file():
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"vLLM job {tag!r} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    out = json.loads(out_file.read_text())
    log.info("vLLM %s: load %.0f s, generate %.0f s", tag, out["load_s"], time.perf_counter() - t0 - out["load_s"])
    return out


def tie_analysis(target, ids: list[int], ours: list[int], theirs: list[int]) -> dict[str, Any]:
    """At the first differing token: our target's top-2 logit gap there and the two tokens' logits."""
    j = cmp.first_mismatch(ours, theirs)
    if j is None:
        return {}
    prefix = torch.tensor([ids + ours[:j]], device=next(target.parameters()).device)
    with torch.no_grad():
        logits = target(input_ids=prefix).logits[0, -1].float()
    top = logits.topk(2)
    a = ours[j] if j < len(ours) else None
    b = theirs[j] if j < len(theirs) else None
    gap = float(top.values[0] - top.values[1])
    return {"position": j, "ours": a, "vllm": b, "top2_gap": gap,
            "vllm_token_is_our_second": b is not None and int(top.indices[1]) == b,
            "tie": gap < cmp.TIE_LOGIT_GAP and b is not None and int(top.indices[1]) == b}


def _jobs(base: dict, draft_dir: str, target_dir: str, sampled: bool, patch: bool) -> list[dict]:
    jobs = [dict(base, tag="target_only", draft=None),
            dict(base, tag="draft_default", draft=draft_dir, draft_sample_method=None)]
    if sampled:  # vLLM's draft sampling modes matter only at T > 0
        jobs += [dict(base, tag="draft_probabilistic", draft=draft_dir, draft_sample_method="probabilistic")]
        jobs += [dict(base, tag=f"self_{m}", draft=target_dir, draft_sample_method=m) for m in VLLM_MODES]
        if patch:  # the same with vLLM's CPU expand fault patched (distillspec.serving.vllm_cpu_fault)
            jobs += [dict(base, tag=f"{who}_probabilistic_patched", draft=d, draft_sample_method="probabilistic",
                          patch_cpu_expand=True) for who, d in (("self", target_dir), ("draft", draft_dir))]
    return jobs


def mode_rows(ours_aligned: dict, ours_self: dict, vllm: dict[str, dict], gamma: int,
              top_p: float = 1.0) -> list[dict[str, Any]]:
    """T > 0: each vLLM sampling mode's acceptance rate beside what each verification scheme should give.

    standard = our exact rejection sampling (measured: our acceptance rate under vLLM's alignment; 1 for
    draft = target). one-hot = argmax drafts verified with q taken as one-hot: predicted from our
    E[p(argmax q)] at the same positions with i.i.d. acceptance. vLLM's "greedy" mode claims the one-hot
    scheme, its "probabilistic" mode the standard one; the flag compares each with its own claim. vLLM's
    probabilistic q ignores top-p/top-k on the draft side, so at top_p < 1 it is not our q: no flag then.
    """
    rows = []
    for tag, ours, claim in (("draft_default", ours_aligned, "one-hot"),
                             ("draft_probabilistic", ours_aligned, "standard"),
                             ("draft_probabilistic_patched", ours_aligned, "standard"),
                             ("self_greedy", ours_self, "one-hot"), ("self_probabilistic", ours_self, "standard"),
                             ("self_probabilistic_patched", ours_self, "standard")):
        if tag not in vllm:
            continue
        standard, onehot = ours["acceptance_rate"], cmp.iid_rate(ours["alpha_greedy_draft"], gamma)
        observed = vllm[tag]["acceptance_rate"]
        expected = onehot if claim == "one-hot" else (standard if top_p >= 1.0 else math.nan)
        rows.append({"vllm_run": tag, "draft": "target itself" if tag.startswith("self") else "run's draft",
                     "vllm_rate": observed, "standard": standard, "one_hot": onehot, "claims": claim,
                     "expected": expected, "flag": cmp.flag(observed, expected)})
    return rows


def render(res: dict) -> str:
    """vllm_check.md: settings, the side-by-side table, agreement lines, the T > 0 mode table, commands."""
    s, g = res["settings"], res["settings"]["gamma"]
    lines = [f"# vLLM check: {res['run_dir']}", "",
             f"vLLM {res['vllm_version']} ({res['platform']}); {s['num_prompts']} prompts x {s['max_new_tokens']} "
             f"tokens, T {s['temperature']}, top-p {s['top_p']}, γ {g}; draft `{s['draft']}`.", "",
             cmp.markdown_table(("quantity", f"ours (first_token={s['first_token']})", "ours (first_token=prefill, "
                                 "vLLM's alignment)", "vLLM"), res["table"]), ""]
    a = res["agreement"]
    if "identical_rows" in a:
        lines.append(f"- Greedy outputs token-identical to ours: {a['identical_rows']}/{s['num_prompts']} rows "
                     f"(vLLM target-only vs our SD: {a['identical_rows_target_only']}/{s['num_prompts']}).")
        for t in a.get("mismatches", []):
            lines.append(f"  - row {t['row']}: first difference at token {t['position']} (ours {t['ours']}, vLLM "
                         f"{t['vllm']}), our target's top-2 logit gap {t['top2_gap']:.2e}: "
                         + ("a floating-point tie" if t["tie"] else "NOT a tie"))
        d = a["counter_diffs"]
        lines.append("- Counters, vLLM minus ours in vLLM's alignment: " + (
            "all equal (drafts, drafted, accepted, every position)." if a["counters_equal"] else json.dumps(d)))
    lines.append(f"- Mean acceptance length: vLLM {a['vllm_mal']:.3f}, ours {a['ours_mal']:.3f} (relative difference "
                 f"{100 * a['mal_rel_diff']:+.1f} %); largest per-position difference {a['max_pos_diff']:.3f}.")
    lines.append(f"- Our recomputed evaluation matches the run's metrics.json (α_tok): {a['recomputed_matches_run']}.")
    sp = res["speed"]
    lines.append(f"- Throughput (vLLM, CPU, batch of {s['num_prompts']}): target alone {sp['vllm_target_tokens_per_s']:.1f} "
                 f"tok/s, with the draft {sp['vllm_sd_tokens_per_s']:.1f} tok/s: vLLM speedup "
                 f"{sp['vllm_speedup']:.2f}x (ours in metrics.json: "
                 + (f"{sp['ours_speedup']:.2f}x" if sp["ours_speedup"] is not None else "not measured") + ").")
    if res.get("modes"):
        lines += ["", "## T > 0: vLLM's draft sampling modes against exact rejection sampling", "",
                  cmp.markdown_table(("vLLM run", "draft", "vLLM acceptance rate", "standard rejection sampling "
                                      "(ours, exact)", "one-hot q scheme (predicted, i.i.d.)", "mode claims", "flag"),
                                     [(r["vllm_run"], r["draft"], cmp._f(r["vllm_rate"]), cmp._f(r["standard"]),
                                       cmp._f(r["one_hot"]), r["claims"], r["flag"]) for r in res["modes"]]), "",
                  "Standard rejection sampling accepts every drafted token when the draft is the target (p = q). "
                  "A DISAGREES row is vLLM's acceptance falling outside ±"
                  f"{cmp.RATE_TOLERANCE} of the scheme its mode claims; our engine is the exact reference and is "
                  "not tuned toward it. The `_patched` rows rerun vLLM with its CPU fault fixed "
                  "(`distillspec/serving/vllm_cpu_fault.py`: the rejection sampler's per-token temperatures are "
                  "uninitialised memory on the CPU build), which is the diagnosis: see docs/serving.md."
                  + (" At top-p < 1 vLLM's probabilistic q has no top-p (ours has), so those rows have no "
                     "expected value." if s["top_p"] < 1.0 else "")]
    lines += ["", "## Commands", "", "```bash", res["commands"]["check"], res["commands"]["serve"], "```", ""]
    return "\n".join(lines)


def check(run_dir: Path, python: Path, timeout: float = 1800.0, patch: bool = True) -> dict[str, Any]:
    """Run the check on a finished run dir; returns (and writes) vllm_metrics.json's content."""
    from distillspec.evaluation import eos_token_ids
    from distillspec.models.loading import load_model, load_tokenizer, resolve_model_path
    from distillspec.jsonio import write_json_atomic

    if not python.is_file():
        raise ConfigError(f"no serving environment at {python}: run `make vllm` first (or set {VLLM_PY_ENV})")
    info = load_run(run_dir)
    task, sd, seed, max_new = build_specs(info)
    target_dir, draft_dir = resolve_model_path(info.target), resolve_model_path(info.draft)
    tokenizer = load_tokenizer(info.target)
    items = task.encode(task.load("eval"), tokenizer, limit=sd.num_eval, seed=seed)
    target = load_model(info.target, dtype="float32").eval()
    draft = load_model(info.draft, dtype="float32").eval()
    sampled = sd.temperature > 0
    ours = {"run": run_ours(draft, target, tokenizer, task, items, sd, max_new, seed, sd.first_token),
            "aligned": run_ours(draft, target, tokenizer, task, items, sd, max_new, seed, "prefill")}
    if sampled:
        ours["self"] = run_ours(target, target, tokenizer, task, items, sd, max_new, seed, "prefill")
    prompts = [list(map(int, it.input_ids)) for it in items]
    base = {"target": target_dir, "gamma": sd.gamma, "prompts": prompts, "temperature": sd.temperature,
            "top_p": sd.top_p, "max_tokens": max_new, "seed": seed if sampled else None,
            "stop_token_ids": eos_token_ids(tokenizer, target), "dtype": "float32", "warmup_tokens": 8,
            "max_model_len": max(1024, max(map(len, prompts)) + max_new + sd.gamma + 16)}
    vllm_raw: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vllm_check_") as tmp:
        for job in _jobs(base, draft_dir, target_dir, sampled, patch and not torch.cuda.is_available()):
            vllm_raw[job["tag"]] = run_vllm(python, job, Path(tmp), timeout)
    vllm = {k: cmp.vllm_summary(v) for k, v in vllm_raw.items()}
    g = sd.gamma
    v, o_al = vllm["draft_default"], ours["aligned"]
    agreement: dict[str, Any] = {
        "vllm_mal": v["mean_acceptance_length"], "ours_mal": o_al["mean_acceptance_length"],
        "mal_rel_diff": v["mean_acceptance_length"] / o_al["mean_acceptance_length"] - 1.0,
        "max_pos_diff": max((abs(x - y) for x, y in zip(v["per_position"], o_al["per_position"])), default=0.0),
        "recomputed_matches_run": bool(math.isclose(ours["run"]["alpha_tok"],
                                                    info.metrics["metrics"][C.ALPHA_TOK], abs_tol=1e-9))}
    if not sampled:
        same = cmp.identical_rows(o_al["outputs"], vllm_raw["draft_default"]["outputs"])
        agreement["identical_rows"] = sum(same)
        agreement["identical_rows_target_only"] = sum(cmp.identical_rows(o_al["outputs"],
                                                                        vllm_raw["target_only"]["outputs"]))
        agreement["mismatches"] = [dict(row=i, **tie_analysis(target, prompts[i], o_al["outputs"][i],
                                                              vllm_raw["draft_default"]["outputs"][i]))
                                   for i, ok in enumerate(same) if not ok]
        agreement["counter_diffs"] = cmp.exact_counter_diffs(o_al, v)
        d = agreement["counter_diffs"]
        agreement["counters_equal"] = not any(d[k] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")) \
            and not any(d["per_position"])
    speed = {"vllm_target_tokens_per_s": vllm["target_only"]["tokens_per_s"],
             "vllm_sd_tokens_per_s": v["tokens_per_s"],
             "vllm_speedup": v["tokens_per_s"] / vllm["target_only"]["tokens_per_s"],
             "ours_speedup": info.metrics["metrics"].get(C.SPEEDUP)}
    strip = lambda d: {k: x for k, x in d.items() if k != "outputs"}  # noqa: E731
    res = {"run_dir": str(run_dir), "vllm_version": vllm_raw["target_only"]["vllm_version"],
           "platform": "CUDA" if torch.cuda.is_available() else "CPU",
           "settings": {"temperature": sd.temperature, "top_p": sd.top_p, "gamma": g, "max_new_tokens": max_new,
                        "num_prompts": len(items), "seed": seed, "first_token": sd.first_token,
                        "target": target_dir, "draft": draft_dir},
           "ours": {k: strip(x) for k, x in ours.items()}, "vllm": vllm,
           "vllm_load_s": {k: x["load_s"] for k, x in vllm_raw.items()},
           "table": cmp.side_by_side(ours["run"], o_al, v, g), "agreement": agreement, "speed": speed,
           "modes": mode_rows(o_al, ours.get("self", {}), vllm, g, sd.top_p) if sampled else [],
           "outputs": {"ours_aligned": o_al["outputs"], **{k: x["outputs"] for k, x in vllm_raw.items()}},
           "commands": {"check": vllm_command(run_dir), "serve": serve_command(target_dir, draft_dir, g)}}
    write_json_atomic(run_dir / RESULT_FILE, res)
    (run_dir / TABLE_FILE).write_text(render(res))
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run: outputs/<name>/<overrides>")
    parser.add_argument("--vllm-python", type=Path, default=None,
                        help=f"python of the serving env (default ${VLLM_PY_ENV} or .venv-vllm/bin/python)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per vLLM process")
    parser.add_argument("--no-patched", action="store_true",
                        help="skip the rows that rerun vLLM with its CPU T > 0 fault patched")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        res = check(args.run_dir, args.vllm_python or default_vllm_python(), args.timeout, not args.no_patched)
    except ConfigError as exc:
        print(f"vllm-check: {exc}", file=sys.stderr)
        return 2
    print(render(res))
    print(f"wrote {args.run_dir / RESULT_FILE} and {args.run_dir / TABLE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
