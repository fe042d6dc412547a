"""The unpadded layer-by-layer encoder equals the model's own padded forward; freezing and checkpointing keep
the gradients of what trains."""
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

from fastcls.data import Encoded, collate, collate_packed
from fastcls.encoder_stack import EncoderStack
from fastcls.model import EncoderClassifier
from fastcls.patching import patch

FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "distilbert"]


def tiny_encoder(family, dropout=0.1):
    torch.manual_seed(0)
    if family == "distilbert":
        config = AutoConfig.for_model("distilbert", vocab_size=99, dim=32, n_layers=3, n_heads=4, hidden_dim=37,
                                      max_position_embeddings=64, pad_token_id=1, dropout=dropout,
                                      attention_dropout=dropout)
    else:
        config = AutoConfig.for_model(family, vocab_size=99, hidden_size=32, num_hidden_layers=3,
                                      num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                      pad_token_id=1, hidden_dropout_prob=dropout,
                                      attention_probs_dropout_prob=dropout)
    return AutoModel.from_config(config)


def classifier(family, dropout=0.1):
    model = EncoderClassifier(tiny_encoder(family, dropout), num_labels=3, dropout=dropout)
    assert model.stack is not None
    return model


def encoded_rows(lengths, seed=0, token_types=True):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = rng.integers(2, 99, size=int(lengths.sum())).astype(np.int32)
    types = rng.integers(0, 2, size=len(ids)).astype(np.int32) if token_types else None
    labels = rng.integers(0, 3, size=len(lengths))
    return Encoded(input_ids=ids, lengths=lengths, token_type_ids=types, labels=labels, num_truncated=0,
                   max_length=64)


LENGTHS = [7, 1, 12, 4, 9]


