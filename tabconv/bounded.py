"""A dict that keeps only its most recently used entries: what every in-memory store of a long-running server
(the explorer serving a class) uses, so that memory stays bounded however long it runs."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class BoundedDict(OrderedDict):
    """At most `limit` entries; reading or writing an entry makes it the most recent, and the least recent goes
    first when a new one would exceed the limit."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        super().__init__()
        self.limit = limit

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __reduce__(self) -> tuple:
        return type(self), (self.limit,), None, None, iter(list(self.items()))
