"""Data-parallel training under torchrun: the process group, each rank's share of a global batch, the model
wrapped for DDP or FSDP2, the one gradient autograd's hooks never see, and evaluation sharded across ranks.

    torchrun --standalone --nproc_per_node=2 -m fastcls train ...     (gloo on the CPU, nccl on CUDA)

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op and the loop runs as one
process. A process group that the caller already started (fastcls.train inside a larger job) is used as it is.

Batches. The global batch is --batch-size x world size rows. Every rank builds the same length-grouped global
batches (same seed, no communication) and takes every world-th row of each: the shares have about the same
lengths, so no rank waits long at the all-reduce. Each rank's mean loss is weighted by its share of the global
batch's rows (x world size, since the all-reduce averages), so the averaged gradient is the gradient of the
global batch's mean loss, as one process training with the global batch computes it. A rank left without a row
(a last global batch smaller than the world) runs one row at weight 0, so that it still joins the all-reduce.

Gradients. DDP all-reduces in hooks on each parameter's gradient accumulation, which the word-embedding gradient
that fastcls adds row by row into a kept buffer (`fastcls.ops.embedding`) never reaches: DDP is told to ignore
that weight and it is all-reduced here, once per optimizer step. Micro-steps that only accumulate skip the
all-reduce (DDP's no_sync; FSDP2's requires_gradient_sync), forward included.

FSDP2 (`--fsdp`): `fully_shard` on every encoder layer, then on the whole classifier (embeddings and head), with
a mixed-precision policy (bf16 all-gathers under bf16 training, fp32 gradient reduction). The layer-by-layer
encoder calls each layer as its module, so FSDP2's hooks gather and free its weights. Gradients are reduced
with a plain SUM that FSDP2 itself divides by the world size, not with the backend's AVG (which gloo has
mishandled: FSDP2 summed instead of averaging, pytorch issue 162338); the tests compare with one process. Checkpoints gather the full weights into a CPU copy of the
model on rank 0, which writes every file.
"""
import contextlib
import copy
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastcls.components.precision import resolve_device
from fastcls.errors import ConfigError

log = logging.getLogger(__name__)


