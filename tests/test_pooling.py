"""--pooling mean: the pooled vector equals the mean of the transformers model's own last hidden states over the
attention mask, on both batch layouts, through the model's own forward, with task layers and with every layer
frozen, gradients included; training, the run folder, fastcls.load and the export (transformers' custom code)
keep the pooling."""
import inspect
import json

import pytest
import torch
from tiny import encoded_rows, make_tiny_encoder, sst2_rows, tiny_encoder, write_tsv
from transformers import AutoModelForSequenceClassification, pipeline

import fastcls
from fastcls.cli import main
from fastcls.components.checkpoint import load_run
from fastcls.config import TrainConfig
from fastcls.data import collate, read_examples, tokenize_examples
from fastcls.export import export_hf
from fastcls.models.classifier import EncoderClassifier, Tasks
from fastcls.models.encoder import LayerwiseEncoder, OwnForwardEncoder
from fastcls.models.families import encoder_layers
from fastcls.models.pooling import mean_pool
from fastcls.models.task_layers import TaskLayers, encoder_for_task
from fastcls.trainer import train

LENGTHS = [7, 1, 12, 4, 9]
ROWS = [2, 0, 4, 1, 3]


def batch_of(family, packed, seed=0):
    encoded = encoded_rows(LENGTHS, seed=seed, token_types=family == "bert")
    return collate(encoded, ROWS, packed=packed, pad_token_id=1)


def reference_mean(encoder, batch):
    """The transformers forward's last hidden states, averaged over the attention mask."""
    inputs = batch.padded_inputs()
    takes = inspect.signature(encoder.forward).parameters
    hidden = encoder(**{k: v for k, v in inputs.items() if k in takes}).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def mean_model(family, layers=3, dropout=0.0, dtype=torch.float64, packed=False, kernels=True):
    encoder = tiny_encoder(family, dropout, layers)
    return EncoderClassifier(encoder, 3, dropout, packed=packed, kernels=kernels, pooling="mean").to(dtype)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "mpnet"])
