"""Measured speed of the current configuration on this machine, in its own box apart from the counted FLOPs:
a count says what the tables should save, a timing what this CPU makes of them, and it varies with load."""

from __future__ import annotations

import streamlit as st

from explorer import sweeps
from explorer.workbench import Workbench
from tabconv.latency import Latency
from tabconv.metrics import Metrics

BATCHES = (1, 64)
REPEATS = 20  # a few seconds for ResNet-18 on digits at batch 64 on one core; enough for a stable median


def panel(wb: Workbench, current: Metrics) -> None:
    with st.container(border=True):
        cols = st.columns([1, 1, 2], vertical_alignment="bottom")
        batch = cols[0].radio("Batch size", BATCHES, index=len(BATCHES) - 1, horizontal=True, key="speed_batch",
                              help="Images per forward: 1 is interactive use, 64 batched inference")
        start = cols[1].button("Measure speed", key="run_speed", icon=":material/timer:", width="stretch",
                               help="On this machine's CPU")
        cols[2].caption(f"Times the exact and this tabled network, {REPEATS} runs each, in PyTorch eager on this "
                        "machine's CPU. Unlike the counted FLOPs above, a timing depends on the CPU and on whatever "
                        "else it is running.")
        if start:
            try:
                st.session_state.speed[current.id] = sweeps.speed(wb, current, int(batch), REPEATS)
            except Exception as exc:  # the page survives any failure of the library
                st.error(f"Timing failed: {exc}")
        timed = st.session_state.speed.get(current.id)
        if timed is not None:
            _result(timed)


def _result(timed: Latency) -> None:
    st.markdown(f"**Measured on this machine (median of {timed.repeats} runs, batch {timed.batch}):** "
                f"exact {timed.exact_ms['pytorch']:.2f} ms, tabled {timed.tabled_ms['pytorch']:.2f} ms, "
                f"{timed.ratio():.2f}× — timings vary with load")
    st.caption("The ratio is tabled / exact from the same run (below 1: the tabled network is faster). PyTorch eager, "
               f"{timed.threads} thread(s). Lookups are gathers, bound by memory bandwidth, while the exact layers "
               "run on tuned BLAS kernels, so fewer counted FLOPs need not mean less time.")
