"""Measured wall time of the exact and the tabled network on this machine's CPU (beside the counted FLOPs).

FLOP counts say what a configuration should save; only a timing says whether the lookups beat the multiplies
on a given CPU (gathers are bandwidth-bound, BLAS is not). Both networks run the same input in the same
process, one right after the other: every number is a median over `repeats` runs after `warmup` runs (a median
shrugs off the odd run slowed by other work), and a ratio is tabled / exact from that same run (below 1: tabled
faster), never across runs whose load differed.
PyTorch eager is always timed; onnxruntime too when its sessions (of `tabconv export`'s model.onnx) are given.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from tabconv.export import TabledNetwork
from tabconv.progress import Progress, ProgressEvent, Stage

if TYPE_CHECKING:
    import onnxruntime

    from tabconv.metrics import Metrics
    from tabconv.session import Session

NETWORKS = ("exact", "tabled")
EAGER, ORT = "pytorch", "onnxruntime"


@dataclass(frozen=True)
class Latency:
    """Median milliseconds per forward of one batch, per runtime, for both networks of one run."""

    batch: int
    repeats: int
    warmup: int
    threads: int  # PyTorch's intra-op threads during the run
    exact_ms: Mapping[str, float]  # runtime ('pytorch', 'onnxruntime') -> median ms
    tabled_ms: Mapping[str, float]

    @property
    def runtimes(self) -> tuple[str, ...]:
        return tuple(self.exact_ms)

    def ratio(self, runtime: str = EAGER) -> float:
        """tabled / exact in one runtime: below 1 the tabled network is faster."""
        return self.tabled_ms[runtime] / self.exact_ms[runtime]

    def row(self) -> dict[str, float]:
        """Flat record: '<runtime>_exact_ms', '<runtime>_tabled_ms' per runtime, then '<runtime>_ratio'."""
        row = {f"{runtime}_{name}_ms": getattr(self, f"{name}_ms")[runtime]
               for runtime in self.runtimes for name in NETWORKS}
        row.update({f"{runtime}_ratio": self.ratio(runtime) for runtime in self.runtimes})
        return row


def median_ms(run: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of `run` in milliseconds after `warmup` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def ort_session(data: bytes, threads: int) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session on an ONNX model, with the same thread count as the PyTorch side."""
    import onnxruntime  # imported here: only timing in onnxruntime needs it

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


@torch.inference_mode()
def measure(exact: nn.Module, tabled: nn.Module, x: torch.Tensor, repeats: int, warmup: int = 1,
            runtimes: Mapping[str, onnxruntime.InferenceSession] | None = None,
            layout: torch.memory_format = torch.channels_last, progress: Progress | None = None) -> Latency:
    """Time both eager networks (eval mode, CPU) on the batch `x` and, when `runtimes` maps 'exact' and 'tabled'
    to onnxruntime sessions, those too; `progress` hears of each (runtime, network) timed."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    x_eager = x.contiguous(memory_format=layout)
    runs: list[tuple[str, str, Callable[[], object]]] = [
        (EAGER, name, lambda net=net: net(x_eager)) for name, net in zip(NETWORKS, (exact, tabled), strict=True)]
    if runtimes is not None:
        feed = {"input": x.contiguous().numpy()}
        runs += [(ORT, name, lambda r=runtimes[name]: r.run(None, feed)) for name in NETWORKS]
    times: dict[str, dict[str, float]] = {name: {} for name in NETWORKS}
    for index, (runtime, name, run) in enumerate(runs):
        if progress is not None:
            progress(ProgressEvent(Stage.LATENCY, index, len(runs), f"{name}, {runtime}"))
        times[name][runtime] = median_ms(run, repeats, warmup)
    return Latency(len(x), repeats, warmup, torch.get_num_threads(), times["exact"], times["tabled"])


def images(session: Session, batch: int) -> torch.Tensor:
    """The first `batch` evaluation images (repeated when the set is smaller), normalised, float32, on the CPU."""
    x = session.eval_set.normalize(session.eval_set.images[:batch]).float().cpu()
    return x.repeat(-(-batch // len(x)), *[1] * (x.dim() - 1))[:batch].contiguous()


def measure_configuration(session: Session, metrics: Metrics, batch: int, repeats: int, warmup: int = 1,
                          progress: Progress | None = None) -> Latency:
    """PyTorch eager timing of an evaluated configuration (its built or fine-tuned tables) against the exact
    network, on CPU copies, so the session's own model and device are left as they are."""
    exact, tabled = (TabledNetwork.from_session(session, tables) for tables in ({}, session.quantizers(metrics)))
    return measure(exact.network().to(memory_format=torch.channels_last),
                   tabled.network().to(memory_format=torch.channels_last), images(session, batch), repeats,
                   warmup, progress=progress)
