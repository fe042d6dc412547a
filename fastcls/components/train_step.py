"""The training step, run eagerly or replayed from CUDA graphs.

A step is micro-steps (forward and backward of one batch, gradients accumulating) then one update (clipping, the
optimizer, the schedule, zeroing the gradients). On a GPU, small models are launch-bound: the host queues a few
hundred kernels a step slower than the GPU runs them. With `cuda_graphs`, each micro-step shape and the update are
captured once as CUDA graphs and replayed, so a step costs a handful of launches:

- a shape (rows, length) is first run eagerly, which compiles its kernels and builds the optimizer's tables; its
  second occurrence is captured, then replayed from then on. The batches come padded to a few shapes
  (`fastcls.data.bucket_length`, filler rows), so a run captures a dozen or two graphs, sharing one memory pool;
- everything a replay changes lives at fixed addresses outside the graphs' pool: the inputs (copied into each
  shape's static batch), the gradients (allocated once, zeroed in place instead of set to None), the summed loss,
  the dropout generator's state (`fastcls.ops.dropout.DropoutGenerator`: a replay draws new masks) and the
  learning rate (a device tensor that the schedule updates on the device);
- nothing in a step reads a device value on the host, so capture never meets a sync.

Graphs change no result: a replay runs the kernels the eager step runs, on the same values.
"""
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from fastcls.components.distributed import DataParallel, Distributed
from fastcls.components.precision import autocast
from fastcls.errors import ConfigError
from fastcls.data import Batch
from fastcls.ops.dropout import DropoutGenerator
from fastcls.optim import FusedAdamW

log = logging.getLogger(__name__)


@dataclass
class StepConfig:
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    cuda_graphs: bool = False


@dataclass
class GraphReport:
    """What capturing cost: graphs made, their capture time, and the padding the fixed shapes added."""
    graphs: int = 0
    capture_seconds: float = 0.0
    replays: int = 0
    shapes: list = field(default_factory=list)


class TrainStep:
    """`model`: the classifier, or its `DataParallel` (fastcls.components.distributed) under torchrun."""

    def __init__(self, model: nn.Module | DataParallel, optimizer, scheduler, scaler, generator: DropoutGenerator,
                 cfg: StepConfig, device: torch.device):
        self.parallel = model if isinstance(model, DataParallel) else DataParallel(model, Distributed(), device)
        self.model = self.parallel.module
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.generator, self.cfg, self.device = generator, cfg, device
        self.params = [p for p in self.parallel.model.parameters() if p.requires_grad]
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: read back at logging steps
        # host time in the forward: the work of this rank's batches (on the CPU only; CUDA runs asynchronously)
        self.forward_seconds = 0.0 if device.type == "cpu" else None
        self.report = GraphReport()
        if cfg.cuda_graphs:
            for p in self.params:  # fixed addresses that every captured backward accumulates into
                p.grad = torch.zeros_like(p)
            self.pool = torch.cuda.graph_pool_handle()
            self.seen: dict[tuple, int] = {}
            self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Batch | None]] = {}

    # the step's two parts, as they run eagerly and as they are captured

    def _micro(self, batch: Batch, weight: float = 1.0, sync: bool = True) -> None:
        with self.parallel.sync(sync):
            start = time.perf_counter()
            with autocast(self.device, self.cfg.precision, cache=not self.cfg.cuda_graphs):
                loss, _ = self.model(batch)
            if self.forward_seconds is not None:
                self.forward_seconds += time.perf_counter() - start
            if weight != 1.0:  # this rank's share of a global batch (fastcls.components.distributed)
                loss = loss * weight
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
        self.generator.end_step()  # each micro-step draws fresh masks, also when replayed
        self.loss_sum += loss.detach()

    def _update(self) -> None:
        self.parallel.finish_gradients()
        # FusedAdamW clips inside its step, reading each gradient once; another optimizer after torch's clipping
        clips_itself = isinstance(self.optimizer, FusedAdamW) and self.optimizer.max_grad_norm == self.cfg.max_grad_norm
        if self.cfg.max_grad_norm > 0 and not clips_itself:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=not self.cfg.cuda_graphs)

    def micro(self, batch: Batch, weight: float = 1.0, sync: bool = True) -> None:
        """Forward and backward of one micro-batch (on the host), its loss x `weight` added to `loss_sum`;
        `sync=False`: a micro-step that only accumulates (no gradient all-reduce under torchrun)."""
        if not self.cfg.cuda_graphs:
            return self._micro(batch.to(self.device), weight, sync)
        key = ("micro", batch.num_rows, batch.max_len, batch.token_type_ids is not None, batch.labels is not None)
        self._run(key, self._micro, batch)

    def update(self) -> None:
        if not self.cfg.cuda_graphs:
            return self._update()
        self._run(("update",), self._update, None)

    # graphs

    def _run(self, key: tuple, part, batch: Batch | None) -> None:
        entry = self.graphs.get(key)
        if entry is not None:
            graph, static = entry
            if static is not None:
                _copy_batch(static, batch)
            graph.replay()
            self.report.replays += 1
            return
        occurrence = self.seen[key] = self.seen.get(key, 0) + 1
        args = () if batch is None else (batch.to(self.device),)
        if occurrence == 1:
            # eagerly, on a side stream as capture will: compiles the shape's kernels, builds the optimizer's
            # address tables and cuBLAS's workspaces, none of which a capture may do
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                part(*args)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph = torch.cuda.CUDAGraph()
        static = _clone_batch(args[0]) if args else None
        with torch.cuda.graph(graph, pool=self.pool):
            part(*([static] if args else []))
        end.record()
        end.synchronize()
        self.report.capture_seconds += start.elapsed_time(end) / 1e3
        self.report.graphs += 1
        if static is not None:
            self.report.shapes.append([static.num_rows, static.max_len])
        self.graphs[key] = (graph, static)
        graph.replay()  # capture only recorded the work: this runs the step
        self.report.replays += 1


