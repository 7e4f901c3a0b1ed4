"""TPComm: one tensor-parallel group's collectives, on torch.distributed process groups.

No default (global) process group is used: each engine builds its own groups on its own
TCP store, so several TP engines can live in one process. Two groups, as in SGLang:

- ``cpu``: gloo, for the per-step batch metadata rank 0 broadcasts (plain host lists, pickled)
  and for small host-side agreements (the KV pool size);
- ``dev``: NCCL on CUDA (capturable in CUDA graphs), the same gloo group on CPU — the
  all-reduces after attention and the MLP, the vocab-parallel embedding's sum and the LM
  head's all-gather.
"""

from __future__ import annotations

import datetime
import pickle

import torch
import torch.distributed as dist

_HEAD = 16384  # bytes broadcast in the first message of a step; larger payloads take a second one


class TPComm:
    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device,
                 timeout: datetime.timedelta) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.cpu = dist.ProcessGroupGloo(dist.PrefixStore("cpu", store), rank, size, timeout)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.dev = dist.ProcessGroupNCCL(dist.PrefixStore("dev", store), rank, size, opts)
        else:
            self.dev = self.cpu

    # ------------------------------------------------------------ model collectives
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` across ranks, in place."""
        self.dev.allreduce([t]).wait()
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` side by side along the last dim (rank order)."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.dev.allgather([parts], [t.contiguous()]).wait()
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's ``value`` (e.g. KV pool tokens from each rank's free memory)."""
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.cpu.allreduce([t], opts).wait()
        return int(t.item())

    # ------------------------------------------------------------ step metadata
    def send(self, obj: object) -> None:
        """Rank 0: hand ``obj`` (a plan of host lists, or None = stop) to every other rank."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        head = torch.zeros(_HEAD, dtype=torch.uint8)
        head[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        first = min(len(data), _HEAD - 8)
        head[8 : 8 + first] = torch.frombuffer(bytearray(data[:first]), dtype=torch.uint8)
        self.cpu.broadcast([head]).wait()
        if len(data) > first:
            self.cpu.broadcast([torch.frombuffer(bytearray(data[first:]), dtype=torch.uint8)]).wait()

    def recv(self) -> object:
        """Other ranks: the next object rank 0 sent."""
        head = torch.empty(_HEAD, dtype=torch.uint8)
        self.cpu.broadcast([head]).wait()
        n = int(head[:8].view(torch.int64).item())
        data = head[8 : 8 + min(n, _HEAD - 8)].numpy().tobytes()
        if n > len(data):
            rest = torch.empty(n - len(data), dtype=torch.uint8)
            self.cpu.broadcast([rest]).wait()
            data += rest.numpy().tobytes()
        return pickle.loads(data)
