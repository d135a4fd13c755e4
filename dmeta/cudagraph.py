"""Whole rounds replayed from one CUDA graph (issue 18: a small network's round on a GPU is
hundreds of kernel launches, each costing more host time than its work).

An algorithm's `device_round` is a round as device work alone: t arrives as a 0-d tensor, the
state stays in the same memory, nothing is read back or sent. `GraphedRounds` runs its first
rounds eagerly on a side stream (which also builds what is built once: routes, cuBLAS handles,
a compiled step), captures the next round into a CUDA graph, and from then on sets the round
counter and replays the graph. The random draws of a replay are those of an eager round: they
are keyed by the counter tensor (`dmeta.rng.blocks`), not by numbers frozen into the capture.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

from dmeta import rng
from dmeta.algorithms.base import RoundReport

# Eager rounds before the capture (torch's documentation asks for a few, on a side stream).
WARMUP_ROUNDS = 2


class GraphedRounds:
    """round(t) of `device_round` through one captured CUDA graph (module docstring).

    `fallback`: a capture that fails (an operation that cannot be captured) warns and leaves
    the run eager; without it the failure propagates. `capture_seconds` is how long the
    capture took (None before it).
    """

    def __init__(
        self,
        device_round: Callable[[torch.Tensor], RoundReport],
        device: torch.device,
        fallback: bool,
    ) -> None:
        self.device_round = device_round
        self.counter = torch.zeros((), dtype=torch.int64, device=device)
        self.fallback = fallback
        self.graph: torch.cuda.CUDAGraph | None = None
        self.report: RoundReport | None = None
        self.eager_rounds = 0
        self.failed = False
        self.capture_seconds: float | None = None

    def __call__(self, t: int) -> RoundReport:
        rng.set_counter(self.counter, t)
        if self.graph is None and not self.failed:
            if self.eager_rounds < WARMUP_ROUNDS:
                return self._warm_up()
            self._capture()
        if self.graph is None:
            return self.device_round(self.counter)
        self.graph.replay()
        # The graph's outputs are overwritten by the next replay: the window keeps copies.
        report = self.report
        return RoundReport(
            report.loss_sum.clone(), report.steps, report.gradient_norm.clone(),
            report.comm_bytes.clone(),
        )  # fmt: skip

    def _warm_up(self) -> RoundReport:
        """One eager round on a side stream, as torch asks before a capture."""
        side = torch.cuda.Stream(self.counter.device)
        side.wait_stream(torch.cuda.current_stream(self.counter.device))
        with torch.cuda.stream(side):
            report = self.device_round(self.counter)
        torch.cuda.current_stream(self.counter.device).wait_stream(side)
        self.eager_rounds += 1
        return report

    def _capture(self) -> None:
        """Record one round (nothing runs during a capture; the replay after it does)."""
        began = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.counter.device)
        try:
            with torch.cuda.graph(graph):
                self.report = self.device_round(self.counter)
        except Exception as error:
            # A capture that ends in an error can leave its own stream current.
            torch.cuda.set_stream(stream)
            if not self.fallback:
                raise
            # torch's "operation failed due to a previous error during capture" hides the cause.
            cause = error.__context__ or error
            first_line = (str(cause).strip().splitlines() or [""])[0][:200]
            warnings.warn(
                f"capturing the round as a CUDA graph failed ({type(cause).__name__}: "
                f"{first_line}); runtime.cuda_graph = auto runs it eagerly (set "
                "runtime.cuda_graph=false to skip the attempt)",
                stacklevel=3,
            )
            self.failed = True
            return
        self.graph = graph
        self.capture_seconds = time.perf_counter() - began
