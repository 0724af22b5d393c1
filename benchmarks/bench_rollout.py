"""Generation on our loop (`rollout.engine=hf`) against vLLM (`rollout.engine=vllm`), as a run makes it.

    python benchmarks/bench_rollout.py [--prompts 96] [--max-new-tokens 64] [--steps 6] [--threads 2]
                                       [--json FILE] [--skip-teacher-data] [--skip-steps]
    python benchmarks/bench_rollout.py --target offline:qwen2.5-coder-1.5b --task gsm8k --prompts 16 --skip-steps

Two parts, each configuration in its own subprocess (so peak RSS, ru_maxrss from wait4, is that process's own;
vLLM servers are separate processes and are not counted in it):

1. Teacher data: the demo's teacher samples (the built-in task's first --prompts train prompts, or GSM8K's with
   --task gsm8k; T 0.6, top-p 0.95, up to --max-new-tokens tokens, top-64 log-probs per position) of the
   --target (default the offline SmolLM2 target), built once as a run builds them
   (`TeacherCache.build`, in-process or through a vLLM server). Tokens/s = sampled tokens (EOS included) / the
   build's wall time; the server's start-up is reported apart.
2. On-policy steps: `python run.py stage=train rollout=student train.max_steps=--steps` with the teacher
   in process (hf), with student rollouts on vLLM (weights synced every step), and with the teacher also served
   (`rollout.teacher_location=server`: the training process never loads the teacher). Step times come from the
   run's own per-step metrics (train/step_seconds, train/rollout_seconds, train/sync_seconds), step 0 left out
   (warm-up; with vLLM it starts the student server); the peak RSS is the whole training process's.

Prints a Markdown table (and writes --json). Not a test: timings depend on the machine, so compare rows of one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GSM8K_TRAIN = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"

STEP_ARGS = ["stage=train", "rollout=student", "train.eval_every=0", "compare_untrained=false",
             "rollout.cache_store=false", "logger=csv"]


def run_child(argv: list[str], env: dict[str, str]) -> tuple[int, float, str, str]:
    """Run argv; (return code, peak RSS in MiB of that process alone, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        out.seek(0), err.seek(0)
        return (os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"))


# -- part 1: teacher data (worker)
def teacher_data_worker(engine: str, prompts: int, max_new: int, target_name: str, task_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from distillspec.evaluation import eos_token_ids
    from distillspec.models.loading import resolve_model_path
    from distillspec.rollout.teacher_cache import TeacherCache
    from distillspec.tasks.arithmetic import ArithmeticTask
    from distillspec.tasks.gsm8k import GSM8KTask

    target = resolve_model_path(target_name)
    tok = AutoTokenizer.from_pretrained(target)
    task = GSM8KTask(source="local", train_path=str(GSM8K_TRAIN), path=str(GSM8K_TRAIN)) if task_name == "gsm8k" \
        else ArithmeticTask(num_train=prompts, num_eval=4)
    items = task.encode(task.load("train"), tok, limit=prompts, seed=0)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval() if engine == "hf" else None
    eos = eos_token_ids(tok, SimpleNamespace(generation_config=GenerationConfig.from_pretrained(target)))
    cache = TeacherCache(items, "teacher", top_k=64, temperature=1.0, sample_temperature=0.6, top_p=0.95,
                         max_new_tokens=max_new, eos_ids=eos, pad_id=tok.pad_token_id)
    start = 0.0
    if engine == "hf":
        t0 = time.perf_counter()
        cache.build(model, torch.device("cpu"), seed=0, batch_size=48, progress=False)
        seconds = time.perf_counter() - t0
    else:
        from distillspec.rollout.served_teacher import served_entries
        from distillspec.serving.jobs import default_vllm_python
        from distillspec.serving.server import ManagedServer

        log = Path(tempfile.mkdtemp()) / "teacher-server.log"
        args = ["--dtype", "float32", "--max-model-len", "1024" if task_name == "gsm8k" else "512", "--max-logprobs",
                "64", "--enforce-eager", "--seed", "0"]
        t0 = time.perf_counter()
        with ManagedServer(str(target), python=default_vllm_python(), log=log, args=args) as client:
            start = time.perf_counter() - t0
            t0 = time.perf_counter()
            entries = served_entries(client, items, "teacher", top_k=64, sample_temperature=0.6, top_p=0.95,
                                     max_new_tokens=max_new, eos_ids=eos, batch_size=48, progress=False)
            seconds = time.perf_counter() - t0
        cache.entries = entries  # what TeacherCache.build stores with a served teacher
    tokens = sum(e.length for e in cache.entries.values())
    return {"tokens": tokens, "seconds": seconds, "server_start_s": start}


def teacher_data(engine: str, a, env) -> dict:
    rc, rss, out, err = run_child([sys.executable, __file__, "--worker", engine, "--prompts", str(a.prompts),
                                   "--max-new-tokens", str(a.max_new_tokens), "--target", a.target, "--task", a.task],
                                  env)
    if rc != 0:
        return {"failed": err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"}
    res = json.loads(out.strip().splitlines()[-1])
    return {**res, "tok_s": res["tokens"] / res["seconds"], "rss_mib": rss}


# -- part 2: on-policy steps (run.py)
def steps(label: str, extra: list[str], a, env, root: Path) -> dict:
    run_dir = root / label.replace(" ", "_")
    argv = [sys.executable, "run.py", *STEP_ARGS, f"train.max_steps={a.steps}", f"train.num_train={a.prompts}",
            *extra, f"hydra.run.dir={run_dir}"]
    rc, rss, _, err = run_child(argv, env)
    if rc != 0:
        return {"failed": err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"}
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/step_seconds")]
    def col(k):  # noqa: E306
        return [float(r[k]) for r in rows[1:]]  # step 0 left out: warm-up (and the student server's start)
    tokens = col("train/completion_tokens")
    return {"step_s": statistics.mean(col("train/step_seconds")),
            "rollout_s": statistics.mean(col("train/rollout_seconds")),
            "sync_s": statistics.mean(col("train/sync_seconds")),
            "first_step_s": float(rows[0]["train/step_seconds"]),
            "rollout_tok_s": sum(tokens) / sum(col("train/rollout_seconds")),
            "rss_mib": rss, "steps_timed": len(tokens)}


def table(res: dict) -> str:
    lines = ["| part | configuration | tokens/s | step s (sync s) | first step s | peak RSS of the training process |",
             "|---|---|---:|---:|---:|---:|"]
    for name, r in res.get("teacher_data", {}).items():
        if "failed" in r:
            lines.append(f"| teacher data | {name} | FAILED: {r['failed']} | | | |")
            continue
        start = f" (server start {r['server_start_s']:.0f} s apart)" if r["server_start_s"] else ""
        lines.append(f"| teacher data ({r['tokens']} tokens) | {name}{start} | {r['tok_s']:.0f} | | | "
                     f"{r['rss_mib']:.0f} MiB |")
    for name, r in res.get("steps", {}).items():
        if "failed" in r:
            lines.append(f"| on-policy steps | {name} | FAILED: {r['failed']} | | | |")
            continue
        lines.append(f"| on-policy steps ({r['steps_timed']} timed) | {name} | {r['rollout_tok_s']:.0f} (rollouts) | "
                     f"{r['step_s']:.2f} ({r['sync_s']:.2f}) | {r['first_step_s']:.1f} | {r['rss_mib']:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-teacher-data", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--target", default="offline:smollm2-135m", help="teacher data's model (default: the demo's)")
    ap.add_argument("--task", choices=["arithmetic", "gsm8k"], default="arithmetic",
                    help="teacher data's prompts: the built-in task's, or GSM8K train (../shared/data)")
    ap.add_argument("--worker", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(teacher_data_worker(a.worker, a.prompts, a.max_new_tokens, a.target, a.task)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    from sd_table import cpu_name  # the script's folder is on sys.path

    res: dict = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "target": a.target, "task": a.task,
                 "threads": a.threads, "prompts": a.prompts, "max_new_tokens": a.max_new_tokens}
    try:
        import torch

        if torch.cuda.is_available():
            res["machine"] += ", " + torch.cuda.get_device_name(0)
    except ImportError:
        pass
    if not a.skip_teacher_data:
        res["teacher_data"] = {"hf (our loop)": teacher_data("hf", a, env),
                               "vllm (teacher server)": teacher_data("vllm", a, env)}
    if not a.skip_steps:
        with tempfile.TemporaryDirectory(prefix="bench_rollout_") as root:
            res["steps"] = {
                "hf: student and teacher in process": steps("hf", ["rollout.engine=hf"], a, env, Path(root)),
                "vllm student, teacher in process": steps("vllm", ["rollout.engine=vllm"], a, env, Path(root)),
                "vllm student + teacher server (teacher never loaded)": steps(
                    "vllm_served", ["rollout.engine=vllm", "rollout.teacher_location=server"], a, env, Path(root))}
    print(table(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
