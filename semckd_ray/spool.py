"""Logging into an MLflow run that loses nothing when the server is down, at any moment.

A training's rank 0 logs through ``SpooledLogger``: every call goes into a queue that a background
thread sends in order, with MLflow's own retries, so the epoch loop never waits for the server.
At each checkpoint, and when the training ends, whatever is still queued is written to the *spool*:
a folder on the storage path, beside the checkpoints (``<storage>/mlflow-spool/<run id>/``), that
outlives the worker, its node and the driver. It is sent again

- by the next worker of the same run (Ray Train restarted it, or ``--resume`` did), which starts
  from what its predecessor left;
- by the driver when the training ends and the server answers, before it closes the run;
- by ``python -m semckd_ray.sync``, which sends every spool it finds and closes each run whose
  training had ended with the status that training ended in.

Every call is idempotent (params and tags set the same values again, an artifact is written to
the same path) except metrics, and those are sent once per step: a logger first asks the server
which epochs the run already has, and a step that is already there, or already queued, is dropped.
So a spool sent twice, or a worker that dies after logging an epoch but before checkpointing it,
logs every epoch exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections import deque
from pathlib import Path
from typing import Any

from semckd_ray import storage

log = logging.getLogger(__name__)

SPOOL_DIR = "mlflow-spool"
# How long a checkpoint waits for the queue to empty before writing what is left to the spool.
CHECKPOINT_WAIT_S = 2.0
# How long the end of a training waits for the next call to go through before spooling the rest: it
# waits as long as the server takes calls (large checkpoint files), and this long when it takes none.
CLOSE_WAIT_S = 10.0
RETRY_PAUSE_S = (1.0, 30.0)  # between two attempts at the queue's head during an outage
STEP_KEY = "epoch"  # the metric whose logged steps say which epochs a run already has


def spool_dir(storage_root: str, run_id: str) -> str:
    return storage.join(storage_root, SPOOL_DIR, run_id)


class SpooledLogger:
    """Logs into one MLflow run from a background thread; see the module's docstring.

    ``spool``: the run's spool folder (``spool_dir``), or ``None`` for a queue kept in memory only.
    ``writer`` names this logger's file in it, so that the loggers of one run (a training's rank 0,
    a sweep trial's mean over its seeds) never overwrite each other.
    """

    def __init__(self, tracking_uri: str, run_id: str, spool: str | None = None, writer: str = "worker"):
        from semckd_ray.tracking import client

        self.run_id = run_id
        self._client = client(tracking_uri)
        self._tracking_uri = tracking_uri
        self._file = storage.join(spool, f"{writer}.json") if spool else None
        self._artifacts = storage.join(spool, "artifacts") if spool else None
        self._queue: deque[dict[str, Any]] = deque()
        self._lock = threading.Condition()
        self._steps: set[int] = set()  # steps sent or queued: never queued again
        self._server_steps: set[int] | None = None  # asked once, before the first send
        self._persisted = False  # the spool file holds (a superset of) the queue
        self._outage_since: float | None = None
        self._closed = False
        self._sent = 0  # calls sent so far
        self._tmp = Path(tempfile.mkdtemp(prefix="semckd-spool-"))
        if self._file:
            self._load()
        self._thread = threading.Thread(target=self._send_loop, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()

    # ---- what the training calls

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step in self._steps:
            return
        self._steps.add(step)
        now = int(time.time() * 1000)
        self._put({"op": "metrics", "step": step, "timestamp": now,
                   "metrics": {k: float(v) for k, v in metrics.items()}})

    def log_params(self, params: dict[str, Any]) -> None:
        from semckd_ray.tracking import params_for_mlflow

        self._put({"op": "params", "params": params_for_mlflow(params)})

    def set_tag(self, key: str, value: Any) -> None:
        from semckd_ray.tracking import redact

        self._put({"op": "tag", "key": key, "value": redact(str(value))})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Log the file ``path``, which must stay where it is until this logger is closed."""
        self._put({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def end(self, status: str, reason: str | None = None) -> None:
        """Record how the training ended: ``sync`` closes the run so if nobody else does."""
        self._put({"op": "end", "status": status, "reason": reason})

    def wait(self, timeout_s: float) -> bool:
        """Wait until everything queued is sent; False once ``timeout_s`` pass without a call sent."""
        deadline, sent = time.monotonic() + timeout_s, self._sent
        with self._lock:
            while self._queue:
                if self._sent != sent:
                    deadline, sent = time.monotonic() + timeout_s, self._sent
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 1.0))
        return True

    def checkpoint(self, timeout_s: float = CHECKPOINT_WAIT_S) -> None:
        """Make what is queued durable: sent, or written to the spool."""
        if not self.wait(timeout_s):
            self.persist()

    def close(self, timeout_s: float = CLOSE_WAIT_S) -> int:
        """Send what is queued (waiting up to ``timeout_s``), spool the rest; returns how many calls are left."""
        sent = self.wait(timeout_s)
        if not sent:
            self.persist()
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            left = len(self._queue)
        if sent:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return left

    # ---- the spool

    def persist(self) -> None:
        """Write the queue to the spool file, copying its artifacts there first."""
        if self._file is None:
            return
        with self._lock:
            calls = list(self._queue)
        for call in calls:
            if call["op"] == "artifact" and not call.get("spooled"):
                target = storage.join(self._artifacts, f"{uuid.uuid4().hex[:8]}-{Path(call['path']).name}")
                storage.upload(call["path"], target)
                call["path"], call["spooled"] = target, True
        self._write(calls)

    def _write(self, calls: list[dict[str, Any]]) -> None:
        from semckd_ray.tracking import redact

        blob = {"run_id": self.run_id, "tracking_uri": redact(self._tracking_uri), "calls": calls}
        storage.write_text(self._file, json.dumps(blob))
        self._persisted = True

    def _load(self) -> None:
        text = storage.read_text(self._file)
        if not text:
            return
        calls = json.loads(text)["calls"]
        for call in calls:
            if call["op"] == "metrics":
                self._steps.add(call["step"])
        self._queue.extend(calls)
        self._persisted = True
        log.info("run %s: %d logging calls left by an earlier worker are sent first", self.run_id, len(calls))

    # ---- the sender

    def _put(self, call: dict[str, Any]) -> None:
        with self._lock:
            self._queue.append(call)
            self._lock.notify_all()

    def _send_loop(self) -> None:
        pause = RETRY_PAUSE_S[0]
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                call = self._queue[0]
            try:
                self._send(call)
            except Exception as exc:  # any store or network error, after MLflow's own retries
                self._note_outage(exc)
                with self._lock:
                    self._lock.wait(pause)
                pause = min(2 * pause, RETRY_PAUSE_S[1])
                continue
            pause = RETRY_PAUSE_S[0]
            with self._lock:
                self._queue.popleft()
                self._sent += 1
                left = list(self._queue)
                self._lock.notify_all()
            if self._outage_since is not None:
                log.warning("MLflow is reachable again; sending what was kept during the outage")
                self._outage_since = None
            if self._persisted:
                self._tidy(left)

    def _tidy(self, left: list[dict[str, Any]]) -> None:
        """The spool file after a send: what is left, or nothing."""
        try:
            if left:
                self._write(left)
            else:
                storage.delete(self._file)
                self._persisted = False
        except Exception as exc:  # the spool is a superset of the queue: sending it again is harmless
            log.debug("could not tidy the spool %s: %s", self._file, exc)

    def _send(self, call: dict[str, Any]) -> None:
        if self._server_steps is None:
            from semckd_ray.tracking import logged_steps

            self._server_steps = logged_steps(self._client, self.run_id, STEP_KEY)
        send_call(self._client, self.run_id, call, self._server_steps, self._tmp)

    def _note_outage(self, exc: Exception) -> None:
        from semckd_ray.tracking import redact

        if self._outage_since is None:
            self._outage_since = time.monotonic()
            warnings.warn(
                f"MLflow logging failed ({type(exc).__name__}: {redact(str(exc))[:200]}); training goes on, and "
                f"what it logs is kept{' in ' + self._file if self._file else ''} until the server is back",
                RuntimeWarning, stacklevel=2,
            )


