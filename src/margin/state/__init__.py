"""Shared counters for budgets and rate limits: in-process or Redis, one protocol."""

from margin.state.base import State, StateUnavailable
from margin.state.memory import MemoryState


def make_state(url: str) -> State:
    """`memory` for one replica, or a redis:// URL shared by every replica."""
    if url == "memory":
        return MemoryState()
    from margin.state.redis import RedisState

    state: State = RedisState(url)
    return state


__all__ = ["MemoryState", "State", "StateUnavailable", "make_state"]
