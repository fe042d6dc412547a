"""Task-specific top layers (`--task-layers K`): run batched across tasks, each task's h_CLS equals its own
standalone encoder's (and the transformers forward's), gradients equal the per-task loop's, dropout draws masks
per task, and freezing, the prefix cache and checkpointing keep working below the shared part."""
import inspect

import pytest
import torch
from tiny import encoded_rows, tiny_encoder
from transformers import AutoModel

from fastcls.components.prefix_cache import PrefixCache
from fastcls.data import collate
from fastcls.errors import ConfigError
from fastcls.models.classifier import EncoderClassifier
from fastcls.models.encoder import LayerwiseEncoder
from fastcls.models.families import encoder_embeddings, encoder_layers
from fastcls.models.task_layers import TaskLayers, encoder_for_task

LENGTHS = [7, 1, 12, 4, 9]
ROWS = [2, 0, 4, 1, 3]
TASKS = 3


def split(family, k, dropout=0.0, dtype=torch.float32, layers=3, perturb=True, batched=True):
    """A tiny encoder whose top k layers became TASKS task copies, each moved apart from the others (so that a mix-up
    of tasks cannot pass), and the layer-by-layer body running them batched across tasks or one after the other."""
    encoder = tiny_encoder(family, dropout, layers).to(dtype)
    task_layers = TaskLayers.from_encoder(encoder, TASKS, k)
    task_layers.batched = batched
    if perturb:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in task_layers.parameters():
                p.add_(torch.randn(p.shape, generator=generator, dtype=dtype) * 0.2)
    body = LayerwiseEncoder(encoder)
    body.use_task_layers(task_layers)
    return encoder, task_layers, body


def batch_of(family, packed, seed=0):
    encoded = encoded_rows(LENGTHS, seed=seed, token_types=family == "bert")
    return collate(encoded, ROWS, packed=packed, pad_token_id=1)


def own_forward_cls(encoder, batch):
    takes = inspect.signature(encoder.forward).parameters
    return encoder(**{k: v for k, v in batch.padded_inputs().items() if k in takes}).last_hidden_state[:, 0]


@pytest.mark.parametrize(("dtype", "batched"), [(torch.float32, True), (torch.float64, True), (torch.float64, False)],
                         ids=["fp32-batched", "fp64-batched", "fp64-loop"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_each_tasks_output_is_its_standalone_encoders(family, k, dtype, batched):
    encoder, task_layers, body = split(family, k, dtype=dtype, batched=batched)
    assert len(encoder_layers(encoder)) == 3 - k and task_layers.num_layers == k and task_layers.num_tasks == TASKS
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    with torch.no_grad():
        padded = batch_of(family, packed=False)
        for packed in (True, False):
            batch = batch_of(family, packed)
            out = body.pooled(batch)
            assert out.shape == (TASKS, len(ROWS), 32) and out.dtype == dtype
            for t in range(TASKS):
                standalone = encoder_for_task(encoder, task_layers, t).eval()
                assert len(encoder_layers(standalone)) == 3
                torch.testing.assert_close(out[t], LayerwiseEncoder(standalone).pooled(batch), **tol)
                torch.testing.assert_close(out[t], own_forward_cls(standalone, padded), **tol)
            assert not torch.allclose(out[0], out[1], atol=1e-3)


@pytest.mark.parametrize(("kernels", "batched"), [(True, True), (False, True), (True, False)],
                         ids=["kernels-batched", "torch-batched", "kernels-loop"])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_gradients_equal_the_per_task_loops(family, packed, kernels, batched):
    """The gradient of a random weighting of [T, rows, d] w.r.t. every copy, the shared layers and the embeddings
    equals the sum over tasks of each standalone encoder's."""
    encoder, task_layers, body = split(family, 2, dtype=torch.float64, batched=batched)
    body.kernels = kernels
    batch = batch_of(family, packed, seed=3)
    weights = torch.randn(TASKS, len(ROWS), 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    standalones = [encoder_for_task(encoder, task_layers, t) for t in range(TASKS)]
    (body.pooled(batch) * weights).sum().backward()
    for t, standalone in enumerate(standalones):
        (LayerwiseEncoder(standalone, kernels).pooled(batch) * weights[t]).sum().backward()
    for name, p in encoder.named_parameters():
        grads = [dict(s.named_parameters())[name].grad for s in standalones]
        if name.startswith("pooler."):  # h_CLS is read before the pooler
            assert p.grad is None and grads == [None] * TASKS, name
        else:
            torch.testing.assert_close(p.grad, sum(grads), atol=1e-10, rtol=1e-10, msg=name)
    assert any(p.grad.abs().sum() > 0 for p in encoder_layers(encoder).parameters())
    for t, standalone in enumerate(standalones):
        top = encoder_layers(standalone)[1:]
        for (name, p), q in zip(task_layers.copies[t].named_parameters(), top.parameters(), strict=True):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-10, msg=f"task {t}: {name}")


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "loop"])
@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_dropout_draws_each_tasks_own_masks(family, kernels, batched):
    """Identical copies give identical tasks in eval mode; in training every task's copy draws its own masks, so
    the tasks' outputs differ from each other and from eval."""
    _, task_layers, body = split(family, 2, dropout=0.2, perturb=False, batched=batched)
    body.kernels = kernels
    batch = batch_of(family, packed=True)
    task_layers.eval()
    with torch.no_grad():
        evaluated = body.pooled(batch)
    torch.testing.assert_close(evaluated[1], evaluated[0], atol=1e-6, rtol=1e-6)
    task_layers.train()
    trained = body.pooled(batch)
    assert torch.isfinite(trained).all()
    for t in range(TASKS):
        assert not torch.allclose(trained[t], evaluated[t], atol=1e-3)
        for u in range(t):
            assert not torch.allclose(trained[t], trained[u], atol=1e-3), (t, u)


