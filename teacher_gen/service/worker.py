"""The model, loaded once (`ServiceTeacher`), and the thread that runs the queue's jobs on it (`JobRunner`).

Jobs run one after another through `teacher_gen.runner.generate`, handed the loaded model
(`preloaded=`), so each job gets the same capture, resume and bad-input handling as `potstill
generate`. They are not merged into shared batches: bench/serve_load.py --batching measured that a
job boundary costs about 30 ms (tokenizer, store, self-check, writer threads; torch.compile's cache
is kept across jobs), which merging could at most save (see docs/results.md).

Before a job runs, its prompt set and store go through the path policy again (paths.py): files may
have changed since it was accepted, and a restart may have narrowed the roots. The job then runs on
the resolved local paths; a prompt set given by an allowed remote URL is copied into the state
folder first.

Stopping: a cancel (DELETE /jobs/{id}) or a shutdown sets an event that `generate` polls between
batches; what was captured is committed. A cancelled job ends `cancelled`; a job stopped by a
shutdown stays `running` and is resumed first at the next start.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from potstill.store.errors import PotstillError
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.service.jobqueue import Job, JobQueue
from potstill.teacher_gen.service.paths import PathPolicy
from potstill.teacher_gen.service.settings import ServeConfig
from potstill.teacher_gen.service.spec import is_url, job_config

log = logging.getLogger("potstill.serve")

PROGRESS_EVERY_S = 1.0  # how often a running job's progress is written to the database


class ServiceTeacher:
    """The service's teacher: checked before the service listens, loaded once, shared by every job."""

    def __init__(self, settings: ServeConfig) -> None:
        self.settings = settings
        # (each job's top_k is its own: the vLLM capture never asks the engine for log-probs)
        self.config = GenerateConfig(**settings.load_settings(), prompts="-", store="-", progress=False)
        self.model: Any = None  # an HF PreTrainedModel, or a vllm.LLM
        self.device: str | None = None

    def check(self) -> None:
        """Fail in one line, before anything is loaded, when the teacher or its tokenizer cannot be read."""
        from potstill.teacher_gen.model_info import describe_teacher
        from potstill.teacher_gen.runner import load_tokenizer

        self.spec = describe_teacher(self.config)
        self.tokenizer = load_tokenizer(self.config)

    def load(self) -> None:
        if self.config.backend == "vllm":
            from potstill.teacher_gen.vllm_backend import VLLMTeacher, on_cpu

            self.model = VLLMTeacher(self.config, self.spec, self.tokenizer, max_length=None).llm
            self.device = "cpu" if on_cpu() else "cuda"  # where vLLM's platform runs it
            return
        from potstill.teacher_gen.hf_backend import load_model, pick_device

        device = pick_device(self.config.device)
        self.model = load_model(self.config, self.spec).to(device).eval()
        self.device = str(device)


