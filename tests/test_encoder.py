"""The layer-by-layer encoder equals the model's own forward on both batch layouts, in training and evaluation;
freezing, the prefix cache and checkpointing keep the gradients of what trains."""
import inspect

import numpy as np
import pytest
import torch
from tiny import encoded_rows, tiny_encoder
from transformers import AutoConfig, AutoModel

from fastcls.components.prefix_cache import PrefixCache
from fastcls.data import collate
from fastcls.errors import ConfigError
from fastcls.models.classifier import EncoderClassifier
from fastcls.models.encoder import LayerwiseEncoder, OwnForwardEncoder
from fastcls.models.families import FAMILIES, encoder_embeddings, encoder_layers

FAMILIES_RUN_LAYERWISE = ["bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert"]
LENGTHS = [7, 1, 12, 4, 9]


def classifier(family, dropout=0.1, packed=False, kernels=True, layers=3):
    model = EncoderClassifier(tiny_encoder(family, dropout, layers), num_labels=3, dropout=dropout, packed=packed,
                              kernels=kernels)
    assert isinstance(model.body, LayerwiseEncoder)
    return model


def batch_of(encoded, rows, packed, labels=True):
    return collate(encoded, rows, packed=packed, pad_token_id=1, labels=labels)


def own_forward_logits(model, batch):
    """The Hugging Face encoder's own padded forward, then the head: the reference."""
    takes = inspect.signature(model.encoder.forward).parameters
    hidden = model.encoder(**{k: v for k, v in batch.padded_inputs().items() if k in takes}).last_hidden_state
    return model.head.linear(hidden[:, 0])