def test_mean_pooling_equals_the_models_own_hidden_states_averaged(family, packed):
    if family == "mpnet" and packed:
        pytest.skip("MPNet runs its own forward, on padded batches only")
    model = mean_model(family, packed=packed).eval()
    assert isinstance(model.body, OwnForwardEncoder if family == "mpnet" else LayerwiseEncoder)
    batch = batch_of(family, packed)
    with torch.no_grad():
        got = model.body.pooled(batch)
        expected = reference_mean(model.encoder, batch_of(family, packed=False))
    assert got.shape == (len(ROWS), 32) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("kernels", "checkpointing"), [(False, False), (False, True), (True, False)],
                         ids=["torch-ops", "torch-ops-checkpointed", "kernels"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_mean_pooling_gradients_equal_the_references(family, packed, kernels, checkpointing):
    """float64, every parameter's gradient against autograd through the transformers forward and the masked mean
    (fastcls's LayerNorm kernels are exact to fp32's precision only, also on float64 tensors)."""
    if family == "mpnet" and packed:
        pytest.skip("MPNet runs its own forward, on padded batches only")
    model = mean_model(family, packed=packed, kernels=kernels).train()
    if checkpointing:
        model.enable_checkpointing()
    batch = batch_of(family, packed)
    weights = torch.randn(len(ROWS), 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (model.body.pooled(batch) * weights).sum().backward()
    got = {name: p.grad.clone() for name, p in model.encoder.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    (reference_mean(model.encoder, batch_of(family, packed=False)) * weights).sum().backward()
    expected = {name: p.grad for name, p in model.encoder.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and len(got) > 10
    tol = {"atol": 1e-5, "rtol": 1e-5} if kernels else {"atol": 1e-10, "rtol": 1e-9}
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, **tol, msg=name)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_every_layer_frozen_pools_the_frozen_output(packed):
    model = mean_model("bert", packed=packed)
    model.freeze(True, 3)
    batch = batch_of("bert", packed)
    with torch.no_grad():
        expected = reference_mean(model.encoder, batch_of("bert", packed=False))
        torch.testing.assert_close(model.body.pooled(batch), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "loop"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_task_layers_pool_each_tasks_mean(family, packed, batched):
    encoder = tiny_encoder(family, 0.0, 3).double()
    task_layers = TaskLayers.from_encoder(encoder, 2, 1)
    task_layers.batched = batched
    with torch.no_grad():
        for p in task_layers.copies[1].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) * 0.2)
    body = LayerwiseEncoder(encoder, kernels=False, pooling="mean")
    body.use_task_layers(task_layers)
    batch = batch_of(family, packed)
    weights = torch.randn(2, len(ROWS), 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = body.pooled(batch)
    assert got.shape == (2, len(ROWS), 32)
    (got * weights).sum().backward()
    shared = {name: torch.zeros_like(p) for name, p in encoder.named_parameters()}
    for t in range(2):
        standalone = encoder_for_task(encoder, task_layers, t)
        expected = reference_mean(standalone, batch_of(family, packed=False))
        torch.testing.assert_close(got[t], expected, atol=1e-12, rtol=1e-12)
        (expected * weights[t]).sum().backward()
        for (name, p), ref in zip(task_layers.copies[t][0].named_parameters(),
                                  encoder_layers(standalone)[-1].parameters(), strict=True):
            torch.testing.assert_close(p.grad, ref.grad, atol=1e-10, rtol=1e-9, msg=name)
        for name, p in standalone.named_parameters():
            if name in shared and p.grad is not None:
                shared[name] += p.grad
    for name, p in encoder.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, shared[name], atol=1e-10, rtol=1e-9, msg=name)


@pytest.mark.parametrize("task_layers", [0, 1])
def test_multi_task_heads_fused_and_reference_agree_on_the_mean(task_layers):
    """The multi-task head takes the pooled vectors ([rows, d] shared, or [tasks, rows, d] from task layers) as it
    takes h_CLS: loss, logits and every gradient alike for both implementations."""
    encoded = encoded_rows(LENGTHS, token_types=True)
    labels = torch.tensor([[0, 1], [2, -100], [1, 0], [-100, 1], [0, 0]])
    results = []
    for impl in ("fused", "reference"):
        model = EncoderClassifier(tiny_encoder("bert", 0.0, 3), None, 0.0, head_impl=impl, packed=True,
                                  tasks=Tasks(["a", "b"], [3, 2], task_layers=task_layers), pooling="mean")
        batch = collate(encoded, ROWS, packed=True, pad_token_id=1, labels=False)
        batch.labels = labels
        loss, logits = model(batch)
        loss.backward()
        results.append((loss, logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_bf16_hidden_states_are_summed_in_fp32(packed):
    batch = batch_of("bert", packed)
    h = torch.randn(batch.num_tokens, 32, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16) * 50 + 100
    got = mean_pool(h, batch)
    assert got.dtype == torch.bfloat16
    padded_mask = batch.key_mask
    tokens = h.float()
    expected = torch.stack([tokens[batch.cls_index[r]:batch.cls_index[r] + int(padded_mask[r].sum())].mean(0)
                            for r in range(batch.num_rows)]) if packed else \
        torch.stack([tokens.view(batch.num_rows, batch.max_len, -1)[r, padded_mask[r]].mean(0)
                     for r in range(batch.num_rows)])
    assert torch.equal(got, expected.to(torch.bfloat16))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def sst(tmp_path_factory):
    return write_tsv(tmp_path_factory.mktemp("data") / "train.tsv", sst2_rows(24, seed=3))


def _train(model, data, output, **settings):
    settings = {**dict(epochs=1, batch_size=8, lr=1e-3, seed=0, precision="fp32",
                       label_names=["negative", "positive"]), **settings}
    return train(TrainConfig(model=str(model), train=str(data), dev=str(data), output=str(output), **settings))


def _padded_batch(folder, data):
    model, tokenizer, labels, meta = load_run(folder)
    label_map = labels.maps[0] if "tasks" in meta else labels  # the data's labels are the first task's
    encoded = tokenize_examples(read_examples(data), tokenizer, meta["max_length"], label_map=label_map)
    return model, collate(encoded, range(len(encoded)), packed=False, pad_token_id=0, labels=False)


def test_fused_and_reference_heads_train_the_same_mean_pooled_weights(tiny_bert, sst, tmp_path):
    runs = {impl: _train(tiny_bert, sst, tmp_path / impl, head_impl=impl, pooling="mean", dropout=0.0, max_steps=4)
            for impl in ("fused", "reference")}
    fused, reference = (dict(runs[impl].model.named_parameters()) for impl in ("fused", "reference"))
    assert runs["fused"].model.pooling == "mean"
    for name, p in fused.items():
        torch.testing.assert_close(p, reference[name], atol=2e-5, rtol=1e-4, msg=name)
    cls = _train(tiny_bert, sst, tmp_path / "cls", dropout=0.0, max_steps=4).model
    assert not torch.allclose(cls.head.linear.weight, runs["fused"].model.head.linear.weight, atol=1e-4)


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "mpnet"])
def test_mean_pooled_run_folder_and_export_load_with_their_pooling(model_type, sst, tmp_path):
    encoder = make_tiny_encoder(tmp_path / "enc", model_type)
    result = _train(encoder, sst, tmp_path / "out", pooling="mean")
    assert json.loads((result.output / "fastcls.json").read_text())["pooling"] == "mean"
    model, batch = _padded_batch(result.output, sst)
    assert model.pooling == "mean"
    texts = [sentence for _, sentence in sst2_rows(24, seed=3)]
    with torch.no_grad():
        expected = torch.softmax(model(batch)[1], -1)
        trained = torch.softmax(result.model.eval()(batch)[1], -1)
    torch.testing.assert_close(expected, trained, atol=1e-6, rtol=1e-5)
    loaded = fastcls.load(result.output, precision="fp32")
    torch.testing.assert_close(torch.from_numpy(loaded.predict_proba(texts)), expected, atol=1e-5, rtol=1e-4)
    predictions = tmp_path / "p.jsonl"
    assert main(["predict", "--model", str(result.output), "--data", str(sst), "--output", str(predictions),
                 "--precision", "fp32"]) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    got = torch.tensor([[row["probabilities"][name] for name in ("negative", "positive")] for row in rows])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    inputs = {k: v for k, v in batch.padded_inputs().items() if k != "token_type_ids" or model_type == "bert"}
    for folder in (result.output, export_hf(result.output, tmp_path / "hf")):
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=False)
        hf = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
        assert hf.config.id2label == {0: "negative", 1: "positive"}
        with torch.no_grad():
            torch.testing.assert_close(torch.softmax(hf(**inputs).logits, -1), expected, atol=2e-5, rtol=1e-4)
    if model_type == "bert":  # an export continues training as any encoder folder does
        again = _train(tmp_path / "hf", sst, tmp_path / "again", pooling="mean", max_steps=1, lr=1e-9)
        for name, p in again.model.encoder.named_parameters():
            torch.testing.assert_close(p, model.encoder.get_parameter(name), atol=1e-6, rtol=0, msg=name)
    classify = pipeline("text-classification", model=str(tmp_path / "hf"), trust_remote_code=True)
    answers = classify(texts[:4])
    assert [a["label"] for a in answers] == [["negative", "positive"][k] for k in expected[:4].argmax(-1).tolist()]
    torch.testing.assert_close(torch.tensor([a["score"] for a in answers]), expected[:4].max(-1).values,
                               atol=2e-5, rtol=1e-4)


def test_a_run_folder_without_pooling_loads_as_cls(tiny_bert, sst, tmp_path):
    result = _train(tiny_bert, sst, tmp_path / "out")
    meta_path = result.output / "fastcls.json"
    meta = json.loads(meta_path.read_text())
    assert meta.pop("pooling") == "cls"
    meta_path.write_text(json.dumps(meta))
    model, batch = _padded_batch(result.output, sst)
    assert model.pooling == "cls"
    with torch.no_grad():
        torch.testing.assert_close(model(batch)[1], result.model.eval()(batch)[1], atol=1e-6, rtol=1e-5)
    hf = AutoModelForSequenceClassification.from_pretrained(result.output).eval()  # the family's own head
    assert type(hf).__name__ == "BertForSequenceClassification"


def test_multi_task_mean_pooled_task_exports(tiny_bert, sst, tmp_path):
    rows = [["long" if len(s.split()) > 12 else "short", s] for _, s in sst2_rows(16, seed=2)]
    size = write_tsv(tmp_path / "size.tsv", rows, header=("bucket", "text"))
    result = train(TrainConfig(model=str(tiny_bert), tasks=[f"sent={sst}", f"size={size},{size}:bucket"],
                               task_layers=1, pooling="mean", output=str(tmp_path / "run"), epochs=1, batch_size=8,
                               lr=1e-3, precision="fp32", seed=5))
    model, batch = _padded_batch(result.output, sst)
    assert model.pooling == "mean"
    with torch.no_grad():
        logits = model(batch)[1]
    labels = load_run(result.output)[2]
    for t, task in enumerate(labels.names):
        folder = tmp_path / f"hf_{task}"
        assert main(["export", "--model", str(result.output), "--output", str(folder), "--task", task]) == 0
        hf = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            got = torch.softmax(hf(**batch.padded_inputs()).logits, -1)
        torch.testing.assert_close(got, torch.softmax(labels.task_logits(logits, t), -1), atol=2e-5, rtol=1e-4)


def test_a_bad_pooling_flag_is_one_line_and_exit_2(tiny_bert, sst, tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["train", "--model", str(tiny_bert), "--train", str(sst), "--output", str(tmp_path / "out"),
              "--pooling", "max"])
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--pooling" in err[0] and "'max'" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_bad_pooling_setting_is_one_line_and_exit_2(tiny_bert, sst, tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"pooling": "max"}))
    capsys.readouterr()
    assert main(["train", "--model", str(tiny_bert), "--train", str(sst), "--output", str(tmp_path / "out"),
                 "--config", str(config)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["fastcls train: error: --pooling must be one of cls, mean, got 'max'"], err
    assert not (tmp_path / "out").exists()
