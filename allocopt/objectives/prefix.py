"""Keep decoder hidden states for prefix reuse in a bounded LRU (the runner lives in ``allocopt.runtime.decoder``).

Two candidates that keep the same experts in every MoE layer before layer j compute identical hidden states at
the input of layer j, so the second one can start there (``DecoderRunner.run(start=j, hidden=state)``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable

from allocopt.runtime.decoder import DecoderRunner, State, state_bytes

__all__ = ["DecoderRunner", "PrefixCache", "State", "state_bytes"]


class PrefixCache:
    """LRU of hidden-state tensors under a byte budget. ``protect`` keeps an entry through eviction until
    ``release()`` (states that later candidates of the current population are known to need)."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.bytes = 0
        self._data: OrderedDict[Hashable, State] = OrderedDict()
        self._protected: set[Hashable] = set()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def get(self, key: Hashable) -> State | None:
        t = self._data.get(key)
        if t is not None:
            self._data.move_to_end(key)
        return t

    def put(self, key: Hashable, value: State, protect: bool = False) -> bool:
        size = state_bytes(value)
        if key in self._data:
            self._data.move_to_end(key)
        else:
            for old in [k for k in self._data if k not in self._protected]:
                if self.bytes + size <= self.budget:
                    break
                self.bytes -= self._drop(old)
            if self.bytes + size > self.budget:
                return False
            self._data[key] = value
            self.bytes += size
        if protect:
            self._protected.add(key)
        return True

    def _drop(self, key: Hashable) -> int:
        return state_bytes(self._data.pop(key))

    def release(self) -> None:
        self._protected.clear()

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._data), "bytes": self.bytes, "budget": self.budget}