def test_collate_lays_out_both_layouts_alike():
    encoded = encoded_rows(LENGTHS)
    rows = [3, 0, 1]
    packed, padded = batch_of(encoded, rows, True), batch_of(encoded, rows, False)
    assert packed.max_len == padded.max_len == 7 and packed.num_rows == padded.num_rows == 3
    assert packed.num_tokens == 4 + 7 + 1 and padded.num_tokens == 3 * 7
    torch.testing.assert_close(packed.cu_seqlens, torch.tensor([0, 4, 11, 12], dtype=torch.int32))
    expected = np.concatenate([encoded.row(r) for r in rows])
    assert packed.input_ids.tolist() == expected.tolist()
    assert packed.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 0]
    assert packed.cls_index.tolist() == [0, 4, 11] and padded.cls_index.tolist() == [0, 7, 14]
    assert padded.input_ids[packed.pad_index].tolist() == expected.tolist()
    assert padded.input_ids[~padded.key_mask.reshape(-1)].eq(1).all()
    assert torch.equal(packed.key_mask, padded.key_mask) and padded.key_mask.sum() == packed.num_tokens
    assert packed.labels.tolist() == padded.labels.tolist() == encoded.labels[rows].tolist()
    assert packed.rows.tolist() == rows and packed.source == padded.source == encoded.key
    assert batch_of(encoded, rows, True, labels=False).labels is None
    x = torch.randn(packed.num_tokens, 2, 5)
    heads = packed.to_heads(x)
    assert heads.shape == (3, 2, 7, 5)
    torch.testing.assert_close(packed.from_heads(heads.transpose(1, 2).flatten(-2)), x.flatten(-2))


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("family", FAMILIES_RUN_LAYERWISE)
def test_both_layouts_match_the_models_own_forward_in_eval_mode(family, kernels):
    encoded = encoded_rows(LENGTHS, token_types=family == "bert")
    rows = [2, 0, 4, 1, 3]
    model = classifier(family, kernels=kernels).eval()
    with torch.no_grad():
        expected = own_forward_logits(model, batch_of(encoded, rows, False))
        for packed in (True, False):
            model.packed = packed
            loss, got = model(batch_of(encoded, rows, packed))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            assert loss.shape == ()


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_the_two_layouts_agree_in_training_mode_with_dropout(family):
    """With dropout on, the mask of each element follows its place in the tensor, so the layouts draw different
    masks; with dropout 0 in train mode their losses and every gradient agree."""
    encoded = encoded_rows(LENGTHS, seed=3, token_types=family == "bert")
    rows = [4, 2, 1, 0, 3]
    results = []
    for packed in (True, False):
        model = classifier(family, dropout=0.0, packed=packed).train()
        loss, logits = model(batch_of(encoded, rows, packed))
        loss.backward()
        results.append((loss.detach(), logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_p, logits_p, grads_p), (loss_d, logits_d, grads_d) = results
    torch.testing.assert_close(loss_p, loss_d, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits_p, logits_d, atol=1e-6, rtol=1e-5)
    assert grads_p.keys() == grads_d.keys()
    for name, grad in grads_d.items():
        assert grad is not None and grads_p[name] is not None, name
        torch.testing.assert_close(grads_p[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_layerwise_gradients_match_the_models_own_forward(family):
    """Without dropout, the loss and every parameter's gradient are those of the Hugging Face forward + head."""
    encoded = encoded_rows(LENGTHS, seed=3, token_types=family == "bert")
    rows = [4, 2, 1, 0, 3]
    ours = classifier(family, dropout=0.0, packed=True).train()
    loss, _ = ours(batch_of(encoded, rows, True))
    loss.backward()
    reference = classifier(family, dropout=0.0).train()
    batch = batch_of(encoded, rows, False)
    expected = torch.nn.functional.cross_entropy(own_forward_logits(reference, batch), batch.labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters(), strict=True):
        if q.grad is None:  # the pooler-free encoder reaches every parameter
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_frozen_prefix_takes_no_gradient_and_its_cached_output_gives_the_same_step():
    model = classifier("bert", packed=True).train()
    model.freeze(embeddings=True, layers=2)
    layers = encoder_layers(model.encoder)
    assert not encoder_embeddings(model.encoder).training and not layers[1].training and layers[2].training
    encoded = encoded_rows(LENGTHS)
    batch = batch_of(encoded, [1, 4, 0], True)
    cache = PrefixCache(encoded.offsets, 32, "cpu", 1 << 20, dtype=torch.float32)
    model.body.use_prefix_cache(cache, encoded.key)
    torch.manual_seed(5)
    loss, _ = model(batch)
    loss.backward()
    assert cache.filled(batch.rows) and cache.hits == 0
    frozen = [p for m in (encoder_embeddings(model.encoder), layers[0], layers[1]) for p in m.parameters()]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert all(p.grad is not None for p in layers[2].parameters())
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(5)  # the trainable layer's dropout draws the same masks
    reused, _ = model(batch)
    reused.backward()
    assert cache.hits == 3
    torch.testing.assert_close(reused, loss, atol=0, rtol=0)
    for name, grad in first.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=0, rtol=0)
    other = encoded_rows(LENGTHS, seed=1)  # rows of other data are never served from this cache
    model(batch_of(other, [1, 4, 0], True))
    assert cache.hits == 3


def test_freeze_rejects_more_layers_than_the_encoder_has():
    model = classifier("bert")
    with pytest.raises(ConfigError, match="--freeze-layers 4"):
        model.freeze(embeddings=False, layers=4)


@pytest.mark.parametrize("packed", [True, False])
def test_checkpointing_with_a_frozen_prefix_still_trains_the_upper_layers(packed):
    """The known trap: reentrant checkpointing of a layer whose input needs no gradient silently returns none.
    fastcls checkpoints non-reentrantly, so the gradients equal those without checkpointing."""
    results = []
    for checkpointing in (False, True):
        model = classifier("bert", packed=packed).train()
        model.freeze(embeddings=True, layers=1)
        if checkpointing:
            model.enable_checkpointing()
        encoded = encoded_rows(LENGTHS, seed=7)
        torch.manual_seed(9)
        loss, _ = model(batch_of(encoded, [0, 1, 2, 3, 4], packed))
        loss.backward()
        results.append({n: p.grad for n, p in model.named_parameters()})
    plain, checkpointed = results
    trained = [n for n, g in plain.items() if g is not None]
    assert any(".layer.2." in n for n in trained) and not any(".layer.0." in n for n in trained)
    for name in plain:
        if plain[name] is None:
            assert checkpointed[name] is None, name
        else:
            assert checkpointed[name] is not None and checkpointed[name].abs().sum() > 0, name
            torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_checkpointing_an_encoder_that_runs_its_own_forward_trains_the_same():
    results = []
    for checkpointing in (False, True):
        model = EncoderClassifier(tiny_encoder("mpnet", dropout=0.0), num_labels=3, dropout=0.0).train()
        assert isinstance(model.body, OwnForwardEncoder)
        model.freeze(embeddings=True, layers=1)
        if checkpointing:
            model.enable_checkpointing()
        loss, _ = model(batch_of(encoded_rows(LENGTHS, seed=2, token_types=False), [0, 1, 2, 3, 4], False))
        loss.backward()
        results.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert results[0].keys() == results[1].keys() and not any(".layer.0." in n for n in results[0])
    for name, grad in results[0].items():
        torch.testing.assert_close(results[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_the_family_table_finds_every_familys_layers_and_embeddings():
    for name in FAMILIES:
        encoder = tiny_encoder(name, layers=2) if name not in ("modernbert", "mpnet") else AutoModel.from_config(
            AutoConfig.for_model(name, vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=37, max_position_embeddings=64, pad_token_id=1))
        assert len(encoder_layers(encoder)) == 2, name
        assert encoder_embeddings(encoder) is not encoder, name
        assert LayerwiseEncoder.supports(encoder) == (FAMILIES[name].layer_kind is not None), name


def test_unsupported_encoders_run_their_own_forward_padded_only():
    config = AutoConfig.for_model("bert", vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=37, is_decoder=True)
    encoder = AutoModel.from_config(config)
    assert not LayerwiseEncoder.supports(encoder)
    with pytest.raises(ValueError, match="not an encoder fastcls runs layer by layer"):
        LayerwiseEncoder(encoder)
    model = EncoderClassifier(encoder, num_labels=2, dropout=0.1)
    assert isinstance(model.body, OwnForwardEncoder) and not model.packed
    with pytest.raises(ValueError, match="padded batches only"):
        model(batch_of(encoded_rows(LENGTHS), [0, 1], True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("frozen", [0, 1])
@pytest.mark.parametrize("packed", [True, False])
def test_a_cuda_training_step_never_waits_for_the_device(frozen, packed):
    """The loop's step (batch to the GPU, bf16 forward and backward, clipping, fused AdamW, schedule) queues work
    and never reads a value back: torch's sync debug mode turns any host sync into an error."""
    from fastcls.components.lr_schedule import ScheduleConfig, build_scheduler
    from fastcls.components.optimizer import OptimizerConfig, build_optimizer, param_groups

    device = torch.device("cuda")
    model = classifier("bert", packed=packed).to(device)
    model.freeze(embeddings=bool(frozen), layers=frozen)
    model.train()
    optimizer = build_optimizer(param_groups(model, 0.01), OptimizerConfig())
    scheduler = build_scheduler(optimizer, ScheduleConfig(10, 2, "linear"))
    encoded = encoded_rows(LENGTHS * 4, seed=11)
    loss_sum = torch.zeros((), device=device)

    def step(rows):
        batch = batch_of(encoded, rows, packed).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model(batch)
        loss.backward()
        loss_sum.add_(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    step([0, 1, 2, 3])  # the first step compiles kernels and creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rows in ([4, 5, 6], [7, 8, 9, 10, 11], [12, 13]):
            step(rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss_sum).item()
