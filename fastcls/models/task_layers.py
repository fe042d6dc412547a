"""Task-specific top layers for multi-task fine-tuning (`--task-layers K`): every task gets its own copy of the
encoder's top K layers, initialised from the pretrained ones; the layers below stay shared.

    task_layers = TaskLayers.from_encoder(encoder, num_tasks, k)   # the encoder keeps its bottom n - K layers
    body = LayerwiseEncoder(encoder); body.use_task_layers(task_layers)
    pooled = body.pooled(batch)                                     # [tasks, rows, d]

The copies are ordinary transformers layer modules (`copies[t][k]`), so task t's copy goes back into a standard
encoder (`encoder_for_task`). On CUDA they run batched across tasks, each weight stacked over the copies at
forward time (a copy, small against the products; autograd hands each copy its own gradient): the first task
layer projects the shared input onto every task's queries, keys and values in one product with the concatenated
weights, later products are batched matrix products over tasks, and attention runs the tasks as T * rows
sequences. The LayerNorms run per task with that copy's own weights, each drawing its own dropout mask; dropout
elsewhere covers all tasks' elements, so each task's masks differ too. As in `LayerwiseEncoder`, with [CLS] pooling
the last layer runs its query, output projection, LayerNorms and feed-forward on the [CLS] rows only.

On the CPU the tasks run one after the other through `LayerwiseEncoder`'s layer code instead: with no launch
overhead to save there, batching gained nothing, and its copies (stacked weights, per-task layouts) cost up to a
tenth of the layers' time (MiniLM-sized layers: benchmarks/bench_task_layers.py). `batched` overrides the choice.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastcls.data import Batch, PackedBatch
from fastcls.errors import ConfigError
from fastcls.models import attention as attn
from fastcls.models.encoder import LayerwiseEncoder, _add_norm, _Layer, run_layer, task_layers_unsupported
from fastcls.models.families import encoder_layers, family_of
from fastcls.models.pooling import pool
from fastcls.ops.dropout import recomputed_alike


def _task_linear(x: torch.Tensor, groups: list[list[nn.Linear]]) -> torch.Tensor:
    """Task t's output is x's (x [M, d] shared by the tasks, or x[t] of [T, M, d]) through the linears of groups[t],
    concatenated: [T, M, out]. A shared input takes one product with all tasks' weights."""
    tasks = len(groups)
    weight = torch.cat([linear.weight for group in groups for linear in group])
    bias = torch.cat([linear.bias for group in groups for linear in group])
    if x.dim() == 2:
        return F.linear(x, weight, bias).view(len(x), tasks, -1).transpose(0, 1)
    return torch.baddbmm(bias.view(tasks, 1, -1), x, weight.view(tasks, -1, x.shape[-1]).transpose(1, 2))


