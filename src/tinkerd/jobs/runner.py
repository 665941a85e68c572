"""One start of one job: `python -m tinkerd.jobs.runner --url URL --job ID --dir JOB_DIR` (token in
$TINKERD_JOB_TOKEN), started by `control.jobs.manager`.

Reads the job (`GET /api/v1/jobs/ID`, which also returns its resume state to its runner) and the checked rows,
splits off the held-out rows, plans (`control.jobs.plan`), then trains through the tinker SDK like any script:
evaluate before, every `eval_every` steps and at the end; at every evaluation a state checkpoint (the resume
point) and, when the held-out metric is the best so far, a sampler checkpoint (the result); early stop after
`patience` evaluations without improvement; stop when the budget's steps or minutes are spent or the owner
cancels. Each step it reports progress; the reply says whether to stop. Batches are a pure function of
(seed, step) and rl sampling seeds too, so a resumed job trains on what an uninterrupted one would have.

Exits on its own when its token stops working (the server restarted and started a new runner) or the server that
started it is gone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import traceback
from pathlib import Path

import httpx

from cookbook import common  # noqa: F401  (sets the offline tokenizer defaults before tinker is imported)
import tinker

from tinkerd.control.jobs.plan import batch_indices, held_out_split, make_plan
from tinkerd.jobs.tasks import TASKS

log = logging.getLogger("tinkerd.jobs.runner")


class Stop(Exception):
    """The server no longer knows this runner's token, or the server that started it is gone."""


class Reporter:
    def __init__(self, url: str, job_id: str, token: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"X-API-Key": token}, timeout=60)
        self.job_id, self.parent = job_id, os.getppid()

    def job(self) -> dict:
        return self._check(self.http.get(f"/api/v1/jobs/{self.job_id}"))

    def report(self, **fields) -> dict:
        if os.getppid() != self.parent:
            raise Stop("the server that started this runner is gone")
        return self._check(self.http.post(f"/api/v1/jobs/{self.job_id}/report", json=fields))

    @staticmethod
    def _check(reply: httpx.Response) -> dict:
        if reply.status_code == 401:
            raise Stop("this runner's job token is no longer valid")
        reply.raise_for_status()
        return reply.json()


def hidden_size(tokenizer_id: str) -> int:
    """The base model's hidden size for the learning-rate rule, from its config in the local HF cache."""
    try:
        from transformers import AutoConfig
        return int(AutoConfig.from_pretrained(tokenizer_id).hidden_size)
    except Exception:  # noqa: BLE001  (a model whose config is not cached gets a 2048-wide model's rule)
        return 2048