def cuda_graphs_enabled(mode: str, device, precision, custom_optimizer, custom_schedule, ddp: Distributed,
                        model=None, cache=None) -> bool:
    """Whether the steps replay from CUDA graphs (`mode`: --cuda-graphs); `on` where they cannot is an error
    naming why. Without `model`, checks what the settings alone decide (before the model is loaded)."""
    if mode == "off":
        return False
    blockers = [(device.type != "cuda", "needs a CUDA device"),
                (precision == "fp16", "does not capture fp16's loss scaling (use --precision bf16)"),
                (custom_optimizer, "needs fastcls's FusedAdamW (no optimizer= factory)"),
                (custom_schedule, "needs fastcls's schedule (no scheduler= factory)"),
                (ddp.enabled, "does not capture DDP's or FSDP's collectives (run without torchrun)")]
    if model is not None:
        blockers += [(model.packed, "needs padded batches (--unpad off)"),
                     (not model.body.takes_packed, f"{type(model.encoder).__name__} runs through its own forward"),
                     (cache is not None, "cannot replay the frozen-prefix cache (--no-cache-frozen)")]
    reasons = [why for blocked, why in blockers if blocked]
    if mode == "on" and reasons:
        raise ConfigError(f"--cuda-graphs on {reasons[0]}")
    return mode == "on"


def graph_report(step: TrainStep, tokens: int, padded_tokens: int) -> dict:
    report = dataclasses.asdict(step.report)
    report["padding_fraction"] = round(1 - tokens / max(1, padded_tokens), 4)  # bucketing's and the rows' own
    log.info(f"CUDA graphs: {report['graphs']} captured in {report['capture_seconds']:.2f} s, {report['replays']} "
             f"replays, {report['padding_fraction']:.1%} of the tokens were padding")
    return report


_BATCH_TENSORS = ("input_ids", "position_ids", "token_type_ids", "cls_index", "key_mask", "labels", "label_counts")


def _clone_batch(batch: Batch) -> Batch:
    return dataclasses.replace(batch, **{name: getattr(batch, name).clone() for name in _BATCH_TENSORS
                                         if getattr(batch, name) is not None})


def _copy_batch(static: Batch, batch: Batch) -> None:
    """The host batch's tensors into the static batch's, from pinned memory without waiting for the GPU."""
    for name in _BATCH_TENSORS:
        source = getattr(batch, name)
        if source is not None:
            getattr(static, name).copy_(source.pin_memory(), non_blocking=True)
