"""Several named data streams stepped together: each ``next`` gives ``{name: batch}``.

Multi-stream recipes (Sugar: generative + discriminative data; VladVA: contrastive views + long
captions) draw one batch from every stream per train step; the loss weights set the balance.
The state is the streams' states by name, so a resumed run continues every stream exactly.
"""
from __future__ import annotations

import re
from typing import Iterator, Mapping

from mllm_jax.config.data import STREAM_NAME


class MixtureIterator:
    """Zips named iterators that have grain-style ``get_state()`` / ``set_state()``."""

    def __init__(self, streams: Mapping[str, Iterator]):
        if not streams:
            raise ValueError("MixtureIterator needs at least one stream")
        bad = [n for n in streams if not isinstance(n, str) or not re.fullmatch(STREAM_NAME, n)]
        if bad:
            raise ValueError(f"MixtureIterator: stream names {bad}; expected letters, digits, '_' or '-' "
                             "('/' joins a stream's name to the paths inside its batch)")
        self.streams = dict(streams)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """One batch of every stream. When a stream ends, the streams before it that already gave
        their batch for this step are moved back to where they were, so the state saved after the
        end (the final checkpoint) holds no batch that was drawn and not trained on: a run resumed
        from it with more epochs continues every stream at its first unused batch."""
        out, before = {}, {}
        names = list(self.streams)
        for i, name in enumerate(names):
            it = self.streams[name]
            if i < len(names) - 1 and hasattr(it, "get_state"):
                before[name] = it.get_state()
            try:
                out[name] = next(it)
            except StopIteration:
                for done in out:
                    if done in before:
                        self.streams[done].set_state(before[done])
                raise
        return out

    def seq_lengths(self, batch: dict) -> dict[str, int]:
        """``{stream/path: T}`` over the streams that have ``seq_lengths``."""
        return {f"{name}/{p}" if p else name: t for name, it in self.streams.items() if hasattr(it, "seq_lengths")
                for p, t in it.seq_lengths(batch[name]).items()}

    def pad_seq_lengths(self, batch: dict, lengths: dict[str, int]) -> dict:
        out = dict(batch)
        for name, it in self.streams.items():
            if hasattr(it, "pad_seq_lengths"):
                mine = {p[len(name) + 1:] if p != name else "": t for p, t in lengths.items()
                        if p == name or p.startswith(name + "/")}
                out[name] = it.pad_seq_lengths(batch[name], mine)
        return out

    @property
    def blank_like(self):
        """``blank_like(batch)``: every stream's padding rows. Absent (``hasattr`` is False) unless
        every stream has ``blank_like``, so that evaluation stops when any process's data ends
        instead of the ended process failing alone while the others wait in a collective."""
        if not all(hasattr(it, "blank_like") for it in self.streams.values()):
            raise AttributeError("blank_like: not every stream of this MixtureIterator has blank_like")
        return lambda batch: {name: it.blank_like(batch[name]) for name, it in self.streams.items()}

    def get_state(self) -> dict:
        return {name: it.get_state() for name, it in self.streams.items()}

    def set_state(self, state: dict) -> None:
        missing = set(self.streams) - set(state)
        if missing:
            raise ValueError(f"data state has no entry for streams {sorted(missing)} (has {sorted(state)}): "
                             "the checkpoint was written by a run with other data streams")
        for name, it in self.streams.items():
            it.set_state(state[name])

    def close(self):
        for it in self.streams.values():
            if hasattr(it, "close"):
                it.close()

    @property
    def summaries(self) -> dict:
        return {name: getattr(it, "summaries", []) for name, it in self.streams.items()}


__all__ = ["MixtureIterator"]
