"""Campaigns on a Ray cluster: ``executor="ray"`` (``--executor ray``).

The driver (the process that called ``run_campaign``) plans the trials, evaluates the golden
baseline and every group's clean baseline once, and alone writes ``detail.csv`` and the other
outputs, with the same resume semantics as the local executor.  Workers are Ray actors: each
gets the model, the evaluation batches, the calibration inputs and the baselines once (through
Ray's object store), keeps its weight/activation session open across the chunks of one
(format, name group), and turns chunks of trials into rows.  Every trial's seed comes from its
key, never from scheduling, so the rows are those of the local executor (given the same CPU
thread count: ``threads``, 1 by default, which the local run must match for bit-equal floats).

A worker that dies costs only its unfinished chunk: the chunk goes back to the queue, a new
actor replaces the dead one, and the campaign ends with the rows of an undisturbed run.  A
worker's exception stops the campaign with the key of the trial that raised.  Ctrl-C kills the
actors and leaves the usual resumable folder.  Without ``address`` a local Ray instance is started
(and shut down) by qfi; with it, qfi joins that cluster and ships its own packages and the
plug-in modules the campaign names through Ray's runtime environment.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qfi.errors import QfiError
from qfi.evaluate import Evaluator, _to

log = logging.getLogger("qfi")


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise QfiError(
            "executor 'ray' needs Ray: pip install 'qfi[distributed]' (or pip install ray)"
        ) from e
    return ray


def _cpu(obj: Any) -> Any:
    """``obj`` with every tensor (in dicts, tuples, lists) moved to the CPU, for shipping."""
    return _to(obj, torch.device("cpu"))


def plugin_modules(cfg: Any) -> list[str]:
    """Top-level modules of the ``module:callable`` plug-ins a config names (model, data, metric)."""
    out = []
    for spec in (cfg.model, cfg.data, cfg.calibrate_data, cfg.metric):
        if not isinstance(spec, str):
            continue
        base = spec.split("?", 1)[0]
        if base.count(":") == 1 and not base.startswith(("imagefolder:", "torchvision:")):
            mod = base.split(":")[0].split(".")[0]
            if mod and mod not in ("qfi", "quant_schemes", "torch") and mod not in out:
                out.append(mod)
    return out


def runtime_env(cfg: Any, remote: bool) -> dict[str, Any]:
    """Ray's runtime environment for the workers: the thread policy, the driver's import path
    (a local instance shares this machine's files) and, for a remote cluster, qfi's own packages
    and the plug-in modules as ``py_modules``."""
    env: dict[str, Any] = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    if not remote:
        paths = [p for p in sys.path if p and Path(p).is_dir()]
        env["env_vars"]["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        return env
    import qfi
    import quant_schemes

    mods: list[Any] = [qfi, quant_schemes]
    for name in plugin_modules(cfg):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise QfiError(f"plug-in module {name!r} cannot be found here, so it cannot be shipped to Ray")
        if spec.submodule_search_locations:  # a package: ship its folder
            mods.append(list(spec.submodule_search_locations)[0])
        else:
            raise QfiError(
                f"plug-in module {name!r} is a single file ({spec.origin}); Ray ships packages: put it in "
                "a folder with an __init__.py, or install it on the cluster"
            )
    env["py_modules"] = mods
    return env


class _Worker:
    """One Ray actor: a TrialContext built once, sessions kept open across chunks of a group."""

    def __init__(self, spec: dict[str, Any]) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        torch.set_num_threads(spec["threads"])
        from qfi.allocator import keep_freed_memory
        from qfi.campaign import TrialContext

        keep_freed_memory()  # as the CLI: the worker repeats one forward (QFI_MALLOC=system: off)

        self.device = torch.device("cuda" if spec["gpu"] and torch.cuda.is_available() else "cpu")
        model = spec["model"].to(self.device).eval()
        evaluator = Evaluator.from_batches(spec["batches"], spec["metric"], self.device)
        calib = [_to(x, self.device) for x in spec["calib"]]
        self.ctx = TrialContext(
            spec["cfg"], model, evaluator, calib, spec["shortcut"], spec["golden"], spec["golden_values"]
        )
        self._group: tuple[str, str] | None = None
        self._stack: Any = None
        self._session: Any = None

    def info(self) -> tuple[int, str, str]:
        import socket

        return os.getpid(), socket.gethostname(), str(self.device)

    def _enter(self, group: tuple[str, str]) -> None:
        import contextlib

        if self._group == group:
            return
        self._close()
        self._stack = contextlib.ExitStack()
        self._session = self._stack.enter_context(self.ctx.session(*group))
        self._group = group

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = self._session = self._group = None

    def run(self, group: tuple[str, str], trials: list[Any], clean: Any, base: dict[str, float]) -> tuple:
        t0 = time.perf_counter()
        self._enter(group)
        before = self.ctx.evaluator.calls
        rows = []
        for t in trials:
            try:
                rows.append(self.ctx.row(self._session, t, clean, base))
            except Exception as e:
                key = t.key(self.ctx.cfg.target)
                raise QfiError(f"trial {key} raised {type(e).__name__}: {e}") from e
        return rows, self.ctx.evaluator.calls - before, time.perf_counter() - t0


class RayExecutor:
    """Runs a campaign's trials on Ray actors; see the module docstring.

    ``workers``: actors (default: one per GPU of the cluster when the campaign's device is CUDA,
    else CPUs // ``threads``); ``chunk``: trials per task (default: a group's trials split in
    about four chunks per worker, at most 32); ``after_chunk(executor, chunks_done)`` is called on
    the driver after each finished chunk (tests kill a worker from it)."""

    name = "ray"

    def __init__(
        self,
        workers: int | None = None,
        address: str | None = None,
        threads: int = 1,
        chunk: int | None = None,
        after_chunk: Callable[[RayExecutor, int], None] | None = None,
        max_replacements: int | None = None,
    ) -> None:
        self.workers, self.address, self.threads, self.chunk = workers, address, threads, chunk
        self.after_chunk = after_chunk
        self.max_replacements = max_replacements
        self.actors: list[Any] = []
        self.replaced = 0
        #: timings of the last run (seconds): the workers' start with model and data, the driver's
        #: clean baselines, the time workers spent in chunks, and the whole ``run``
        self.startup_seconds = self.baseline_seconds = self.busy_seconds = self.run_seconds = 0.0
        self._started = False
        self._spec_ref: Any = None
        self._cleans: dict[tuple[str, str], tuple[Any, dict[str, float]]] = {}

    def worker_pids(self) -> list[int]:
        ray = _ray()
        return [ray.get(a.info.remote())[0] for a in self.actors]

    def _chunks(self, groups: list, n_workers: int) -> collections.deque:
        q: collections.deque = collections.deque()
        for key, trials in groups:
            size = self.chunk or max(1, min(32, -(-len(trials) // (4 * n_workers))))
            for i in range(0, len(trials), size):
                q.append((key, trials[i : i + size]))
        return q

    def run(self, ctx: Any, groups: list, emit: Callable[[dict[str, Any]], None]) -> int:
        """Run the trials of ``groups`` on the workers (started on the first call, kept for later
        calls: the waves of a sequentially stopped campaign), ``emit`` each row; returns the
        evaluations the workers ran.  ``close`` stops them."""
        ray = _ray()
        cfg = ctx.cfg
        gpu = ctx.evaluator.device.type == "cuda"
        if not ray.is_initialized():
            self._started = True
            kw: dict[str, Any] = dict(
                include_dashboard=False,
                logging_level=logging.ERROR,
                runtime_env=runtime_env(cfg, remote=self.address is not None),
            )
            if self.address is None:
                cpus = os.cpu_count() or 1
                kw["num_cpus"] = max(cpus, (self.workers or 1) * self.threads)
            else:
                kw["address"] = self.address
            t = time.perf_counter()
            ray.init(**kw)
            log.info("ray started in %.1f s", time.perf_counter() - t)
        try:
            return self._run(ray, ctx, groups, emit, gpu)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill the workers, and shut down the Ray instance this executor started."""
        if not self.actors and not self._started:
            return
        ray = _ray()
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.actors, self._spec_ref, self._cleans = [], None, {}
        if self._started:
            ray.shutdown()
            self._started = False

    def _new_actor(self, ray: Any, spec_ref: Any, gpu: bool) -> Any:
        cls = ray.remote(_Worker)
        opts = {"num_cpus": self.threads, "max_restarts": 0, "max_task_retries": 0}
        if gpu:
            opts["num_gpus"] = 1
        return cls.options(**opts).remote(spec_ref)

    def _run(self, ray: Any, ctx: Any, groups: list, emit: Callable, gpu: bool) -> int:
        t_run = time.perf_counter()
        self.busy_seconds = 0.0
        # clean baselines once, on the driver, which runs no trial: no prefix cache to record
        ctx.prefix = False
        cleans = self._cleans
        for (fmt_name, names), _trials in groups:
            if (fmt_name, names) in cleans:
                continue
            with ctx.session(fmt_name, names) as session:
                clean, base = ctx.clean_baseline(session, fmt_name, names)
            cleans[(fmt_name, names)] = (ray.put(_cpu(clean)), base)
        self.baseline_seconds = time.perf_counter() - t_run
        if self.actors:  # a later wave: the workers are up
            return self._dispatch(ray, groups, emit, gpu, t_run)
        resources = ray.cluster_resources()
        n = self.workers
        if n is None:
            n = int(resources.get("GPU", 0)) if gpu else int(resources.get("CPU", 1)) // self.threads
            n = max(1, n)
        spec = {
            "cfg": ctx.cfg,
            "model": _cpu_model(ctx.model),
            "batches": [_cpu(b) for b in ctx.evaluator.batches],
            "metric": ctx.metric,
            "calib": _cpu(ctx.calib),
            "shortcut": ctx.shortcut,
            "golden": _cpu(ctx.golden),
            "golden_values": ctx.golden_values,
            "threads": self.threads,
            "gpu": gpu,
        }
        t0 = time.perf_counter()
        spec_ref = self._spec_ref = ray.put(spec)
        self.actors = [self._new_actor(ray, spec_ref, gpu) for _ in range(n)]
        infos = ray.get([a.info.remote() for a in self.actors])
        self.startup_seconds = time.perf_counter() - t0  # workers started, model and data shipped
        hosts = collections.Counter(h for _, h, _ in infos)
        where = ", ".join(f"{c} on {h}" for h, c in hosts.items())
        devices = sorted({d for _, _, d in infos})
        print(
            f"ray: {n} worker(s) ({where}), {self.threads} CPU thread(s) each"
            f"{', 1 GPU each' if gpu else ''}, device {', '.join(devices)}",
            file=sys.stderr,
        )
        return self._dispatch(ray, groups, emit, gpu, t_run)

    def _dispatch(self, ray: Any, groups: list, emit: Callable, gpu: bool, t_run: float) -> int:
        n = len(self.actors)
        spec_ref, cleans = self._spec_ref, self._cleans
        limit = self.max_replacements if self.max_replacements is not None else 3 * n
        queue = self._chunks(groups, n)
        idle = list(self.actors)
        inflight: dict[Any, tuple[Any, Any]] = {}
        evaluations = done = 0
        while queue or inflight:
            while idle and queue:
                actor, chunk = idle.pop(), queue.popleft()
                key, trials = chunk
                clean_ref, base = cleans[key]
                inflight[actor.run.remote(key, trials, clean_ref, base)] = (actor, chunk)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            actor, chunk = inflight.pop(ref)
            try:
                rows, evals, busy = ray.get(ref)
            except ray.exceptions.RayActorError:
                self.replaced += 1
                if self.replaced > limit:
                    raise QfiError(
                        f"{self.replaced} Ray workers died; giving up (the folder can be resumed)"
                    ) from None
                log.warning("a Ray worker died; its %d unfinished trial(s) go to another", len(chunk[1]))
                self.actors.remove(actor)
                fresh = self._new_actor(ray, spec_ref, gpu)
                self.actors.append(fresh)
                idle.append(fresh)
                queue.appendleft(chunk)
                continue
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise QfiError(f"a Ray worker failed: {cause}") from None
            for r in rows:
                emit(r)
            evaluations += evals
            self.busy_seconds += busy
            idle.append(actor)
            done += 1
            if self.after_chunk is not None:
                self.after_chunk(self, done)
        self.run_seconds = time.perf_counter() - t_run
        return evaluations


def _cpu_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model as shipped to workers: on the CPU (a copy when it lives on a GPU)."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dev.type == "cpu":
        return model
    import copy

    return copy.deepcopy(model).cpu()