FSDP_NEEDS_TORCHRUN = "--fsdp needs several processes: launch with torchrun --nproc_per_node=N"


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this run started the process group, so it ends it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, rows: list[int]) -> tuple[list[int], float]:
        """This rank's rows of a global batch and the weight of its mean loss (1.0 in a single process)."""
        if not self.enabled:
            return rows, 1.0
        mine = rows[self.rank::self.world_size]
        if not mine:
            return rows[:1], 0.0
        return mine, len(mine) * self.world_size / len(rows)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (in place; the tensor itself in a single process)."""
        if self.enabled:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is True on any: one decision (stop, fail) for all ranks."""
        if not self.enabled:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=_comm_device())).item() > 0)

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """Each rank's `values` (the same count on every rank), in rank order."""
        local = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        if not self.enabled:
            return [local.tolist()]
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local)
        return [t.tolist() for t in out]

    def gather_rows(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The concatenation, in rank order, of every rank's `local` [counts[rank], ...] rows."""
        if not self.enabled:
            return local
        most = max(counts)
        padded = local.new_zeros((most, *local.shape[1:]))
        padded[: len(local)] = local
        device = _comm_device()
        out = [torch.empty_like(padded, device=device) for _ in range(self.world_size)]
        dist.all_gather(out, padded.to(device))
        return torch.cat([part[:n] for part, n in zip(out, counts, strict=True)]).to(local.device)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collectives of small host values run: nccl needs CUDA tensors, gloo takes CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup(device_name: str) -> tuple[Distributed, torch.device]:
    """(this process's place in the job, its training device), starting the process group under torchrun."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_available() or (world <= 1 and not dist.is_initialized()):  # some builds lack torch.distributed
        return Distributed(), device
    if device.type == "cuda":  # one GPU per process, the one torchrun's LOCAL_RANK names
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise ConfigError(f"--device {device_name}: the process group uses nccl, which needs CUDA devices")
    return Distributed(dist.get_rank(), dist.get_world_size(), owns), device


def rank_seed(seed: int, ddp: Distributed) -> int:
    """A per-rank seed: dropout masks differ across ranks and repeat for the same seed and world size."""
    if not ddp.enabled:
        return seed
    return int(np.random.SeedSequence([seed & (2**63 - 1), ddp.rank, ddp.world_size]).generate_state(1, np.uint64)[0]
               >> 1)


class DataParallel:
    """The classifier as the step runs it: `module` is what to call (DDP's wrapper, or the sharded classifier) and
    `model` the classifier itself; in a single process both are the classifier and every method is a no-op."""

    def __init__(self, model: nn.Module, ddp: Distributed, device: torch.device, *, fsdp: bool = False,
                 precision: str = "fp32"):
        self.model, self.ddp, self.fsdp = model, ddp, fsdp
        self.module = model
        self.outside_autograd: list[nn.Parameter] = []
        self.full_copy: nn.Module | None = None  # FSDP2: rank 0's CPU copy that checkpoints are gathered into
        if fsdp:
            self._shard(precision)
        elif ddp.enabled:
            self._replicate(device)

    def _replicate(self, device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        body = self.model.body
        if getattr(body, "row_accumulated_embedding", False) and body.kernels:
            weight = body.embeddings.word_embeddings.weight
            if weight.requires_grad:
                self.outside_autograd.append(weight)
                name = next(n for n, p in self.model.named_parameters() if p is weight)
                DDP._set_params_and_buffers_to_ignore_for_model(self.model, [name])
        # buffers (position ids) never change, so DDP need not broadcast them every forward
        self.module = DDP(self.model, device_ids=None, gradient_as_bucket_view=True, **_no_buffer_sync())

    def _shard(self, precision: str) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from fastcls.models.families import encoder_layers

        model = self.model
        if not self.ddp.enabled:
            raise ConfigError(FSDP_NEEDS_TORCHRUN)
        if model.frozen_embeddings or model.frozen_layers:
            raise ConfigError("--fsdp does not shard frozen layers; drop --freeze-embeddings/--freeze-layers or "
                              "train with DDP (no --fsdp)")
        if model.packed and not hasattr(model.body, "call_layers_as_modules"):
            raise ConfigError("--fsdp with unpadded batches needs an encoder that runs layer by layer")
        if self.ddp.is_main:
            self.full_copy = copy.deepcopy(model).cpu()
        if hasattr(model.body, "call_layers_as_modules"):
            model.body.row_accumulated_embedding = False  # every gradient goes through FSDP2's reduce-scatter
            model.body.call_layers_as_modules()
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        for layer in encoder_layers(model.encoder):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        for module in model.modules():  # SUM on the wire, FSDP2's own division by the world size around it
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)

    def sync(self, sync: bool):
        """The context of a micro-step's forward and backward: `sync=False` on micro-steps that only accumulate."""
        if sync or not self.ddp.enabled:
            return contextlib.nullcontext()
        if self.fsdp:
            return _fsdp_no_sync(self.model)
        return self.module.no_sync()

    def finish_gradients(self) -> None:
        """After the last micro-step of an optimizer step: reduce what DDP's hooks did not."""
        for weight in self.outside_autograd:
            self._reduce_rows(weight)

    def _reduce_rows(self, weight: nn.Parameter) -> None:
        """Average a row-accumulated gradient over ranks. On the CPU only the rows each rank touched are exchanged
        (a batch's few thousand ids, not the whole table: gloo's all-reduce of MiniLM's 47 MB table would cost
        more than the step's matrix products), summed in rank order so that every rank gets the same bits. On
        CUDA, and where the rows are not tracked, the whole table is all-reduced: exchanging rows would need their
        count on the host, a sync in every step."""
        from fastcls.ops.embedding import set_touched_rows, touched_rows

        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        ids = touched_rows(weight)
        if ids is None or weight.grad.is_cuda:
            self.ddp.sum(weight.grad).div_(self.ddp.world_size)
            set_touched_rows(weight, None)  # other ranks' rows are in it now: the next step zeroes it whole
            return
        ids = torch.unique(ids)
        sizes = self.ddp.gather_floats([float(len(ids))])
        counts = [int(n[0]) for n in sizes]
        all_ids = self.ddp.gather_rows(ids, counts)
        all_rows = self.ddp.gather_rows(weight.grad.index_select(0, ids), counts).div_(self.ddp.world_size)
        weight.grad.index_fill_(0, ids, 0.0)
        weight.grad.index_add_(0, all_ids, all_rows)
        set_touched_rows(weight, all_ids)

    def full_model(self) -> nn.Module | None:
        """The whole classifier with the current weights, for checkpoints: the classifier itself unless it is
        sharded; then (a collective: every rank calls it) rank 0's CPU copy, None on the other ranks."""
        if not self.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.full_copy is None:
            return None
        self.full_copy.load_state_dict(state)
        return self.full_copy


def _no_buffer_sync() -> dict:
    """DDP's argument against a broadcast of the buffers before every forward, by torch's name for it."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    names = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def shard_batches(batches: list[list[int]], ddp: Distributed) -> tuple[list[list[int]], list[int]]:
    """Evaluation: this rank's share of the batches (every world-th) and how many rows each rank gets."""
    counts = [sum(len(b) for b in batches[r::ddp.world_size]) for r in range(ddp.world_size)]
    return batches[ddp.rank::ddp.world_size], counts


def rank_order(batches: list[list[int]], ddp: Distributed) -> list[list[int]]:
    """The batches in the order `gather_rows` puts their outputs: rank 0's, then rank 1's..."""
    return [b for r in range(ddp.world_size) for b in batches[r::ddp.world_size]]


def rank_report(ddp: Distributed, tokens: int, padded_tokens: int, forward_seconds: float | None,
                 batch_size: int) -> dict | None:
    """How evenly the ranks shared the work: each rank's padding and forward time (the CPU's host clock; not
    measured on CUDA, where it would need a sync)."""
    if not ddp.enabled:
        return None
    per_rank = ddp.gather_floats([tokens, padded_tokens, forward_seconds or 0.0])
    padding = [round(1 - t / max(1.0, p), 4) for t, p, _ in per_rank]
    report = {"world_size": ddp.world_size, "global_batch": batch_size * ddp.world_size,
              "padding_fraction_per_rank": padding}
    if forward_seconds is not None:
        seconds = [round(f, 3) for _, _, f in per_rank]
        report.update(forward_seconds_per_rank=seconds, forward_spread=round(max(seconds) / max(1e-9, min(seconds)), 3))
    if ddp.is_main:
        log.info("ranks: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    return report
