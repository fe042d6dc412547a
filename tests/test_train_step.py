"""The training step on fixed shapes: bucketed batches change no result, and steps replayed from CUDA graphs equal
eager steps (CUDA cases run where a GPU is present)."""
import numpy as np
import pytest
import torch
from tiny import encoded_rows, sst2_rows, tiny_encoder, write_tsv

from fastcls.cli import main
from fastcls.components.lr_schedule import DeviceLRSchedule, ScheduleConfig
from fastcls.components.train_step import StepConfig, TrainStep
from fastcls.data import bucket_length, collate
from fastcls.models.classifier import EncoderClassifier
from fastcls.ops.dropout import DropoutGenerator, use_generator
from fastcls.optim import FusedAdamW

LENGTHS = [7, 1, 12, 4, 9, 30, 17]


def test_bucket_lengths_are_few_cover_the_length_and_stay_within_the_maximum():
    for max_length in (16, 100, 128, 512):
        buckets = [bucket_length(n, max_length) for n in range(1, max_length + 1)]
        assert all(n <= b <= max_length for n, b in zip(range(1, max_length + 1), buckets))
        assert buckets == sorted(buckets) and len(set(buckets)) <= 20
        assert all(b <= max(n * 4 // 3, n + 8) for n, b in zip(range(1, max_length + 1), buckets))


def test_a_batch_padded_to_a_bucket_and_filler_rows_gives_the_same_loss_and_gradients():
    encoded = encoded_rows(LENGTHS, seed=3)
    rows = [0, 2, 4, 5]
    results = []
    for shape in (None, (6, bucket_length(30, 64))):
        model = EncoderClassifier(tiny_encoder("bert", dropout=0.0), num_labels=3, dropout=0.0).train()
        batch = collate(encoded, rows, packed=False, pad_token_id=1, shape=shape)
        loss, logits = model(batch)
        loss.backward()
        results.append((loss.detach(), logits[:len(rows)].detach(),
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        if shape is not None:
            assert batch.num_rows == 6 and batch.max_len == 32
            assert batch.labels.tolist()[len(rows):] == [-100, -100]
            assert batch.key_mask[len(rows):].sum(1).tolist() == [1, 1]
    (loss, logits, grads), (b_loss, b_logits, b_grads) = results
    torch.testing.assert_close(b_loss, loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b_logits, logits, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(b_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_collate_refuses_a_shape_smaller_than_the_batch():
    with pytest.raises(ValueError, match="cannot pad 3 rows"):
        collate(encoded_rows(LENGTHS), [0, 1, 2], packed=False, pad_token_id=1, shape=(2, 16))


def test_cuda_graphs_on_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(8))
    code = main(["train", "--train", str(data), "--output", str(tmp_path / "run"), "--cuda-graphs", "on",
                 "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--cuda-graphs on needs a CUDA device" in err[0]


def _steps(graphs: bool, n_steps: int, device):
    torch.manual_seed(0)
    model = EncoderClassifier(tiny_encoder("bert", dropout=0.1), num_labels=3, dropout=0.1).to(device).train()
    model.body.row_accumulated_embedding = False
    optimizer = FusedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    schedule = DeviceLRSchedule(optimizer, ScheduleConfig(n_steps, 2))
    generator = DropoutGenerator(11, device)
    step = TrainStep(model, optimizer, schedule, torch.amp.GradScaler("cuda", enabled=False), generator,
                     StepConfig(grad_accum=2, max_grad_norm=1.0, precision="bf16", cuda_graphs=graphs), device)
    encoded = encoded_rows(LENGTHS * 4, seed=5)
    order = np.random.default_rng(0).permutation(len(LENGTHS) * 4)
    losses = []
    with use_generator(generator):
        for i in range(n_steps):
            for half in range(2):
                rows = order[(2 * i + half) * 3 % 27:][:3]
                shape = (4, bucket_length(int(encoded.lengths[rows].max()), 64))
                step.micro(collate(encoded, rows, packed=False, pad_token_id=1, shape=shape))
            step.update()
            losses.append(step.loss_sum.item())
            step.loss_sum.zero_()
    return losses, {n: p.detach().float().cpu() for n, p in model.named_parameters()}, step.report


@pytest.mark.cuda
def test_steps_replayed_from_cuda_graphs_equal_eager_steps():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    eager_losses, eager_params, _ = _steps(False, 8, device)
    graph_losses, graph_params, report = _steps(True, 8, device)
    assert report.graphs >= 2 and report.replays > report.graphs
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=2e-2, atol=2e-2)
    for name, value in eager_params.items():
        torch.testing.assert_close(graph_params[name], value, atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.cuda
def test_a_replayed_cuda_step_never_waits_for_the_device():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    _steps(True, 3, device)  # compiles and captures
    torch.cuda.set_sync_debug_mode("error")
    try:
        model = EncoderClassifier(tiny_encoder("bert", dropout=0.1), num_labels=3, dropout=0.1).to(device).train()
        model.body.row_accumulated_embedding = False
        optimizer = FusedAdamW(list(model.parameters()), lr=1e-3)
        schedule = DeviceLRSchedule(optimizer, ScheduleConfig(10, 2))
        generator = DropoutGenerator(3, device)
        step = TrainStep(model, optimizer, schedule, torch.amp.GradScaler("cuda", enabled=False), generator,
                         StepConfig(precision="bf16", cuda_graphs=True), device)
        encoded = encoded_rows(LENGTHS, seed=1)
        with use_generator(generator):
            torch.cuda.set_sync_debug_mode("default")  # the first two occurrences compile, build and capture
            for _ in range(2):
                step.micro(collate(encoded, [0, 1, 2], packed=False, pad_token_id=1, shape=(4, 16)))
                step.update()
            torch.cuda.set_sync_debug_mode("error")
            for _ in range(3):
                step.micro(collate(encoded, [3, 4, 6], packed=False, pad_token_id=1, shape=(4, 16)))
                step.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