def run(job: dict, rows: list[dict], service: tinker.ServiceClient, reporter: Reporter) -> None:
    started = time.time()  # the minutes budget counts loading, tokenising and dpo's reference pass too
    hp, resume = job["hyperparameters"], job.get("resume") or {}
    seed = hp.get("seed", 0)
    train_idx, held_idx = held_out_split(len(rows), seed, hp.get("held_out_fraction", 0.10))
    if resume:
        training = service.create_training_client_from_state_with_optimizer(resume["state_path"]).result()
    else:
        training = service.create_lora_training_client(base_model=job["base_model"], rank=hp.get("rank", 16),
                                                       seed=seed, user_metadata={"job": job["id"]}).result()
    tokenizer = training.get_tokenizer()
    state = resume.get("task_state", {})
    task = TASKS[job["kind"]](tokenizer, [rows[i] for i in train_idx], [rows[i] for i in held_idx],
                              plan=resume.get("plan"), state=state, training=training, service=service,
                              grader=job["grader"], base_model=job["base_model"])
    tokens = task.tokens()
    width = hidden_size(training.get_info().model_data.tokenizer_id or job["base_model"])
    plan = resume.get("plan") or make_plan(job["kind"], len(tokens), len(held_idx), sum(tokens) / len(tokens), width,
                                           job["budget"], hp)
    task.plan = plan
    run_id = training.model_id
    progress = {"plan": plan, "metrics": resume.get("metrics", []), "evals": resume.get("evals", {}),
                "phase": "training", "steps": plan["steps"]}
    best = resume.get("best")  # {"step", "value", "sampler_path", "state_path", "metrics"}
    bad_evals, step = resume.get("bad_evals", 0), resume.get("step", 0)
    elapsed0 = resume.get("elapsed_s", 0.0)
    elapsed = lambda: elapsed0 + time.time() - started
    better = (lambda a, b: a < b) if task.better == "lower" else (lambda a, b: a > b)

    def checkpoint(metrics: dict) -> None:
        """An evaluation: resume point always, result when best."""
        nonlocal best, bad_evals
        name = f"{job['id']}-step-{step:05d}"
        state_path = training.save_state(name).result().path
        if best is None or better(metrics[task.metric], best["value"]):
            sampler_path = training.save_weights_for_sampler(name).result().path
            best, bad_evals = {"step": step, "value": metrics[task.metric], "sampler_path": sampler_path,
                               "state_path": state_path, "metrics": metrics}, 0
        else:
            bad_evals += 1
        progress["evals"]["best"] = best
        progress["evals"]["last"] = {"step": step, **metrics}
        reporter.report(model_id=run_id, job_progress={**progress, "step": step, "elapsed_s": elapsed()},
                        job_resume={"state_path": state_path, "step": step, "best": best, "bad_evals": bad_evals,
                                    "elapsed_s": elapsed(), "plan": plan, "metrics": progress["metrics"],
                                    "evals": progress["evals"], "task_state": state},
                        job_result=_result(best, task, "running"))

    if step == 0:
        before = task.evaluate(training)
        progress["evals"]["before"] = before
        progress["metrics"].append({"step": 0, **before, "elapsed_s": round(elapsed(), 1)})
        checkpoint(before)
    stopped, step_seconds, eval_seconds = "steps", 0.0, 0.0
    minutes = job["budget"].get("minutes")
    while step < plan["steps"]:
        if minutes is not None and elapsed() + step_seconds + eval_seconds > 60 * minutes:
            stopped = "minutes"
            break
        t0 = time.time()
        step += 1
        lr = plan["learning_rate"] * (1 - (step - 1) / plan["steps"])
        idx = batch_indices(step, len(tokens), plan["batch_size"], seed)
        extra = {"seed": seed * 1_000_003 + step} if job["kind"] == "rl" else {}
        metrics = {"step": step, **task.step(training, idx, lr, **extra), "lr": lr}
        step_seconds = time.time() - t0
        evaluate = step % plan["eval_every"] == 0 or step == plan["steps"]
        if evaluate:
            t0 = time.time()
            metrics.update(task.evaluate(training))
            eval_seconds = time.time() - t0
        progress["metrics"].append({**metrics, "elapsed_s": round(elapsed(), 1)})
        if evaluate:  # after the row is in `metrics`: the resume state holds every step up to its checkpoint
            checkpoint({k: v for k, v in metrics.items() if k.startswith("held_out")})
        reply = reporter.report(job_progress={**progress, "step": step, "elapsed_s": elapsed()})
        if reply["cancel"]:
            progress.update(phase="done", stopped="cancelled")
            reporter.report(status="cancelled", job_progress={**progress, "step": step, "elapsed_s": elapsed()},
                            job_result=_result(best, task, "cancelled"))
            return
        if bad_evals >= plan["patience"]:
            stopped = "early stop: the held-out metric stopped improving"
            break
    if progress["evals"].get("last", {}).get("step") != step:  # stopped between evaluations
        held = task.evaluate(training)
        if progress["metrics"] and progress["metrics"][-1]["step"] == step:
            progress["metrics"][-1].update(held)
        checkpoint(held)
    progress["evals"]["after"] = progress["evals"]["last"]
    progress.update(phase="done", stopped=stopped)
    reporter.report(status="succeeded", job_progress={**progress, "step": step, "elapsed_s": elapsed()},
                    job_result=_result(best, task, stopped))


def _result(best: dict, task, stopped: str) -> dict:
    return {"sampler_path": best["sampler_path"], "state_path": best["state_path"], "best_step": best["step"],
            "metric": task.metric, "better": task.better, "value": best["value"], "stopped": stopped}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tinkerd.jobs.runner")
    parser.add_argument("--url", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    token = os.environ["TINKERD_JOB_TOKEN"]
    reporter = Reporter(args.url, args.job, token)
    try:
        job = reporter.job()
        rows = json.loads((args.dir / "rows.json").read_text())
        run(job, rows, tinker.ServiceClient(base_url=args.url, api_key=token), reporter)
    except Stop as stop:
        log.info("stopping: %s", stop)
    except Exception as exc:  # noqa: BLE001  (whatever failed, the job's row says so and keeps what it had)
        log.exception("job failed")
        try:
            reporter.report(status="failed", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")
        except (Stop, httpx.HTTPError):
            pass


if __name__ == "__main__":
    main()
