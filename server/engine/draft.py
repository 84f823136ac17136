"""A draft model for speculative decoding: a small model of the same vocabulary that proposes, greedily, the
next few tokens of every slot that speculates (llama-server's ``--model-draft``).

It has its own context with one KV sequence per slot. Before drafting, each sequence is brought in line with
its slot's tokens (cells past the common prefix removed, the missing tokens decoded); then all drafting slots
advance together, one token each per ``llama_decode``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import llama_cpp
import numpy as np

from server.engine.llama import Batch, LlamaContext, LlamaError, LlamaModel
from server.engine.scheduling import common_prefix

log = logging.getLogger(__name__)


def check_same_vocabulary(target: LlamaModel, draft: LlamaModel) -> None:
    """Raise :class:`LlamaError` (one line) unless both models turn the same token ids into the same text."""
    if draft.n_vocab != target.n_vocab:
        raise LlamaError(
            f"the draft model's vocabulary has {draft.n_vocab} tokens and the model's {target.n_vocab}: "
            "a draft model must share the served model's tokenizer")
    if (draft.bos, draft.eos) != (target.bos, target.eos):
        raise LlamaError("the draft model's BOS/EOS tokens differ from the served model's")
    for token in range(target.n_vocab):
        if draft.token_to_piece(token) != target.token_to_piece(token):
            raise LlamaError(f"the draft model's token {token} is {draft.token_to_piece(token)!r}, the served "
                             f"model's {target.token_to_piece(token)!r}: not the same vocabulary")


class DraftModel:
    """Owns the draft model and its context; used by the engine thread only."""

    def __init__(self, path: Path, *, target: LlamaModel, n_slots: int, slot_ctx: int, n_batch: int,
                 n_threads: int) -> None:
        self.model = LlamaModel(path, use_mmap=False)
        try:
            check_same_vocabulary(target, self.model)
            self.ctx = LlamaContext(self.model, n_ctx=slot_ctx * n_slots, n_batch=n_batch, n_seq_max=n_slots,
                                    n_threads=n_threads, n_threads_batch=n_threads)
        except Exception:
            self.model.close()
            raise
        self.slot_ctx = self.ctx.n_ctx_seq
        self._batch = Batch(n_batch)
        self._held: list[list[int]] = [[] for _ in range(n_slots)]  # tokens whose cells each sequence holds

    def forget(self, seq_id: int) -> None:
        self.ctx.seq_rm(seq_id, 0, -1)
        self._held[seq_id].clear()

    def draft(self, wants: dict[int, tuple[list[int], int]]) -> dict[int, list[int]]:
        """For each ``seq_id -> (tokens, k)``: up to ``k`` greedy tokens that follow ``tokens``."""
        wants = {s: (tokens, min(k, self.slot_ctx - len(tokens))) for s, (tokens, k) in wants.items()}
        wants = {s: w for s, w in wants.items() if w[1] > 0 and w[0]}
        if not wants:
            return {}
        self._catch_up({s: tokens for s, (tokens, _) in wants.items()})
        drafts: dict[int, list[int]] = {s: [] for s in wants}
        batch = self._batch
        # The catch-up's last batch holds each sequence's last token with logits, in this order.
        index = {s: i for i, s in enumerate(wants)}
        live = list(wants)
        while live:
            # Every pick is read before the next decode overwrites the logits.
            still = []
            for s in live:
                token = self._argmax(index[s])
                if self.model.is_eog(token):
                    continue
                drafts[s].append(token)
                if len(drafts[s]) < wants[s][1]:
                    still.append(s)
            live = still
            if not live:
                break
            batch.clear()
            for s in live:
                index[s] = batch.add_one(drafts[s][-1], len(self._held[s]), s)
            self._decode(batch)
            for s in live:
                self._held[s].append(drafts[s][-1])
        return drafts

    def _catch_up(self, histories: dict[int, list[int]]) -> None:
        """Make each sequence hold ``tokens``, decoding the last one of each in one final batch, with logits."""
        pending: list[tuple[int, list[int], int]] = []  # (seq, tokens to decode without logits, start position)
        for s, tokens in histories.items():
            held = self._held[s]
            keep = min(common_prefix(held, tokens), len(tokens) - 1)
            if keep < len(held) and not self.ctx.seq_rm(s, keep, -1):
                self.forget(s)
                keep = 0
            del held[keep:]
            if keep < len(tokens) - 1:
                pending.append((s, tokens[keep:-1], keep))
        batch = self._batch
        batch.clear()
        for s, tokens, start in pending:
            done = 0
            while done < len(tokens):
                if batch.free == 0:
                    self._decode(batch)
                    batch.clear()
                chunk = tokens[done:done + batch.free]
                batch.add(chunk, start + done, s, False)
                self._held[s].extend(chunk)
                done += len(chunk)
        if batch.n_tokens:
            self._decode(batch)
        batch.clear()
        for s, tokens in histories.items():
            batch.add_one(tokens[-1], len(self._held[s]), s)
            self._held[s].append(tokens[-1])
        self._decode(batch)

    def _decode(self, batch: Batch) -> None:
        if not self.ctx.decode(batch):  # pragma: no cover - nothing aborts the draft context
            raise LlamaError("the draft model's decode was aborted")

    def _argmax(self, index: int) -> int:
        logits = llama_cpp.llama_get_logits_ith(self.ctx.ptr, index)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.model.n_vocab,))))

    def close(self) -> None:
        self.ctx.close()
        self.model.close()