def freeze(encoder, body, layers):
    body.frozen_embeddings, body.frozen_layers = True, layers
    for module in [encoder_embeddings(encoder), *encoder_layers(encoder)[:layers]]:
        module.requires_grad_(False)
        module.eval()


@pytest.mark.parametrize("k", [1, 3])
def test_the_frozen_prefix_below_the_shared_layers_is_served_from_the_cache(k):
    """K = 1 with two frozen layers, and K = every layer (only the embeddings shared, and frozen)."""
    encoder, task_layers, body = split("bert", k, dropout=0.1)
    freeze(encoder, body, 3 - k)
    encoded = encoded_rows(LENGTHS)
    batch = collate(encoded, [1, 4, 0], packed=True, pad_token_id=1)
    cache = PrefixCache(encoded.offsets, 32, "cpu", 1 << 20, dtype=torch.float32)
    body.use_prefix_cache(cache, encoded.key)
    results = []
    for hits in (0, 3):
        task_layers.zero_grad()
        torch.manual_seed(5)  # the task layers' dropout draws the same masks
        out = body.pooled(batch)
        (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
        assert cache.filled(batch.rows) and cache.hits == hits
        results.append((out.detach(), [p.grad.clone() for p in task_layers.parameters()]))
    (first, first_grads), (cached, cached_grads) = results
    torch.testing.assert_close(cached, first, atol=0, rtol=0)
    for grad, expected in zip(cached_grads, first_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=0, rtol=0)
    assert all(p.grad is None for p in encoder.parameters())


def test_freezing_into_the_task_layers_is_refused():
    encoder, _, body = split("bert", 2)
    with pytest.raises(ConfigError, match="--freeze-layers 2: with --task-layers 2 only the bottom 1 of 3"):
        body.frozen_layers = 2
    body.frozen_layers = 1
    # frozen before the task layers came
    encoder = tiny_encoder("bert")
    body = LayerwiseEncoder(encoder)
    body.frozen_layers = 3
    task_layers = TaskLayers.from_encoder(encoder, TASKS, 1)
    with pytest.raises(ConfigError, match="--freeze-layers 3: with --task-layers 1"):
        body.use_task_layers(task_layers)


def test_bad_task_layer_counts_and_encoders_are_named():
    for k in (0, 4):
        with pytest.raises(ConfigError, match=f"--task-layers {k}: BertModel has 3 layers"):
            TaskLayers.from_encoder(tiny_encoder("bert"), TASKS, k)
    with pytest.raises(ValueError, match="still holds 3 layers"):  # a bug: the encoder was not split
        LayerwiseEncoder(tiny_encoder("bert")).use_task_layers(TaskLayers(list(encoder_layers(tiny_encoder("bert"))),
                                                                          TASKS, "bert"))
    mpnet = EncoderClassifier(tiny_encoder("mpnet"), num_labels=2, dropout=0.1)
    for call in (lambda: TaskLayers.from_encoder(mpnet.encoder, TASKS, 1), lambda: mpnet.body.use_task_layers(None)):
        with pytest.raises(ConfigError, match="--task-layers: MPNetModel runs through its own forward"):
            call()
    assert len(encoder_layers(mpnet.encoder)) == 3  # refused before anything moved


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "loop"])
@pytest.mark.parametrize("packed", [True, False])
def test_checkpointing_gives_the_same_values_and_gradients(packed, batched):
    results = []
    for checkpointing in (False, True):
        encoder, task_layers, body = split("bert", 2, dropout=0.1, batched=batched)
        freeze(encoder, body, 0)
        if checkpointing:
            body.enable_checkpointing()
        torch.manual_seed(9)
        out = body.pooled(batch_of("bert", packed, seed=7))
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads = {n: p.grad for n, p in [*encoder.named_parameters(), *task_layers.named_parameters()]}
        results.append((out.detach(), grads))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)
    assert sum(g is not None for g in plain_grads.values()) > len(list(task_layers.parameters()))
    for name, grad in plain_grads.items():
        if grad is None:
            assert checkpointed_grads[name] is None, name
        else:
            torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_state_dict_loads_into_the_structure_rebuilt_from_the_config(tmp_path):
    """The run folder's path: build the encoder from its config, split it, load the trained state dict; and an
    exported task is a transformers folder that AutoModel loads."""
    encoder, task_layers, body = split("bert", 2)
    state = torch.nn.ModuleDict({"encoder": encoder, "task_layers": task_layers}).state_dict()
    assert "task_layers.copies.2.1.attention.self.query.weight" in state
    rebuilt_encoder = AutoModel.from_config(encoder.config)
    rebuilt_tasks = TaskLayers.from_encoder(rebuilt_encoder, TASKS, 2)
    rebuilt_tasks.batched = task_layers.batched
    torch.nn.ModuleDict({"encoder": rebuilt_encoder, "task_layers": rebuilt_tasks}).load_state_dict(state)
    rebuilt = LayerwiseEncoder(rebuilt_encoder)
    rebuilt.use_task_layers(rebuilt_tasks)
    batch = batch_of("bert", packed=True)
    with torch.no_grad():
        expected = body.pooled(batch)
        torch.testing.assert_close(rebuilt.pooled(batch), expected, atol=0, rtol=0)
        encoder_for_task(encoder, task_layers, 1).save_pretrained(tmp_path)
        exported = AutoModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(own_forward_cls(exported, batch_of("bert", packed=False)), expected[1],
                                   atol=1e-5, rtol=1e-5)
