"""A Streamlit browser session without a browser: the websocket protocol the page itself speaks (BackMsg and
ForwardMsg protobufs), for load benchmarks whose simulated users must not spend the server's CPUs on rendering.

It keeps the latest element at every delta path (dropping what a run did not redraw, as the page does), finds
widgets by their user key, and sends what the page would send for a click or an edit: a `rerun_script` with that
widget's new state (the server keeps every other widget's last value), scoped to the widget's fragment as the
page scopes it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ClientState_pb2 import ClientState
from streamlit.proto.Element_pb2 import Element
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState, WidgetStates

Path = tuple[int, ...]


class StreamlitClient:
    """One browser session: connect, rerun with a widget's new state, wait for the run's end, read the page."""

    def __init__(self, url: str, on_frame: Callable[[bytes, ForwardMsg], None] | None = None) -> None:
        self.url = url.replace("http://", "ws://", 1).rstrip("/") + "/_stcore/stream"
        self.on_frame = on_frame  # every frame, raw and parsed (e.g. to time a waiting note)
        self.elements: dict[Path, tuple[Element, str, int]] = {}  # path -> (element, fragment id, run it came in)
        self.page_script_hash = ""
        self.connections = 0
        self._run = 0  # counts the script runs that began
        self._fragments: set[str] = set()  # the fragments the run going on drew in
        self._ended = asyncio.Event()
        self.ended_at = 0.0
        self._socket: Any = None
        self._reader: asyncio.Task | None = None

    async def connect(self) -> None:
        self._socket = await websockets.connect(self.url, subprotocols=["streamlit"], max_size=None)
        self.connections += 1
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._socket is not None:
            await self._socket.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    # -- asking ----------------------------------------------------------------------------------------------
    async def rerun(self, *states: WidgetState, fragment_id: str = "") -> float:
        """Send what the page sends for an interaction; returns when it was sent (time.monotonic)."""
        message = BackMsg(rerun_script=ClientState(query_string="", widget_states=WidgetStates(widgets=states),
                                                   page_script_hash=self.page_script_hash, fragment_id=fragment_id))
        self._ended.clear()
        sent = time.monotonic()
        await self._socket.send(message.SerializeToString())
        return sent

    async def finished(self, timeout: float) -> float:
        """When the runs asked for since the last `rerun` ended (the last `script_finished` that is not "finished
        early for a rerun")."""
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no answer within {timeout:.0f} s") from None
        return self.ended_at

    async def press(self, key: str) -> float:
        """Click a button (by its user key), scoped to its fragment as the page scopes it; returns when sent."""
        return await self.rerun(self.click(key), fragment_id=self.fragment_of(key))

    async def act(self, state: WidgetState, key: str, timeout: float) -> tuple[float, float]:
        """Change one widget (by its user key) and wait for the answer: (sent, ended)."""
        sent = await self.rerun(state, fragment_id=self.fragment_of(key))
        return sent, await self.finished(timeout)

    # -- widgets -------------------------------------------------------------------------------------------
    def widget(self, key: str) -> tuple[str, Any]:
        """(element kind, its proto) of the widget with this user key, as last drawn."""
        element, _ = self._find(key)
        kind = element.WhichOneof("type")
        return kind, getattr(element, kind)

    def fragment_of(self, key: str) -> str:
        """The fragment a widget was drawn in ("" for none): its interactions rerun only that fragment."""
        return self._find(key)[1]

    def _find(self, key: str) -> tuple[Element, str]:
        for element, fragment, _ in self.elements.values():
            proto = getattr(element, element.WhichOneof("type"))
            if str(getattr(proto, "id", "")).endswith(f"-{key}"):
                return element, fragment
        raise KeyError(f"no widget with key {key!r} on the page")

    def click(self, key: str) -> WidgetState:
        return WidgetState(id=self.widget(key)[1].id, trigger_value=True)

    def number(self, key: str, value: int) -> WidgetState:
        return WidgetState(id=self.widget(key)[1].id, int_value=value)

    def choice(self, key: str, label: str) -> WidgetState:
        _, proto = self.widget(key)
        if label not in proto.options:
            raise KeyError(f"{label!r} is not an option of {key!r}")
        return WidgetState(id=proto.id, string_value=label)

    def edit_rows(self, key_prefix: str, rows: dict[int, dict[str, Any]]) -> tuple[str, WidgetState]:
        """A data editor's edit, as the page sends it: (the editor's key, its state)."""
        for element, _, _ in self.elements.values():
            if element.WhichOneof("type") == "dataframe" and f"-{key_prefix}" in element.dataframe.id:
                proto = element.dataframe
                key = proto.id[proto.id.index(f"-{key_prefix}") + 1:]
                value = {"edited_rows": {str(r): cells for r, cells in rows.items()}, "added_rows": [],
                         "deleted_rows": []}
                return key, WidgetState(id=proto.id, string_value=json.dumps(value))
        raise KeyError(f"no data editor with a key starting {key_prefix!r} on the page")

    # -- reading -------------------------------------------------------------------------------------------
    def texts(self, kind: str) -> list[str]:
        """The text of every element of a kind on the page, in page order ("markdown", "code", "metric", ...)."""
        found = []
        for _, (element, _, _) in sorted(self.elements.items()):
            if element.WhichOneof("type") == kind:
                proto = getattr(element, kind)
                found.append(proto.code_text if kind == "code" else
                             f"{proto.label}\n{proto.body}" if kind == "metric" else getattr(proto, "body", ""))
        return found

    def exceptions(self) -> list[str]:
        """Exception and error boxes on the page (their first line)."""
        found = []
        for element, _, _ in self.elements.values():
            kind = element.WhichOneof("type")
            if kind == "exception":
                found.append(f"{element.exception.type}: {element.exception.message}".splitlines()[0])
            elif kind == "alert" and element.alert.format == element.alert.ERROR:
                found.append(element.alert.body.splitlines()[0])
        return found

    # -- the socket ----------------------------------------------------------------------------------------
    async def _read(self) -> None:
        async for frame in self._socket:
            if isinstance(frame, bytes):
                self._frame(frame)

    def _frame(self, frame: bytes) -> None:
        message = ForwardMsg.FromString(frame)
        kind = message.WhichOneof("type")
        if kind == "new_session":
            self.page_script_hash = message.new_session.page_script_hash
            self._run += 1
            self._fragments = set()
        elif kind == "delta":
            self._delta(tuple(message.metadata.delta_path), message.delta)
        elif kind == "script_finished":
            self._finish(message.script_finished)
        if self.on_frame is not None:
            self.on_frame(frame, message)

    def _delta(self, path: Path, delta: Any) -> None:
        if delta.WhichOneof("type") == "new_element":
            self.elements[path] = (delta.new_element, delta.fragment_id, self._run)
            self._fragments.add(delta.fragment_id)
        elif delta.WhichOneof("type") == "add_block":  # a new container: what was below its path is gone
            for old in [p for p in self.elements if p[:len(path)] == path]:
                del self.elements[old]

    def _finish(self, status: int) -> None:
        if status == ForwardMsg.FINISHED_EARLY_FOR_RERUN:
            return
        if status in (ForwardMsg.FINISHED_SUCCESSFULLY, ForwardMsg.FINISHED_FRAGMENT_RUN_SUCCESSFULLY):
            whole = status == ForwardMsg.FINISHED_SUCCESSFULLY
            stale = [p for p, (_, fragment, run) in self.elements.items()
                     if run != self._run and (whole or fragment in self._fragments)]
            for path in stale:  # not redrawn by a run that drew its part of the page: the page drops it too
                del self.elements[path]
        self.ended_at = time.monotonic()
        self._ended.set()