def test_collate_packed_lays_out_the_rows():
    encoded = encoded_rows(LENGTHS)
    rows = [3, 0, 1]
    batch = collate_packed(encoded, rows)
    assert batch.max_len == 7 and batch.num_rows == 3 and batch.num_tokens == 4 + 7 + 1
    torch.testing.assert_close(batch.cu_seqlens, torch.tensor([0, 4, 11, 12], dtype=torch.int32))
    expected = np.concatenate([encoded.row(r) for r in rows])
    assert batch.input_ids.tolist() == expected.tolist()
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 0]
    assert batch.cls_index.tolist() == [0, 4, 11]
    padded = collate(encoded, rows, pad_token_id=1)
    flat = padded["input_ids"].reshape(-1)
    assert flat[batch.pad_index].tolist() == expected.tolist()
    assert torch.equal(batch.key_mask, padded["attention_mask"].bool())
    assert batch.labels.tolist() == encoded.labels[rows].tolist()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_forward_matches_the_padded_model_in_eval_mode(family, fused):
    model = classifier(family).eval()
    encoded = encoded_rows(LENGTHS, token_types=family == "bert")
    rows = [2, 0, 4, 1, 3]
    padded = collate(encoded, rows, pad_token_id=1)
    with torch.no_grad():
        expected = model(padded["input_ids"], padded["attention_mask"], padded.get("token_type_ids"))
        _, got, _ = model.packed_loss_and_logits(collate_packed(encoded, rows), fused=fused)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_gradients_match_the_padded_model(family):
    """Without dropout, one training step's loss and every parameter's gradient are the padded model's."""
    grads = []
    for packed in (False, True):
        model = classifier(family, dropout=0.0).train()
        patch(model)
        encoded = encoded_rows(LENGTHS, seed=3, token_types=family == "bert")
        rows = [4, 2, 1, 0, 3]
        if packed:
            loss, _, _ = model.packed_loss_and_logits(collate_packed(encoded, rows))
        else:
            batch = collate(encoded, rows, pad_token_id=1)
            loss, _ = model.loss_and_logits(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                            batch.get("token_type_ids"))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_padded, padded), (loss_packed, packed) = grads
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-6, rtol=1e-6)
    assert padded.keys() == packed.keys()
    for name, grad in padded.items():
        if grad is None:  # parameters the padded forward never reaches (none in these families)
            assert packed[name] is None, name
            continue
        torch.testing.assert_close(packed[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_frozen_prefix_takes_no_gradient_and_its_output_can_be_reused():
    model = classifier("bert").train()
    patch(model)
    model.freeze(embeddings=True, layers=2)
    assert not model.stack.embeddings.training and not model.layers[1].training and model.layers[2].training
    encoded = encoded_rows(LENGTHS)
    batch = collate_packed(encoded, [1, 4, 0])
    torch.manual_seed(5)
    loss, _, prefix = model.packed_loss_and_logits(batch)
    loss.backward()
    assert prefix is not None and prefix.grad_fn is None and prefix.shape == (batch.num_tokens, 32)
    frozen = [p for m in (model.stack.embeddings, model.layers[0], model.layers[1]) for p in m.parameters()]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert all(p.grad is not None for p in model.layers[2].parameters())
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(5)  # the trainable layer's dropout draws the same masks
    reused, _, none = model.packed_loss_and_logits(batch, prefix=prefix)
    reused.backward()
    assert none is None
    torch.testing.assert_close(reused, loss, atol=0, rtol=0)
    for name, grad in first.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=0, rtol=0)


def test_freeze_rejects_more_layers_than_the_encoder_has():
    model = classifier("bert")
    with pytest.raises(ValueError, match="--freeze-layers 4"):
        model.freeze(embeddings=False, layers=4)


@pytest.mark.parametrize("unpadded", [True, False])
def test_checkpointing_with_a_frozen_prefix_still_trains_the_upper_layers(unpadded):
    """The known trap: reentrant checkpointing of a layer whose input needs no gradient silently returns none.
    fastcls checkpoints non-reentrantly, so the gradients equal those without checkpointing."""
    results = []
    for checkpointing in (False, True):
        model = classifier("bert").train()
        patch(model)
        if not unpadded:
            model.stack = None  # the padded path through the model's own layers
        model.freeze(embeddings=True, layers=1)
        if checkpointing:
            model.enable_checkpointing()
        encoded = encoded_rows(LENGTHS, seed=7)
        rows = [0, 1, 2, 3, 4]
        torch.manual_seed(9)
        if unpadded:
            loss, _, _ = model.packed_loss_and_logits(collate_packed(encoded, rows))
        else:
            batch = collate(encoded, rows, pad_token_id=1)
            loss, _ = model.loss_and_logits(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                            batch["token_type_ids"])
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


def test_unsupported_encoders_are_refused_by_the_stack():
    config = AutoConfig.for_model("bert", vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=37, is_decoder=True)
    encoder = AutoModel.from_config(config)
    assert not EncoderStack.supports(encoder)
    with pytest.raises(ValueError, match="not an encoder fastcls runs unpadded"):
        EncoderStack(encoder)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("frozen", [0, 1])
def test_a_cuda_training_step_never_waits_for_the_device(frozen):
    """The loop's step (unpadded batch to the GPU, bf16 forward and backward, clipping, fused AdamW, schedule)
    queues work and never reads a value back: torch's sync debug mode turns any host sync into an error."""
    from fastcls.components.lr_schedule import ScheduleConfig, build_scheduler
    from fastcls.components.optimizer import OptimizerConfig, build_optimizer
    from fastcls.components.precision import to_device

    device = torch.device("cuda")
    model = classifier("bert").to(device)
    model.freeze(embeddings=bool(frozen), layers=frozen)
    model.train()
    patch(model)
    optimizer = build_optimizer(model, OptimizerConfig())
    scheduler = build_scheduler(optimizer, ScheduleConfig(10, 2, "linear"))
    encoded = encoded_rows(LENGTHS * 4, seed=11)
    loss_sum = torch.zeros((), device=device)

    def step(rows):
        batch = to_device(collate_packed(encoded, rows), device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = model.packed_loss_and_logits(batch)
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