def send_call(mlflow_client, run_id: str, call: dict[str, Any], server_steps: set[int], tmp: Path) -> None:
    """Send one queued call; a metrics step in ``server_steps`` is skipped, and a sent one added."""
    from mlflow.entities import Metric, Param

    op = call["op"]
    if op == "metrics":
        if call["step"] in server_steps:
            return
        batch = [Metric(k, v, call["timestamp"], call["step"]) for k, v in call["metrics"].items()]
        for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            mlflow_client.log_batch(run_id, metrics=batch[start:start + 1000])
        server_steps.add(call["step"])
    elif op == "params":
        items = [Param(k, v) for k, v in call["params"].items()]
        for start in range(0, len(items), 100):
            mlflow_client.log_batch(run_id, params=items[start:start + 100])
    elif op == "tag":
        mlflow_client.set_tag(run_id, call["key"], call["value"])
    elif op == "artifact":
        path = call["path"]
        if call.get("spooled"):
            local = tmp / Path(path).name.split("-", 1)[1]
            storage.download(path, local)
            path = str(local)
        mlflow_client.log_artifact(run_id, path, call["artifact_path"])
    elif op == "end":
        pass  # read by ``sync``; the driver closes a run itself
    else:
        raise ValueError(f"unknown spooled call {op!r}")


# ------------------------------------------------------------------------------------------
# Sending a spool after the fact: the driver at the end of a training, --resume, and ``sync``


def send_spool(mlflow_client, run_id: str, folder: str) -> tuple[int, dict[str, Any] | None]:
    """Send every call kept in the spool ``folder``; returns (calls sent, how the run ended or None).

    The spool is removed once sent. "How the run ended" is the driver's close record if there is
    one (``close.json``), else the training's own ``end`` call.
    """
    from semckd_ray.tracking import logged_steps

    server_steps = logged_steps(mlflow_client, run_id, STEP_KEY)
    sent, ended = 0, None
    tmp = Path(tempfile.mkdtemp(prefix="semckd-sync-"))
    try:
        for name in storage.list_dir(folder):
            if not name.endswith(".json") or name == "close.json":
                continue
            for call in json.loads(storage.read_text(storage.join(folder, name)))["calls"]:
                send_call(mlflow_client, run_id, call, server_steps, tmp)
                sent += 1
                if call["op"] == "end":
                    ended = {"status": call["status"], "reason": call.get("reason")}
        close = storage.read_text(storage.join(folder, "close.json"))
        if close:
            ended = json.loads(close)
        if ended is not None:
            from semckd_ray.trainer import close_run

            close_run(mlflow_client, run_id, ended["status"], ended.get("reason"))
        storage.delete(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sent, ended


def spool_close(folder: str, status: str, reason: str | None) -> None:
    """The driver could not close the run: keep how it ended for ``sync`` (or a later driver)."""
    from semckd_ray.tracking import redact

    storage.write_text(storage.join(folder, "close.json"),
                       json.dumps({"status": status, "reason": redact(reason) if reason else None}))


def spools(storage_root: str) -> dict[str, str]:
    """Every run's spool folder under ``storage_root``, by run id."""
    root = storage.join(storage_root, SPOOL_DIR)
    return {name: storage.join(root, name) for name in storage.list_dir(root)}
