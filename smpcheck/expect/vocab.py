"""A vocabulary resized for fine-tuning: the rows the checkpoint holds, and the rows it does not.

``model.resize_token_embeddings(n)`` (new special tokens, a chat template's tokens, padding the
vocabulary to a multiple of 64) grows or shrinks the input embeddings and an untied output
head along dimension 0 and sets ``config.vocab_size`` to match. The first ``min(old, new)``
rows are still the checkpoint's and are compared with it; the added rows are fresh (their
rule is the resize's, the old rows' mean and covariance by default, not the model's
``_init_weights``), so they are left to ``initialised`` and ``rank_parity``.

A resize is recognised only when both sides say so: ``config.json`` and the running config
name different vocabulary sizes, and the tensor's rows go from one to the other with its other
dimensions unchanged. A config that changed without the tensors, or tensors that changed
without the config, stay the faults they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from smpcheck.shards.selection import Box, Selection


@dataclass(frozen=True)
class VocabResize:
    """``config.json``'s vocabulary size and the running config's."""

    saved: int
    running: int

    @property
    def kept(self) -> int:
        """Rows that still hold the checkpoint's values."""
        return min(self.saved, self.running)

    def covers(self, stored: tuple[int, ...], full: tuple[int, ...]) -> bool:
        """Whether a tensor stored as ``stored`` and held as ``full`` was resized by it."""
        return (len(stored) == len(full) >= 1 and stored[1:] == full[1:]
                and (stored[0], full[0]) == (self.saved, self.running))

    def words(self) -> str:
        change = "grown" if self.running > self.saved else "shrunk"
        return (f"rows [0:{self.kept}) of a vocabulary {change} from {self.saved} to "
                f"{self.running} (resize_token_embeddings)")


def vocab_size(config: Mapping[str, Any]) -> int | None:
    """A config dict's vocabulary size (a multimodal model's text config's when nested)."""
    size = config.get("vocab_size")
    if size is None and isinstance(config.get("text_config"), Mapping):
        size = config["text_config"].get("vocab_size")
    return size if isinstance(size, int) else None


def vocab_resize(saved: Mapping[str, Any], running: Mapping[str, Any]) -> VocabResize | None:
    """The resize between ``config.json`` (``saved``) and the running config, if any."""
    old, new = vocab_size(saved), vocab_size(running)
    return VocabResize(old, new) if old and new and old != new else None


def kept_rows_reader(read: Callable[[Box], torch.Tensor],
                     kept: int) -> Callable[[Box], torch.Tensor]:
    """A box reader for a resized tensor: the checkpoint's rows below ``kept`` and zeros (in
    the file's dtype) for rows the checkpoint does not have; only the first are read."""

    def read_box(box: Box) -> torch.Tensor:
        (start, stop), rest = box[0], box[1:]
        stored = read(((min(start, kept), min(stop, kept)), *rest))  # empty past ``kept``
        if stop <= kept:
            return stored
        added = torch.zeros((stop - max(start, kept), *(b - a for a, b in rest)),
                            dtype=stored.dtype)
        return torch.cat([stored, added])

    return read_box


def kept_mask(selection: Selection, kept: int) -> torch.Tensor:
    """Which elements of the piece ``selection`` names lie in the checkpoint's rows."""

    def mask_box(box: Box) -> torch.Tensor:
        (start, stop), rest = box[0], box[1:]
        rows = torch.arange(start, stop) < kept
        return rows.view(-1, *([1] * len(rest))).expand(stop - start,
                                                         *(b - a for a, b in rest))

    return selection.assemble(mask_box)