class JobRunner:
    """Takes jobs from the queue, one at a time, and runs them on the loaded teacher."""

    def __init__(self, queue: JobQueue, settings: ServeConfig, policy: PathPolicy, teacher: ServiceTeacher,
                 inputs_dir: str) -> None:
        self.queue = queue
        self.settings = settings
        self.policy = policy
        self.teacher = teacher
        self.inputs_dir = inputs_dir
        self.status = "loading"  # loading | ready | failed
        self.failure: str | None = None
        self.on_fatal: Callable[[str], None] | None = None  # called when the teacher cannot be loaded
        self.current: str | None = None  # id of the running job
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._main, name="potstill-jobs", daemon=True)

    # -- control (called from the API threads and the server) ----------------------------------
    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """A job was queued: look now instead of at the next poll."""
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        if self.current == job_id:
            self._cancel.set()

    def shutdown(self, timeout: float) -> bool:
        """Stop after the current batch; True when the thread ended within `timeout`."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the thread ----------------------------------------------------------------------------
    def _main(self) -> None:
        started = time.perf_counter()
        try:
            self.teacher.load()
        except Exception as e:
            self.status, self.failure = "failed", _reason(e)
            log.error("cannot load the teacher: %s", self.failure)
            if self.on_fatal is not None:
                self.on_fatal(self.failure)
            return
        self.status = "ready"
        log.info("teacher %s loaded on %s in %.1f s", self.settings.teacher, self.teacher.device,
                 time.perf_counter() - started)
        while not self._stop.is_set():
            job = self.queue.claim_next(self.settings.max_crashes)
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        self._cancel.clear()
        self.current = job.id
        try:
            fresh = self.queue.get(job.id)  # a cancel may have landed between the claim and now
            if fresh is not None and fresh.cancel_requested:
                self._cancel.set()
            if self._cancel.is_set():  # cancelled while interrupted (or just claimed): nothing to run
                self.queue.finish(job.id, "cancelled")
                return
            what = "resuming" if job.attempts > 1 else "starting"
            log.info("job %s: %s (attempt %d)", job.id, what, job.attempts)
            self._execute(job)
        except Exception as e:  # the job fails; the service keeps serving
            reason = _reason(e)
            if not isinstance(e, PotstillError):
                log.error("job %s: unexpected error\n%s", job.id, traceback.format_exc())
            log.info("job %s: failed: %s", job.id, reason)
            self.queue.finish(job.id, "failed", error=reason)
        finally:
            self.current = None
            shutil.rmtree(os.path.join(self.inputs_dir, job.id), ignore_errors=True)

    def _execute(self, job: Job) -> None:
        from potstill.teacher_gen.runner import Progress, generate

        if job.teacher != self.settings.teacher:
            raise PotstillError(f"the job was accepted by a service serving {job.teacher}; "
                                f"this one serves {self.settings.teacher}: resubmit it there")
        config = job_config(job.spec, self.settings)
        config.prompts = self.policy.prompts(config.prompts)
        config.store = self.policy.store(config.store)
        if is_url(config.prompts):
            config.prompts = fetch_prompts(config.prompts, os.path.join(self.inputs_dir, job.id))
        tokens_before = job.tokens_done if job.attempts > 1 else 0  # counted by earlier attempts
        last_write = 0.0

        def on_progress(p: Progress) -> None:
            nonlocal last_write
            now = time.monotonic()
            if now - last_write < PROGRESS_EVERY_S and p.records < p.total:
                return
            last_write = now
            rate = p.records / p.seconds if p.seconds > 0 else None
            self.queue.record_progress(job.id, p.already_done + p.records, p.already_done + p.total,
                                       tokens_before + p.tokens, rate)

        # The store's run record names the job and its settings, not the service's own command line.
        summary = generate(config, should_stop=lambda: self._stop.is_set() or self._cancel.is_set(),
                           on_progress=on_progress, preloaded=self.teacher.model,
                           command=["potstill", "serve", f"job {job.id}"])
        records = summary.already_done + summary.records
        tokens = tokens_before + summary.tokens
        if summary.stopped and not self._cancel.is_set():  # shutdown: resume first at the next start
            self.queue.record_progress(job.id, records, records, tokens, None)
            self.queue.mark_stopped_cleanly(job.id)
            log.info("job %s: stopped by the shutdown after %d records; resumes at the next start", job.id, records)
            return
        state = "cancelled" if summary.stopped else "done"
        total = None if summary.stopped else records
        report = summary.to_dict()
        report["errors"] = len(summary.errors)  # the first ones go to input_errors; all are in the store's errors/
        self.queue.finish(job.id, state, summary=report, records_done=records, records_total=total,
                          tokens_done=tokens, input_errors=[str(e) for e in summary.errors])
        log.info("job %s: %s, %d records in the store, %d written by this run", job.id, state, records,
                 summary.records)


def fetch_prompts(url: str, folder: str) -> str:
    """Copy a prompt set named by a remote URL (a file or a saved datasets folder) into `folder`; its local path."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        name = posixpath.basename(path.rstrip("/")) or "prompts"
        local = os.path.join(folder, name)
        os.makedirs(folder, exist_ok=True)
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
        else:
            fs.get(path, local)
    except Exception as e:  # fsspec backends raise their own types: the user needs the reason
        raise PotstillError(f"prompt set {url}: cannot fetch it ({_reason(e)})") from None
    return local


def _reason(e: BaseException) -> str:
    if isinstance(e, PotstillError):
        return str(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
