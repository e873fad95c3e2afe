"""The evicting KV-cache layer (transformers 5.x `CacheLayerMixin`); policies in policies.py.

One layer keeps, for each batch row and KV head, a fixed number of *slots*: keys, values and
small bookkeeping tensors (absolute position, padding validity, and per policy the H2O score,
the sink flag, the RoPE position). All slot tensors share the layout (batch, kv_heads, capacity,
...). The protocol with the attention (``attention.py``):

1. ``update`` (called by ``LlamaAttention`` through ``Cache.update``) writes the new keys after the
   live slots and returns the live + new keys; it also puts the layer into the attention kwargs.
2. ``prepare`` (called by the hybrid attention) records the new tokens' positions and padding,
   re-rotates for position rolling, and gives the mask for the cached slots.
3. ``finish`` (called by the hybrid attention after SDPA) adds the attention mass each key got
   (h2o) and evicts down to the budget, at prefill and at every decode step.

Eviction keeps the slots of highest *priority* (each policy's ``priority``; padding never wins).
One eviction per decode step frees the victim's slot for the next token (no copy); several
(prefill) gather the kept slots into a right-sized buffer. Slots are not in position order, so
the mask for them comes from ``valid``. Buffer plumbing (beam search, crop) is in ``slots.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from llamahome.errors import CacheError
from llamahome.kvcache.attention import CACHE_HOOK_KWARG
from llamahome.kvcache.budget import Budget
from llamahome.kvcache.slots import (
    INF,
    META_DTYPES,
    SlotPlumbing,
    expand_heads,
    new_token_validity,
    rotate,
)

# A decode token appended to a spare slot, with no padding and nothing pinned: its bookkeeping
# in each buffer a fast_meta policy may hold (pos is the token's position, filled in).
_APPEND_META = {"pos": 0, "valid": True, "score": 0.0, "sink": False}
_APPEND_BUFFERS = frozenset(("keys", "values", *_APPEND_META))


class EvictingLayer(SlotPlumbing, DynamicLayer):
    """Base of the evicting layers; subclasses define `priority` (higher = kept)."""

    policy = "base"
    needs_scores = False
    is_sliding = False  # transformers must size masks from us like a full-attention layer
    is_croppable = False  # evicted tokens cannot come back
    is_compileable = False
    fast_meta = False  # True: a decode token's bookkeeping is pos (+ score, pin) only
    batched_decode = False  # True: all layers' decode victims in one batch (`DecodeGroup`)
    _group: Any = None
    _pending = False  # a decode victim deferred to the group (see `_dead`)
    _meta_ready = False  # the group already wrote the next token's pos and score
    _meta_now = False
    _whole = False  # this step's keys/values are the whole buffers (the fast decode step)

    def __init__(self, budget: Budget, inv_freq: torch.Tensor | None = None, **kwargs: Any) -> None:
        """Create an empty layer.

        Args:
            budget: The slot budget.
            inv_freq: RoPE inverse frequencies; given only when position rolling is on.
            **kwargs: Ignored (transformers passes layer kwargs).
        """
        self._state: dict[str, torch.Tensor] = {}
        super().__init__()
        self.budget = budget
        self.inv_freq = inv_freq
        self.cumulative_length = 0
        self._n = 0  # live slots, equal for every row and head
        self._work: dict[str, torch.Tensor] = {}
        self._in_buffer = False
        self._q = 0
        self._awaiting = False
        self._all_valid = True
        self._pinning = False  # inside a `pinned(cache)` block: new tokens are never evicted
        self._pinned = 0  # pinned slots held (equal for every row and head)
        # Flat index (row, head) of the slot evicted by the last decode step, or None. Slots
        # [0, n] are then in use, one of them dead per row and head: the next decode token is
        # written straight into it, so a decode step moves no slot (see `_compact`).
        self._dead_idx: torch.Tensor | None = None
        self._slot: torch.Tensor | None = None  # where this step's token went (fast path)
        self._fv: dict[str, Any] | None = None  # reusable views of the buffers (`_views`)

    @property
    def _dead(self) -> torch.Tensor | None:
        """The slot evicted by the last decode step (resolving a victim deferred to the group)."""
        if self._pending:
            self._group.resolve()
        return self._dead_idx

    @_dead.setter
    def _dead(self, value: torch.Tensor | None) -> None:
        self._dead_idx = value

    def _live(self, name: str) -> torch.Tensor | None:
        """Return the live slots of buffer `name` (a copy while an eviction is pending)."""
        buf = self._state.get(name)
        if buf is None:
            return None
        if self._dead is None:
            return buf[:, :, : self._n]
        # A pending eviction: gather the live slots, leaving the layout as it is (reading the
        # cache must not change where the next token goes, nor the numerics that follow).
        bsz, kv_heads, n = buf.shape[0], buf.shape[1], self._n
        dead = (self._dead - self._slot_base()).view(bsz, kv_heads, 1)
        slots = torch.arange(n + 1, device=buf.device).expand(bsz, kv_heads, n + 1)
        index = slots[slots != dead].view(bsz, kv_heads, n)
        if buf.dim() == 4:
            index = index[..., None].expand(-1, -1, -1, buf.shape[-1])
        return buf[:, :, : n + 1].gather(2, index)

    # ---- what transformers reads -------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        """Kept keys, (batch, kv_heads, kept, head_dim)."""
        return self._live("keys")

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError("keys of an evicting layer are written through update()")

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        """Kept values, (batch, kv_heads, kept, head_dim)."""
        return self._live("values")

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError("values of an evicting layer are written through update()")

    @property
    def positions(self) -> torch.Tensor | None:
        """Absolute index (0 = first token seen) of each kept slot, (batch, kv_heads, kept)."""
        return self._live("pos")

    @property
    def scores(self) -> torch.Tensor | None:
        """Accumulated attention mass of each kept slot (h2o only), (batch, kv_heads, kept)."""
        return self._live("score")

    @property
    def valid(self) -> torch.Tensor | None:
        """False where a kept slot holds padding, (batch, kv_heads, kept)."""
        return self._live("valid")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Remember device and dtype (buffers are sized on the first real update)."""
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def get_seq_length(self) -> int:
        """Tokens seen so far (not the kept count): transformers derives positions from it."""
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for the mask: kept + new slots; the new ones are exact."""
        return self._n + query_length, self.cumulative_length - self._n

    def get_max_length(self) -> int:
        """No maximum number of tokens (the kept count is bounded, not the tokens seen)."""
        return -1

    def kv_bytes(self) -> int:
        """Bytes held by the key and value buffers (allocated capacity)."""
        return sum(self._state[k].nbytes for k in ("keys", "values") if k in self._state)

    def kept_counts(self) -> tuple[int, int]:
        """(kept, seen): real tokens held and tokens seen, summed over rows and KV heads."""
        valid = self.valid
        if valid is None:
            return 0, 0
        rows_heads = valid.shape[0] * valid.shape[1]
        kept = valid.numel() if self._all_valid else int(valid.sum())
        return kept, rows_heads * self.cumulative_length

    # ---- step protocol -------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys/values after the live slots; return live + new.

        Raises:
            CacheError: If the previous step never reached the hybrid attention.
        """
        if self._awaiting:
            raise CacheError(
                f"cache.policy={self.policy} needs the hybrid attention to evict: load the model "
                "with llamahome.load_model, or call "
                "llamahome.kvcache.attention.enable_hybrid_attention(model) before generating."
            )
        attn_kwargs = kwargs.get("kwargs")
        if not isinstance(attn_kwargs, dict):
            raise CacheError(
                f"cache.policy={self.policy}: this model's attention does not pass its kwargs to "
                "Cache.update (transformers 5.x Llama-style models do); use cache.policy=full."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        attn_kwargs[CACHE_HOOK_KWARG] = self
        self._awaiting = True
        q, n = key_states.shape[-2], self._n
        self._q = q
        if self.cumulative_length == 0:
            self.budget.fix(q)  # ratio basis "sequence" without seq_len: L = the prefill
        self._seen_before = self.cumulative_length
        if self._pinning:
            self._pinned += q
            if self._state and "pin" not in self._state:
                keys = self._state["keys"]
                self._state["pin"] = torch.zeros(
                    keys.shape[:3], dtype=torch.bool, device=keys.device
                )
        self.cumulative_length += q
        if n == 0:
            # Prefill: attend to the new states directly; `finish` stores what is kept.
            self._in_buffer = False
            self._work = {"keys": key_states, "values": value_states}
            return key_states, value_states
        self._in_buffer = True
        state = self._state
        dead = self._dead
        if q == 1 and dead is not None and self.inv_freq is None:
            # Fast decode step: the new token takes the slot the last step evicted.
            slot, self._dead, self._slot = dead, None, dead
            self._meta_now, self._meta_ready = self._meta_ready, False
            fv = self._views()
            dim = key_states.shape[-1]
            fv["keys_flat"].index_copy_(0, slot, key_states.reshape(-1, dim))
            fv["values_flat"].index_copy_(0, slot, value_states.reshape(-1, dim))
            if fv["capacity"] == n + 1:
                # The buffers are exactly the working slots (a fixed budget): no slicing.
                self._work = fv["work"].copy()
                self._whole = True
                return state["keys"], state["values"]
        else:
            self._compact()
            self._slot = None
            self._meta_ready = False
            self._ensure_capacity(n + q)
            # narrow + copy_: two ops (slice assignment also dispatches an alias per call).
            state["keys"].narrow(2, n, q).copy_(key_states)
            state["values"].narrow(2, n, q).copy_(value_states)
        self._whole = False
        self._work = {name: buf.narrow(2, 0, n + q) for name, buf in state.items()}
        return self._work["keys"], self._work["values"]

    def prepare(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Record the new tokens; return query, key and the mask that fits the kept slots."""
        q, n = self._q, self._n
        slot = self._slot
        if slot is not None and attention_mask is None and self.fast_meta:
            # Fast decode step, no padding: the new slot's bookkeeping is a few fills.
            if self._meta_now and not self._pinning and self._all_valid:
                return query, key, None  # the group wrote pos and score; nothing to mask
            fv = self._fv  # made by `update` this step
            if not self._meta_now:  # else the group's eviction wrote pos and score already
                fv["pos_flat"].index_fill_(0, slot, self._seen_before)
                if "score_flat" in fv:
                    fv["score_flat"].index_fill_(0, slot, 0.0)
            if "pin_flat" in fv:
                fv["pin_flat"].index_fill_(0, slot, self._pinning)
            if not self._all_valid:  # no mask: the token is real, but the freed slot was padding
                fv["valid_flat"].index_fill_(0, slot, True)
            return query, key, self._decode_mask(query, n + 1)
        state = self._state
        if (
            slot is None
            and q == 1
            and self._in_buffer
            and attention_mask is None
            and self.fast_meta
            and self.inv_freq is None
            and _APPEND_BUFFERS.issuperset(state)
        ):
            # Append step (under the floor, or a budget not yet full), no padding: slot n gets
            # the bookkeeping `_new_meta` would give it, without building it.
            for name, value in _APPEND_META.items():
                if name in state:
                    state[name].narrow(2, n, 1).fill_(value if name != "pos" else self._seen_before)
            return query, key, self._mask(None, query, 1, n)
        bsz, kv_heads = key.shape[0], key.shape[1]
        new_valid = new_token_validity(attention_mask, q, bsz)
        if new_valid is not None and self._all_valid and not bool(new_valid.all()):
            self._all_valid = False
        meta = self._new_meta(bsz, kv_heads, q, new_valid, position_ids, key.device)
        if slot is not None:
            # Fast decode step: the new token sits in slot `slot` of each row and head.
            for name, t in meta.items():
                flat = self._state[name].view(-1)
                if isinstance(t, torch.Tensor):
                    flat.index_copy_(0, slot, t.reshape(-1))
                elif not (name == "valid" and t is True and self._all_valid):
                    flat.index_fill_(0, slot, t)
            return query, key, self._decode_mask(query, n + 1)
        for name, t in meta.items():
            if self._in_buffer:
                # A python scalar (the usual decode step) is a fill: one op, no temporary.
                slots = self._state[name].narrow(2, n, q)
                if isinstance(t, torch.Tensor):
                    slots.copy_(t)
                else:
                    slots.fill_(t)
            elif isinstance(t, torch.Tensor):
                self._work[name] = t.contiguous()
            else:
                self._work[name] = torch.full(
                    (bsz, kv_heads, q), t, dtype=META_DTYPES[name], device=key.device
                )
        mask = self._mask(attention_mask, query, q, n)
        if self.inv_freq is not None:
            query, key = self._roll(query, key, position_ids, n)
        return query, key, mask

    def finish(self, scores: torch.Tensor | None) -> None:
        """Accumulate `scores` (h2o) and evict down to the budget."""
        self._awaiting = False
        work, n, q = self._work, self._n, self._q
        if scores is not None:
            work["score"] += scores
        seen = self.cumulative_length
        # Pinned tokens are held on top of the budget, which counts the other tokens only.
        target = self.budget.total(seen - self._pinned) + self._pinned
        length = n + q
        if target >= length:
            if self._in_buffer:
                self._n = length
            else:
                self._store(work, torch.arange(length, device=work["pos"].device), length)
        elif self._in_buffer and q == 1 and target == n:
            # The usual decode step: one token in, one out. The victim's slot is only marked
            # dead; the next decode token overwrites it (no slot is moved).
            group = self._group
            if group is None or not group.defer(self, seen):
                victim = self._decode_victim(work, seen)  # (b, kvh)
                self._dead = self._slot_base() + victim.view(-1)
        else:
            keep = self._keep_priority(work, seen).topk(target, dim=-1, sorted=False).indices
            self._store(work, keep.sort(dim=-1).values, target)
        if not self._all_valid:
            # With a dead slot pending it counts too: at worst the mask is built a step longer.
            used = self._n + (self._dead is not None)
            self._all_valid = bool(self._state["valid"][:, :, :used].all())
        self._work = {}
        self._slot = None

    def _compact(self) -> None:
        """Settle a pending eviction: move slot n into the dead slot, so slots [0, n) are live."""
        dead = self._dead
        if dead is None:
            return
        self._dead = None
        n = self._n
        for name, buf in self._state.items():
            if name == "valid" and self._all_valid:
                continue  # all True: moving True over True
            # Buffers are contiguous: flat (b * kvh * capacity) rows. The source slots are
            # copied out first, so nothing reads what is being written.
            src = buf[:, :, n].clone(memory_format=torch.contiguous_format)
            buf.view(-1, *buf.shape[3:]).index_copy_(0, dead, src.view(-1, *buf.shape[3:]))

    def _views(self) -> dict[str, Any]:
        """Return the buffer views a fast decode step uses (made once per allocation)."""
        fv = self._fv
        state = self._state
        if fv is not None and fv["keys"] is state["keys"] and fv["n_buffers"] == len(state):
            return fv
        keys = state["keys"]
        bsz, kv_heads, cap, dim = keys.shape
        fv = {"keys": keys, "capacity": cap, "work": dict(state), "n_buffers": len(state)}
        for name, buf in state.items():
            fv[f"{name}_flat"] = buf.view(-1, dim) if buf.dim() == 4 else buf.view(-1)
        fv["keys_t"] = keys.view(bsz * kv_heads, cap, dim).transpose(1, 2)
        fv["values_rows"] = state["values"].view(bsz * kv_heads, cap, dim)
        if "score" in state:
            fv["score_rows"] = state["score"].view(bsz * kv_heads, 1, cap)
        self._fv = fv
        return fv

    def _decode_mask(self, query: torch.Tensor, slots: int) -> torch.Tensor | None:
        """Mask of a fast decode step's one query over `slots` slots: None unless padding."""
        if self._all_valid:
            return None
        valid = self._state["valid"][:, :, :slots]
        bsz, heads, kv_heads = query.shape[0], query.shape[1], valid.shape[1]
        mask = valid[:, :, None, None, :].expand(bsz, kv_heads, heads // kv_heads, 1, slots)
        return mask.reshape(bsz, heads, 1, slots)

    # ---- policy hooks ----------------------------------------------------------------------
    def _keep_priority(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """`priority`, with pinned slots above everything (they are never evicted)."""
        prio = self.priority(work, seen)
        pin = work.get("pin")
        if pin is not None:
            top = INF if prio.is_floating_point() else torch.iinfo(prio.dtype).max
            prio = prio.masked_fill(pin, top)
        return prio

    def priority(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Keep-priority of each working slot, (batch, kv_heads, slots); higher is kept."""
        raise NotImplementedError

    def _recent_slots(self, seen: int) -> int:
        """The recent window: kept whatever the scores (no `DecodeGroup` victim is taken there)."""
        return self.budget.sizes(seen)[2]

    def _evicts(self) -> bool:
        """Whether this step's `finish` evicts (the working slots exceed the budget)."""
        target = self.budget.total(self.cumulative_length - self._pinned) + self._pinned
        return target < self._n + self._q

    def _decode_victim(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Return the slot a one-in, one-out decode step evicts (lowest priority), (b, kvh)."""
        return self._keep_priority(work, seen).argmin(dim=-1)

    def _new_meta(
        self,
        bsz: int,
        kv_heads: int,
        q: int,
        new_valid: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        device: torch.device,
    ) -> dict[str, torch.Tensor | int | float | bool]:
        """Bookkeeping of the `q` new slots: tensors (batch, kv_heads, q), or scalars if uniform."""
        meta: dict[str, torch.Tensor | int | float | bool] = {}
        if q == 1:
            meta["pos"] = self._seen_before
        else:
            pos = torch.arange(self._seen_before, self._seen_before + q, device=device)
            meta["pos"] = pos[None, None, :].expand(bsz, kv_heads, q)
        meta["valid"] = True if new_valid is None else expand_heads(new_valid, kv_heads)
        if self._pinning or "pin" in self._state:
            meta["pin"] = self._pinning
        if self.inv_freq is not None:
            if position_ids is None:
                position_ids = torch.arange(self._seen_before, self._seen_before + q)[None]
            meta["rope"] = expand_heads(position_ids.to(device), kv_heads).expand(bsz, kv_heads, q)
        return meta

    # ---- internals ---------------------------------------------------------------------
    def _slot_base(self) -> torch.Tensor:
        """Flat index of slot 0 of each (row, head) in the contiguous buffers, cached."""
        keys = self._state["keys"]
        shape = (keys.shape[0], keys.shape[1], keys.shape[2], keys.device)
        if getattr(self, "_base_shape", None) != shape:
            self._base_shape = shape
            self._base = torch.arange(shape[0] * shape[1], device=shape[3]) * shape[2]
        return self._base

    def _slack(self, slots: int) -> int:
        # Ratio budgets grow ~(heavy+recent ratio) slots per token: a 1/64 margin keeps buffer
        # reallocations rare while the held bytes stay within ~2% of the live ones.
        return max(2, slots // 64)

    def _capacity_for(self, slots: int) -> int:
        cap = slots + self._slack(slots)
        if self.budget.max_total is not None:
            # +1: room for the decode token.
            cap = min(cap, self.budget.max_total + self._pinned + 1)
        return max(cap, slots)

    def _ensure_capacity(self, slots: int) -> None:
        self._compact()
        cap = self._state["keys"].shape[2]
        if slots <= cap:
            return
        new_cap = self._capacity_for(slots)
        for name, buf in list(self._state.items()):
            grown = buf.new_empty((*buf.shape[:2], new_cap, *buf.shape[3:]))
            grown[:, :, : self._n] = buf[:, :, : self._n]
            self._state[name] = grown

    def _store(self, work: dict[str, torch.Tensor], index: torch.Tensor, count: int) -> None:
        """Copy the working slots at `index` ((slots,) or (b, kvh, slots)) into fresh buffers."""
        cap = self._capacity_for(count)
        state = {}
        for name, t in work.items():
            buf = t.new_empty((*t.shape[:2], cap, *t.shape[3:]))
            if index.dim() == 1:
                buf[:, :, :count] = t[:, :, index]
            else:
                idx = index if t.dim() == 3 else index[..., None].expand(-1, -1, -1, t.shape[-1])
                buf[:, :, :count] = t.gather(2, idx)
            state[name] = buf
        self._state = state
        self._n = count

    def _mask(
        self, mask: torch.Tensor | None, query: torch.Tensor, q: int, n: int
    ) -> torch.Tensor | None:
        if n == self._seen_before:
            # Nothing evicted yet: the slots are positions 0..n-1 in order, as transformers assumes.
            return mask
        if self._all_valid and q == 1:
            return None  # one new token, every kept slot visible: plain SDPA, GQA-packed
        return self._slot_mask(mask, query, q, n)

    def _slot_mask(
        self, mask: torch.Tensor | None, query: torch.Tensor, q: int, n: int
    ) -> torch.Tensor:
        """The mask over n kept slots (from ``valid``) + the q new tokens (from `mask`)."""
        bsz, heads = query.shape[0], query.shape[1]
        device = query.device
        if mask is None:
            new_block = torch.ones(q, q, dtype=torch.bool, device=device).tril()[None, None]
        else:
            new_block = mask[..., -q:]
            if new_block.dtype != torch.bool:
                new_block = new_block == 0
        if self._all_valid:
            cached = torch.ones(1, 1, q, n, dtype=torch.bool, device=device)
        else:
            valid = self._state["valid"][:, :, :n]
            kv_heads = valid.shape[1]
            cached = valid[:, :, None, None, :].expand(bsz, kv_heads, heads // kv_heads, q, n)
            cached = cached.reshape(bsz, heads, q, n)
        h = max(cached.shape[1], new_block.shape[1])
        return torch.cat((cached.expand(bsz, h, q, n), new_block.expand(bsz, h, q, q)), dim=-1)

    def _roll(
        self, query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor | None, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Position rolling: re-rotate keys (and queries) to their rank among the kept slots."""
        work = self._work
        pos, valid, rope = work["pos"], work["valid"], work["rope"]
        order = pos.argsort(dim=-1)
        rank = valid.gather(-1, order).long().cumsum(-1).sub_(1).clamp_(min=0)
        rolled = torch.empty_like(rank).scatter_(-1, order, rank)
        key = rotate(key, rolled - rope, self.inv_freq)
        groups = query.shape[1] // key.shape[1]
        dq = (rolled[:, :, n:] - rope[:, :, n:]).repeat_interleave(groups, dim=1)
        return rotate(query, dq, self.inv_freq), key


__all__ = ["INF", "META_DTYPES", "EvictingLayer", "expand_heads", "rotate"]
