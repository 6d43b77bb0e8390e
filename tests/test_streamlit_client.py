"""bench/streamlit_client.py against the real server: the load benchmark's browser-less students see and change the
page as a browser does (the same websocket messages), so its numbers are about the explorer, not the client."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from bench.streamlit_client import StreamlitClient
from tests.browser_helpers import start_server, stop_server

TIMEOUT_S = 600  # the first run builds every table and the heatmap


def _current(client: StreamlitClient) -> str:
    return next(text for text in client.texts("markdown") if text.startswith("**Current configuration"))


def _layers(client: StreamlitClient) -> dict:
    return next(json.loads(t) for t in client.texts("code") if t.startswith("{") and '"layers"' in t)["layers"]


async def _drive(url: str) -> None:
    first, second = StreamlitClient(url), StreamlitClient(url)
    await first.connect()
    await first.rerun()
    await first.finished(TIMEOUT_S)
    assert "start: every layer tabled" in _current(first) and not first.exceptions()
    key, state = first.edit_rows("editor-", {20: {"table": False}})  # the per-layer table's fc row
    sent, ended = await first.act(state, key, TIMEOUT_S)
    assert ended > sent and "fc → exact" in _current(first)
    assert _layers(first)["fc"]["mode"] == "exact" and _layers(first)["conv1"]["mode"] == "table"
    await first.act(first.choice("group_target", "layer4.1.conv2"), "group_target", TIMEOUT_S)
    await first.act(first.click("group_exact"), "group_exact", TIMEOUT_S)
    assert "layer4.1.conv2 → exact" in _current(first)
    await second.connect()
    await second.rerun()
    await second.finished(TIMEOUT_S)
    assert "start: every layer tabled" in _current(second)  # its own view, not the first client's
    assert _layers(second)["fc"]["mode"] == "table"
    await first.close()
    await second.close()


def test_a_websocket_client_opens_the_page_and_edits_it_like_a_browser(explorer_env: dict[str, str],
                                                                       tmp_path: Path) -> None:
    env = {**os.environ, **explorer_env, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with (tmp_path / "streamlit.log").open("w") as log:
        process, url = start_server(env, log)
        try:
            asyncio.run(_drive(url))
        finally:
            stop_server(process)
