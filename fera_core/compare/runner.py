"""The comparison's runs: fixed data splits, training jobs (in worker processes), scoring, summaries.

Every method is trained on the same training split with the demo's training loop (the shared
training step), seeded alike, so for one seed all methods see the same batches and the same
noise; each method's learning rate is the one of `Settings.lrs` whose samples score best on the
validation split (mean SWD over levels), tried with seed 0; that run is kept as seed 0 and more
seeds are trained at the chosen rate. Every adapter is then sampled from the same seeds for the
new label (scored against held-out target images) and for the base labels (scored against
held-out base images: what adaptation broke).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context

import torch

from ..demo.model import ASSET, DISC, WAVE, load_base, soft_discs, soft_waves, striped_tiles
from ..demo.run import adapt, one_thread, sample
from ..trace import RoutingTrace
from .methods import METHODS, check_equal
from .metrics import SlicedWasserstein, spectrum_distance


@dataclass(frozen=True)
class Settings:
    steps: int  # optimizer steps per run
    batch: int  # images per step, drawn from the training split
    lrs: tuple[float, ...]  # the learning-rate sweep (one value: no sweep)
    seeds: int  # training seeds per method
    samples: int  # images per validation and test set, and samples per label scored against them
    train_images: int  # size of the training split
    sample_steps: int  # Euler steps when sampling
    workers: int = 1  # processes training at once


FULL = Settings(steps=150, batch=16, lrs=(2e-3, 5e-3, 1.25e-2), seeds=3, samples=64, train_images=64,
                sample_steps=20, workers=2)
QUICK = Settings(steps=40, batch=8, lrs=(5e-3,), seeds=2, samples=32, train_images=32, sample_steps=12, workers=2)
DATA_SEED = 1000  # the data splits: the same whatever the run's settings
VAL_SEED, TEST_SEED = 200, 300  # sampling noise: the same for every method and training seed
RETENTION = {"disc": (DISC, soft_discs), "wave": (WAVE, soft_waves)}


def splits(settings: Settings) -> dict[str, torch.Tensor]:
    """Training, validation and test images of the new class, test images of the base classes, and a second
    draw of each test set (for the data's own noise floor); independent generators, fixed seeds."""
    n = settings.samples
    kinds = {"train": (striped_tiles, settings.train_images), "val": (striped_tiles, n), "test": (striped_tiles, n),
             **{f"test {name}": (make, n) for name, (_, make) in RETENTION.items()},
             "again": (striped_tiles, n), **{f"again {name}": (make, n) for name, (_, make) in RETENTION.items()}}
    return {name: make(count, torch.Generator().manual_seed(DATA_SEED + i))
            for i, (name, (make, count)) in enumerate(kinds.items())}


@dataclass(frozen=True)
class Job:
    method: str | None  # None: the base model, not trained
    lr: float
    seed: int
    settings: Settings
    base: str = str(ASSET)
    validate: bool = False  # sample the new label for the validation split (a sweep run)
    test: bool = False  # sample every label for the test sets
    state: dict | None = None  # trained adapter weights to sample (instead of training)


def run_job(job: Job) -> dict:
    """Train (or load) one adapter and sample it; progress output is swallowed (jobs run side by side)."""
    start = time.time()
    s = job.settings
    with one_thread(), contextlib.redirect_stderr(io.StringIO()):
        torch.manual_seed(job.seed)
        adapted = METHODS[job.method or "fera"][1](load_base(job.base))
        out = {"losses": []}
        if job.state is not None:
            adapted.model.adapter.load_state_dict(job.state)
        elif job.method is not None:
            train = splits(s)["train"]
            out["losses"] = adapt(adapted, lambda g: train[torch.randint(len(train), (s.batch,), generator=g)],
                                  s.steps, job.lr, job.seed)
            out["state"] = {k: v.clone() for k, v in adapted.model.adapter.state_dict().items()}
        experts = job.method is not None
        if job.validate:
            out["val"] = sample(adapted.model, s.samples, s.sample_steps, VAL_SEED, experts)
        if job.test:
            trace = RoutingTrace() if experts and adapted.routed else None
            out["test"] = sample(adapted.model, s.samples, s.sample_steps, TEST_SEED, experts, trace)
            out["trace"] = None if trace is None else trace.rows()
            for name, (label, _) in RETENTION.items():
                out[f"test {name}"] = sample(adapted.model, s.samples, s.sample_steps, TEST_SEED + 1 + label, experts,
                                             cond=label)
    out["seconds"] = time.time() - start
    return out


def run_all(jobs: list[Job], workers: int) -> list[dict]:
    if workers <= 1 or len(jobs) <= 1:
        return [run_job(job) for job in jobs]
    # spawn: a fresh interpreter per worker (fork would copy this process's torch thread pools)
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
        return list(pool.map(run_job, jobs))


def router_diagnostics(rows: list[dict]) -> dict:
    """Routing while sampling the new label: mean entropy of the expert weights (in units of log M: 1 is a
    uniform mix), how far the step-mean weight of the most-moving expert travels over the steps (max - min;
    0: the router does not move), and which expert leads in the noisiest and the cleanest third of the steps."""
    trace = RoutingTrace.from_rows(rows)
    m = len(rows[0]["weights"])
    entropy = sum(-sum(w * math.log(w) for w in r["weights"] if w > 0) for r in rows) / len(rows) / math.log(m)
    steps = trace.step_weights()
    spread = max(max(w[k] for _, _, w in steps) - min(w[k] for _, _, w in steps) for k in range(m))
    third = max(len(steps) // 3, 1)

    def lead(part):
        mean = [sum(w[k] for _, _, w in part) / len(part) for k in range(m)]
        return max(range(m), key=mean.__getitem__)
    return {"entropy": entropy, "spread": spread, "lead_high_noise": lead(steps[:third]),
            "lead_low_noise": lead(steps[-third:])}


class Scorer:
    """The metrics of sample sets against the held-out sets (references prepared once)."""

    def __init__(self, data: dict[str, torch.Tensor]):
        self.data = data
        self.swd = {name: SlicedWasserstein(data[name]) for name in ("val", "test", *(f"test {n}" for n in RETENTION))}

    def validation(self, images: torch.Tensor) -> float:
        levels = self.swd["val"](images)
        return sum(levels) / len(levels)

    def test(self, sets: dict[str, torch.Tensor]) -> dict:
        """Target: SWD per level and spectrum distance of the new label's samples; retention: the same,
        averaged over the base labels."""
        retained = [self.swd[f"test {n}"](sets[f"test {n}"]) for n in RETENTION]
        return {"target_swd": self.swd["test"](sets["test"]),
                "target_spectrum": spectrum_distance(sets["test"], self.data["test"]),
                "retention_swd": [sum(level) / len(level) for level in zip(*retained)],
                "retention_spectrum": sum(spectrum_distance(sets[f"test {n}"], self.data[f"test {n}"])
                                          for n in RETENTION) / len(RETENTION)}


def parameter_counts(methods: list[str], base: str) -> dict[str, tuple[int, int]]:
    """(low-rank weights, router weights) each method trains; refused unless the low-rank counts are equal."""
    counts = {m: METHODS[m][1](load_base(base)).counts() for m in methods}
    check_equal(counts)
    return counts


def compare(methods: list[str], settings: Settings, base: str = str(ASSET), log=print) -> tuple[dict, dict, dict]:
    """Sweep, train, sample and score every method (one intra-op thread, as the demo). Returns the results as
    one JSON-able dict, the seed-0 samples of every method and the data splits."""
    with one_thread():
        return _compare(methods, settings, base, log)


def _compare(methods: list[str], settings: Settings, base: str, log) -> tuple[dict, dict, dict]:
    start, load = time.time(), os.getloadavg()
    counts = parameter_counts(methods, base)
    for m in methods:
        log(f"{METHODS[m][0]}: {counts[m][0]} adapter weights + {counts[m][1]} router weights trainable")
    data = splits(settings)
    scorer = Scorer(data)
    sweep = len(settings.lrs) > 1
    first = [Job(m, lr, 0, settings, base, validate=sweep) for m in methods for lr in settings.lrs]
    log(f"training {len(first)} runs (seed 0{', learning-rate sweep' if sweep else ''})")
    first_out = run_all(first, settings.workers)
    chosen, sweep_scores, kept = {}, {}, {}
    for m in methods:
        runs = [(job, out) for job, out in zip(first, first_out) if job.method == m]
        scores = [scorer.validation(out["val"]) for _, out in runs] if sweep else [0.0]
        best = scores.index(min(scores))
        sweep_scores[m] = [[job.lr, score] for (job, _), score in zip(runs, scores)] if sweep else []
        chosen[m], kept[m] = runs[best][0].lr, runs[best][1]
    final = [Job(None, 0.0, 0, settings, base, test=True)]
    final += [Job(m, chosen[m], 0, settings, base, test=True, state=kept[m]["state"]) for m in methods]
    final += [Job(m, chosen[m], seed, settings, base, test=True) for m in methods for seed in range(1, settings.seeds)]
    log(f"training {sum(j.state is None for j in final[1:])} more runs, sampling {len(final)} models")
    final_out = run_all(final, settings.workers)
    runs = []
    for job, out in zip(final, final_out):
        losses = kept[job.method]["losses"] if job.state is not None else out["losses"]
        runs.append({"method": job.method or "base", "seed": job.seed, "lr": job.lr, **scorer.test(out),
                     "loss_start": _mean(losses[:10]), "loss_end": _mean(losses[-10:]),
                     "seconds": out["seconds"] + (kept[job.method]["seconds"] if job.state is not None else 0.0),
                     "router": None if out.get("trace") is None else router_diagnostics(out["trace"])})
    floor = scorer.test({name: data[name.replace("test", "again")] for name in
                         ("test", *(f"test {n}" for n in RETENTION))})
    samples = {job.method or "base": out for job, out in zip(final, final_out) if job.seed == 0}
    return {"settings": asdict(settings), "methods": {m: METHODS[m][0] for m in methods}, "counts": counts,
            "learning_rates": chosen, "sweep": sweep_scores, "runs": runs, "data_floor": floor,
            "seconds": time.time() - start, "load_average": {"start": load, "end": os.getloadavg()},
            "torch": torch.__version__, "cpus": os.cpu_count()}, samples, data


def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


def with_overrides(settings: Settings, **overrides) -> Settings:
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})
