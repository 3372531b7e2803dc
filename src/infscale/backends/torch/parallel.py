"""Who this process is in a model replica (TP rank, PP stage) and the few collectives the model needs.

One replica spans `tp * pp` ranks: global rank = base + stage * tp + tp_rank, so a TP group is a run of
consecutive ranks (on one node: NVLink) and a PP hand-off goes to the rank `tp` further on. With one rank nothing
here touches torch.distributed, so single-process tests need no process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class ParallelError(ValueError):
    """A layout the model cannot be split by (e.g. TP not dividing the heads)."""


@dataclass(frozen=True)
class ParallelContext:
    tp: int = 1
    pp: int = 1
    ep: int = 1                                        # MoE experts split over ep groups of the TP ranks
    tp_rank: int = 0
    pp_rank: int = 0
    base_rank: int = 0                                 # global rank of (stage 0, tp 0) of this replica
    tp_group: dist.ProcessGroup | None = None          # this rank's TP group (None when tp == 1)
    model_group: dist.ProcessGroup | None = None       # every rank of this replica (None when tp * pp == 1)
    # PP hand-off: the 2-rank groups {this rank, the same TP rank of the previous / next stage}. A broadcast in
    # such a group moves the hidden states like a send/recv, and is a collective a CUDA graph captures like the
    # TP all-reduce (the fast decode path runs the whole stage, hand-offs included, as one graph).
    prev_group: dist.ProcessGroup | None = None
    next_group: dist.ProcessGroup | None = None
    # pipelined decode (pp micro-batches): the 2-rank group {first stage, last stage} of this TP rank, on which the
    # last stage hands the sampled tokens back to the first; with next/prev it closes the stages into a ring
    return_group: dist.ProcessGroup | None = None

    @classmethod
    def single(cls) -> ParallelContext:
        return cls()

    @classmethod
    def create(cls, tp: int, pp: int, base_rank: int = 0, ep: int = 1) -> ParallelContext | None:
        """Build the groups of the replica whose ranks are base_rank … base_rank + tp*pp - 1; None on a rank
        outside it. Every rank of the world must call this with the same arguments in the same order
        (torch.distributed requires all ranks to take part in creating every group)."""
        size = tp * pp
        if ep < 1 or tp % ep:
            raise ParallelError(f"ep={ep} must divide tp={tp} (experts are split over groups of the TP ranks)")
        if size == 1:
            return cls()
        if not dist.is_initialized():
            raise ParallelError(f"tp={tp} pp={pp} needs torch.distributed to be initialised (see spawn.py)")
        rank = dist.get_rank()
        tp_group = None
        for stage in range(pp):
            ranks = [base_rank + stage * tp + t for t in range(tp)]
            group = dist.new_group(ranks) if tp > 1 else None
            if rank in ranks:
                tp_group = group
        model_group = dist.new_group(list(range(base_rank, base_rank + size)))
        prev_group = next_group = None
        for stage in range(pp - 1):
            for t in range(tp):
                pair = [base_rank + stage * tp + t, base_rank + (stage + 1) * tp + t]
                group = dist.new_group(pair)
                if rank == pair[0]:
                    next_group = group
                elif rank == pair[1]:
                    prev_group = group
        return_group = None
        if pp > 1:
            for t in range(tp):
                pair = [base_rank + t, base_rank + (pp - 1) * tp + t]
                group = dist.new_group(pair)
                if rank in pair:
                    return_group = group
        local = rank - base_rank
        if not 0 <= local < size:
            return None
        return cls(tp=tp, pp=pp, ep=ep, tp_rank=local % tp, pp_rank=local // tp, base_rank=base_rank,
                   tp_group=tp_group, model_group=model_group, prev_group=prev_group, next_group=next_group,
                   return_group=return_group)

    # ---------------------------------------------------------------------------------------- geometry

    @property
    def size(self) -> int:
        return self.tp * self.pp

    @property
    def rank(self) -> int:
        return self.base_rank + self.pp_rank * self.tp + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_driver(self) -> bool:
        """The rank whose clock is the replica's clock (its durations are broadcast to the others)."""
        return self.pp_rank == 0 and self.tp_rank == 0

    @property
    def expert_group(self) -> int:
        """Which of the ep expert groups this rank serves (TP ranks 0 … tp/ep − 1 serve group 0, and so on)."""
        return self.tp_rank // (self.tp // self.ep)

    @property
    def expert_shard(self) -> tuple[int, int]:
        """(index, count) of this rank's slice of each of its experts' FFN width: tp/ep ranks share a group."""
        shards = self.tp // self.ep
        return self.tp_rank % shards, shards

    def global_rank(self, stage: int, tp_rank: int) -> int:
        return self.base_rank + stage * self.tp + tp_rank

    def stage_layers(self, num_layers: int) -> range:
        """The layers this PP stage runs: contiguous, as even as possible (earlier stages take the extra ones)."""
        if self.pp > num_layers:
            raise ParallelError(f"pp={self.pp} exceeds the model's {num_layers} layers")
        per, extra = divmod(num_layers, self.pp)
        start = self.pp_rank * per + min(self.pp_rank, extra)
        return range(start, start + per + (1 if self.pp_rank < extra else 0))

    # ---------------------------------------------------------------------------------------- collectives

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum the row-parallel partial results over the TP group (in place)."""
        if self.tp > 1:
            dist.all_reduce(tensor, group=self.tp_group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate each TP rank's slice of the last dimension (vocab-parallel logits)."""
        if self.tp == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.tp)]
        dist.all_gather(parts, tensor.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    def send_next(self, tensor: torch.Tensor) -> None:
        """Hand the hidden states to the same TP rank of the next stage."""
        dist.send(tensor.contiguous(), dst=self.global_rank(self.pp_rank + 1, self.tp_rank))

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(tensor, src=self.global_rank(self.pp_rank - 1, self.tp_rank))
        return tensor

    def hand_to_next(self, tensor: torch.Tensor) -> None:
        """send_next as a collective of the 2-rank hand-off group (capturable in a CUDA graph)."""
        dist.broadcast(tensor, src=self.rank, group=self.next_group)

    def take_from_prev(self, tensor: torch.Tensor) -> torch.Tensor:
        """recv_prev into `tensor` (contiguous) as a collective of the 2-rank hand-off group."""
        dist.broadcast(tensor, src=self.global_rank(self.pp_rank - 1, self.tp_rank), group=self.prev_group)
        return tensor

    def ring_exchange(self, send: torch.Tensor | None, recv: torch.Tensor | None) -> None:
        """One tick boundary of the pipelined decode: pass this tick's output on (hidden states to the next
        stage; from the last stage, the sampled tokens back to the first) and take the next tick's input into
        `recv` (hidden states from the previous stage; on the first stage, tokens from the last). Either may be
        None. The two transfers are asynchronous on separate 2-rank groups, issued on every rank in the order of
        the ring's links (link s joins stage s to s + 1): each waits only for a transfer its neighbour has
        already issued, so the ring cannot deadlock even if a device runs them one after the other."""
        last = self.pp - 1
        sends = None
        if send is not None:
            group = self.return_group if self.is_last_stage else self.next_group
            sends = (send, self.rank, group)
        receives = None
        if recv is not None:
            source = self.global_rank(last if self.is_first_stage else self.pp_rank - 1, self.tp_rank)
            receives = (recv, source, self.return_group if self.is_first_stage else self.prev_group)
        # the first stage's send (link 0) precedes its receive (link pp-1); every other stage receives on link
        # s-1 before sending on link s
        order = (sends, receives) if self.is_first_stage else (receives, sends)
        works = [dist.broadcast(tensor, src=src, group=group, async_op=True)
                 for tensor, src, group in (op for op in order if op is not None)]
        for work in works:
            work.wait()

    def broadcast_from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sampled tokens live on the last stage; every stage needs them (stage 0 embeds them next)."""
        if self.pp > 1:
            dist.broadcast(tensor, src=self.global_rank(self.pp - 1, 0), group=self.model_group)
        return tensor

    def broadcast_from_driver(self, tensor: torch.Tensor) -> torch.Tensor:
        """Control values (the driver's measured durations) to every rank of the replica."""
        if self.size > 1:
            dist.broadcast(tensor, src=self.base_rank, group=self.model_group)
        return tensor


def kv_heads_local(num_kv_heads: int, tp: int) -> int:
    """KV heads one TP rank holds: sharded over min(tp, kv_heads) ranks, replicated beyond that."""
    if tp <= num_kv_heads:
        if num_kv_heads % tp:
            raise ParallelError(f"tp={tp} does not divide the {num_kv_heads} KV heads")
        return num_kv_heads // tp
    if tp % num_kv_heads:
        raise ParallelError(f"tp={tp} > {num_kv_heads} KV heads must be a multiple of them")
    return 1


def kv_head_start(num_kv_heads: int, tp: int, tp_rank: int) -> int:
    """First (global) KV head of this TP rank; ranks sharing a replicated head hold the same one."""
    if tp <= num_kv_heads:
        return tp_rank * (num_kv_heads // tp)
    return tp_rank // (tp // num_kv_heads)