def _to_heads(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-task tokens [T, tokens, H, D] -> [T * rows, H, max_len, D] (zeros at an unpadded batch's padding)."""
    if isinstance(batch, PackedBatch):
        x = x.new_zeros(len(x), batch.num_rows * batch.max_len, *x.shape[2:]).index_copy_(1, batch.pad_index, x)
    return x.reshape(len(x) * batch.num_rows, batch.max_len, *x.shape[2:]).transpose(1, 2)


def _from_heads(x: torch.Tensor, batch: Batch, tasks: int) -> torch.Tensor:
    """[T * rows, max_len, H * D] -> per-task tokens [T, tokens, H * D]."""
    x = x.reshape(tasks, batch.num_rows * batch.max_len, x.shape[-1])
    return x.index_select(1, batch.pad_index) if isinstance(batch, PackedBatch) else x


def _add_norms(norms: list[nn.LayerNorm], x, residual, p: float, training: bool, kernels: bool) -> torch.Tensor:
    """LayerNorm(dropout(x[t]) + residual) with task t's norm, for x [T, M, d] and residual [M, d] or [T, M, d]."""
    return torch.stack([_add_norm(norm, x[t], residual if residual.dim() == 2 else residual[t], p, training, kernels)
                        for t, norm in enumerate(norms)])


class TaskLayers(nn.Module):
    """`num_tasks` copies of `layers` (an encoder's top layers, of the family table's layer `kind`): h [tokens, d]
    from the shared layers, on the batch's own layout, in; each task's pooled vector [tasks, rows, d] out."""

    def __init__(self, layers: list[nn.Module], num_tasks: int, kind: str):
        super().__init__()
        if num_tasks < 1 or not layers:
            raise ValueError(f"TaskLayers needs at least one task and one layer, got {num_tasks} and {len(layers)}")
        self.kind = kind
        self.batched: bool | None = None  # run the tasks batched (None: on CUDA) or one after the other
        self.copies = nn.ModuleList(nn.ModuleList(copy.deepcopy(layer) for layer in layers) for _ in range(num_tasks))

    @classmethod
    def from_encoder(cls, encoder: nn.Module, num_tasks: int, k: int) -> "TaskLayers":
        """Moves the encoder's top k layers out of it (its layer list keeps the bottom n - k; its config still
        says n) into `num_tasks` copies. On an encoder freshly built from its config, this makes the structure
        that a state dict saved from a trained pair loads into."""
        if not LayerwiseEncoder.supports(encoder):
            raise task_layers_unsupported(encoder)
        layers = encoder_layers(encoder)
        if not 1 <= k <= len(layers):
            raise ConfigError(f"--task-layers {k}: {type(encoder).__name__} has {len(layers)} layers, so give 1 "
                              f"to {len(layers)}")
        task_layers = cls(list(layers[len(layers) - k:]), num_tasks, family_of(encoder).layer_kind)
        del layers[len(layers) - k:]
        return task_layers

    @property
    def num_tasks(self) -> int:
        return len(self.copies)

    @property
    def num_layers(self) -> int:
        return len(self.copies[0])

    def forward(self, h: torch.Tensor, batch: Batch, *, kernels: bool = True,
                checkpointing: bool = False, pooling: str = "cls") -> torch.Tensor:
        """`kernels`: fastcls's dropout and LayerNorm kernels (else PyTorch's ops); `checkpointing`: recompute
        each layer's activations in the backward, as `LayerwiseEncoder` does; `pooling`: cls or mean."""
        def run(layer, *args):
            if checkpointing:
                return checkpoint(recomputed_alike(layer), *args, use_reentrant=False,
                                  context_fn=attn.recompute_in_the_same_context)
            return layer(*args)

        # the last layer runs on the [CLS] rows alone where they are all the pooling reads
        cls_only_at = self.num_layers - 1 if pooling == "cls" else None
        if self.batched if self.batched is not None else h.is_cuda:
            for index in range(self.num_layers):
                h = run(self.layer, index, h, batch, index == cls_only_at, kernels)
        else:
            outputs = []
            for layers in self.copies:
                x = h
                for index, layer in enumerate(layers):
                    x = run(run_layer, _Layer(layer, self.kind), x, batch, index == cls_only_at, kernels)
                outputs.append(x)
            h = torch.stack(outputs)
        return h if cls_only_at is not None else pool(h, batch, pooling)

    def layer(self, index: int, h: torch.Tensor, batch: Batch, cls_only: bool, kernels: bool) -> torch.Tensor:
        """Layer `index` of every task on tokens h ([tokens, d] shared, or [T, tokens, d]): [T, tokens, d], or
        with cls_only the [CLS] rows' [T, rows, d]."""
        parts = [_Layer(layers[index], self.kind) for layers in self.copies]
        first, tasks = parts[0], len(parts)
        training = first.module.training
        query_input = h.index_select(h.dim() - 2, batch.cls_index) if cls_only else h
        if cls_only:
            q = _task_linear(query_input, [[part.query] for part in parts]).unflatten(-1, (first.heads, -1))
            kv = _task_linear(h, [[part.key, part.value] for part in parts])
            k, v = kv.unflatten(-1, (2, first.heads, -1)).unbind(2)
            queries = q.reshape(tasks * batch.num_rows, 1, first.heads, -1).transpose(1, 2)
        else:
            qkv = _task_linear(h, [[part.query, part.key, part.value] for part in parts])
            q, k, v = qkv.unflatten(-1, (3, first.heads, -1)).unbind(2)
            queries = _to_heads(q, batch)
        mask = batch.key_mask[:, None, None, :].repeat(tasks, 1, 1, 1)
        p = first.attn_dropout if training else 0.0
        out = attn.attention(queries, _to_heads(k, batch), _to_heads(v, batch), mask, p, kernels=kernels)
        out = out.transpose(1, 2).flatten(-2)  # [T * rows, L, H * D]
        context = out[:, 0].view(tasks, batch.num_rows, -1) if cls_only else _from_heads(out, batch, tasks)
        h = _add_norms([part.attn_norm for part in parts], _task_linear(context, [[part.attn_out] for part in parts]),
                       query_input, first.attn_out_dropout, training, kernels)
        hidden = first.act(_task_linear(h, [[part.ffn_in] for part in parts]))
        return _add_norms([part.out_norm for part in parts], _task_linear(hidden, [[part.ffn_out] for part in parts]),
                          h, first.out_dropout, training, kernels)


def encoder_for_task(encoder: nn.Module, task_layers: TaskLayers, task: int) -> nn.Module:
    """A standalone copy of the (shared) encoder with task `task`'s layers back on top: a standard transformers
    encoder, whose own forward runs it."""
    standalone = copy.deepcopy(encoder)
    encoder_layers(standalone).extend(copy.deepcopy(list(task_layers.copies[task])))
    return standalone
