"""The training loop: the step from batch to optimizer update, evaluation, keeping the best checkpoint.

`train(cfg)` composes the components (fastcls/components/) around one step (`TrainStep`, eager or replayed
from CUDA graphs):

    for each micro-batch: batch = collate(train_set, rows, packed=model.packed); step.micro(batch)
        (forward under autocast, scaler.scale(loss / grad_accum).backward(), the dropout generator's end_step)
    step.update(): clip, scaler.step(optimizer), scaler.update(), scheduler.step(), optimizer.zero_grad()
"""
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastcls.components import bf16_weights
from fastcls.components.callbacks import Callback, TrainState
from fastcls.components.checkpoint import Checkpointer, load_start
from fastcls.components.determinism import deterministic_mode, resolve_deterministic
from fastcls.components.distributed import FSDP_NEEDS_TORCHRUN, DataParallel, rank_report, rank_seed, setup
from fastcls.components.early_stopping import EarlyStopping
from fastcls.components.lr_schedule import DeviceLRSchedule, ScheduleConfig, build_scheduler, resolve_warmup_steps
from fastcls.components.metrics import MetricsLogger
from fastcls.components.output_path import check_output_folder
from fastcls.components.optimizer import OptimizerConfig, build_optimizer, describe_lr_decay, param_groups
from fastcls.components.precision import grad_scaler, resolve_precision
from fastcls.components.prefix_cache import frozen_report, prefix_cache_for
from fastcls.components.reporters import Reporter, report_callbacks
from fastcls.components.resume import Loop, Resumer, Training, data_digest, refill_prefix_cache
from fastcls.components.train_loss import TrainLoss
from fastcls.components.train_step import StepConfig, TrainStep, cuda_graphs_enabled, graph_report
from fastcls.components.training_data import read_training_data
from fastcls.config import TrainConfig
from fastcls.data import LabelMap, TaskLabels, bucket_length, collate
from fastcls.errors import ConfigError, TrainingError, TrainingInterrupted
from fastcls.evaluate import evaluate_logits, predict_logits
from fastcls.models.classifier import EncoderClassifier, choose_packed
from fastcls.models.loading import head_dropout, load_tokenizer, own_aligned_storage
from fastcls.models.reinit import reinit_top_layers
from fastcls.ops.dropout import DropoutGenerator, draw_seed, use_generator
from fastcls.optim import FusedAdamW

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output: Path
    model: nn.Module  # the kept checkpoint (the best evaluation's, or the last step's without a dev set), eval mode
    tokenizer: object
    labels: LabelMap | TaskLabels  # a multi-task run's: one label map per task
    steps: int
    best: dict | None  # dev metrics of the kept checkpoint
    train_samples_per_s: float
    train_tokens_per_s: float  # real tokens, padding excluded
    train_seconds: float
    total_seconds: float
    frozen: dict | None = None  # what freezing and the prefix cache did (None when nothing is frozen)
    max_length: int = 256

    @property
    def classifier(self):
        """The kept checkpoint as a `fastcls.Classifier` (predict / predict_proba on strings)."""
        from fastcls.inference import Classifier

        return Classifier(self.model, self.tokenizer, self.labels, self.max_length)


def _tokenizer_for(cfg: TrainConfig, encoder: nn.Module | None, tokenizer):
    if tokenizer is not None:
        return tokenizer
    source = cfg.model
    if encoder is not None and source is None:
        source = getattr(getattr(encoder, "config", None), "_name_or_path", None)
        if not source or not Path(source).is_dir():
            raise ConfigError("tokenizer: an encoder given as a module needs tokenizer= (or model= naming the "
                              "folder its tokenizer is in)")
    return load_tokenizer(source)


def _save_finite(run: Checkpointer, parallel: DataParallel, step: int) -> None:
    """Save the checkpoint unless a weight is non-finite (one host read per save): a run folder never holds a
    silently broken model. Under torchrun every rank calls it (FSDP2 gathers the weights) and rank 0 writes."""
    model, ddp = parallel.full_model(), parallel.ddp
    bad = None
    if model is not None and not bool(torch.stack([torch.isfinite(p.detach()).all() for p in model.parameters()]).all()):
        bad = next(name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all()))
    if ddp.agree(bad is not None):
        raise TrainingError(f"weights are non-finite at step {step} (first: {bad or 'see rank 0'}), so they were "
                            f"not saved; try a lower --lr or --precision fp32. {run.out} keeps the best checkpoint "
                            "so far")
    if ddp.is_main:
        run.save(model)
    ddp.barrier()  # the files are whole before any rank reads them


def _finite_loss(loss: float, step: int, run: Checkpointer, logger: MetricsLogger, lr: float | None = None) -> float:
    """`loss`, or a TrainingError when it is NaN or infinite. The loss sum on the device is the flag: a non-finite
    loss of any step since the last read stays in it, so reading it at logging steps and before every save checks
    every step without a host sync in the step itself (fastcls.components.train_loss)."""
    if not math.isfinite(loss):
        logger.close()
        at = f" (lr {lr:.3g})" if lr is not None else ""
        raise TrainingError(f"training loss is {loss} at step {step}{at}; try a lower --lr or --precision fp32. The "
                            f"best checkpoint so far stays in {run.out}")
    return loss


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(cfg: TrainConfig, *, encoder: nn.Module | None = None, tokenizer=None,
          optimizer_factory: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
          scheduler_factory: Callable[[torch.optim.Optimizer, int], object] | None = None,
          callbacks: Sequence[Callback] = (), resume: bool = False) -> TrainResult:
    """Fine-tune on `cfg` (left unchanged) and return the kept checkpoint loaded; see `fastcls.train` for the
    keyword arguments. `resume`: continue the run in `cfg.output` from its newest resumable checkpoint, `cfg`
    being its settings (`fastcls.components.resume.resumed_config`). Torch's global RNG state is restored
    afterwards."""
    # an encoder given as a module is not the bundled model: `model` then only names where its tokenizer is
    cfg = cfg.resolve(bundled_model=encoder is None)
    ddp, device = setup(cfg.device)  # under torchrun: this process's rank and GPU; else one process
    reporters = []
    try:
        reporters = report_callbacks(cfg, ddp.is_main)  # a missing package stops the run here, before any work
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            return _train(cfg, device, ddp, encoder, tokenizer, optimizer_factory, scheduler_factory,
                          [*callbacks, *reporters], resume)
    finally:
        for reporter in reporters:  # what a failing run logged so far stays readable
            reporter.close()
        ddp.close()


def _train(cfg, device, ddp, encoder, tokenizer, optimizer_factory, scheduler_factory, callbacks,
           resume) -> TrainResult:
    start = time.perf_counter()
    precision = resolve_precision(cfg.precision, device)
    custom = (optimizer_factory is not None, scheduler_factory is not None)
    cuda_graphs_enabled(cfg.cuda_graphs, device, precision, *custom, ddp)
    if cfg.fsdp and not ddp.enabled:
        raise ConfigError(FSDP_NEEDS_TORCHRUN)
    run = Checkpointer(cfg.output)
    if not cfg.overwrite and not resume and run.holds_a_model():  # a resumed run continues in its own folder
        raise ConfigError(f"--output {run.out} already holds a model; choose another folder or pass --overwrite")
    # a folder of the user's own files would get a run's config.json and metrics.jsonl written over them
    check_output_folder(run.out, cfg.overwrite or resume)
    ddp.barrier()  # every rank has checked the folder before rank 0 writes into it

    tokenizer = _tokenizer_for(cfg, encoder, tokenizer)
    data = read_training_data(cfg, tokenizer)
    train_set, dev_set, labels, skipped_rows = data.train, data.dev, data.labels, data.skipped_rows
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    encoder, head = load_start(cfg.model, labels) if encoder is None else (own_aligned_storage(encoder), None)
    reinit_top_layers(encoder, cfg.reinit_layers, cfg.seed, cfg.freeze_layers)  # task layers copy the re-drawn ones
    wants_cache = cfg.freeze_embeddings and cfg.cache_frozen
    dropout = head_dropout(getattr(encoder, "config", None)) if cfg.dropout is None else cfg.dropout
    model = EncoderClassifier(encoder, None if data.tasks else len(labels), dropout, head_impl=cfg.head_impl,
                              kernels=cfg.kernels, packed=choose_packed(cfg.unpad, encoder, device, wants_cache),
                              tasks=data.tasks, pooling=cfg.pooling).to(device)
    if head is not None:  # --model: a run of these labels
        model.head.linear.load_state_dict(head)
    model.freeze(cfg.freeze_embeddings, cfg.freeze_layers)
    if cfg.grad_checkpointing:
        model.enable_checkpointing()
    model.train()
    parallel = DataParallel(model, ddp, device, fsdp=cfg.fsdp, precision=precision)
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.layer_lr_decay)
    bf16 = bf16_weights.applies(device, precision, cfg.grad_accum, ddp.enabled, optimizer_factory is not None)
    optimizer = build_optimizer(groups, OptimizerConfig(lr=cfg.lr, bias_correction=cfg.bias_correction,
                                                        master_weights=bf16, max_grad_norm=cfg.max_grad_norm),
                                sharded=cfg.fsdp, factory=optimizer_factory)
    weights = bf16_weights.Bf16Weights(model, optimizer) if bf16 else None
    if isinstance(optimizer, FusedAdamW):
        # untouched embedding rows skip steps until read (fastcls.optim.deferred_rows): the loop brings them up to
        # date before it evaluates or saves, when a callback reads the model or optimizer from the state, and at
        # its end
        optimizer.defer_untouched_rows = True
    sync_rows = optimizer.sync_deferred_rows if isinstance(optimizer, FusedAdamW) else lambda: None
    # every rank cuts the same global batches and runs its share of each (fastcls.components.distributed)
    batches = data.batches(cfg, ddp.world_size)
    steps_per_epoch = math.ceil(len(batches) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    scaler = grad_scaler(device, precision)
    eval_every = cfg.eval_every or steps_per_epoch
    fresh = data.augmentation is not None and data.augmentation.fresh  # rows that change every epoch: never cached
    cache, no_cache_reason = prefix_cache_for(model, train_set, device, math.ceil(total_steps / steps_per_epoch),
                                              cfg.cache_frozen, cfg.cache_budget_gb, fresh)
    graphs = cuda_graphs_enabled(cfg.cuda_graphs, device, precision, *custom, ddp, model, cache)
    schedule = ScheduleConfig(total_steps, resolve_warmup_steps(cfg.warmup, total_steps), cfg.decay)
    if scheduler_factory is not None:
        scheduler = scheduler_factory(optimizer, total_steps)
    else:  # graphs: the rate lives on the device, so that a replayed update reads the step's own
        scheduler = DeviceLRSchedule(optimizer, schedule) if graphs else build_scheduler(optimizer, schedule)
    if graphs:
        model.body.row_accumulated_embedding = False  # its buffer bookkeeping is host-side
    generator = DropoutGenerator(rank_seed(draw_seed(), ddp), device)
    step = TrainStep(parallel, optimizer, scheduler, scaler, generator,
                     StepConfig(cfg.grad_accum, cfg.max_grad_norm, precision, graphs), device)

    train_config = {**cfg.to_dict(), "resolved_precision": precision, "device": str(device),
                    "world_size": ddp.world_size}
    resumer = Resumer(run.out, cfg.save_every, cfg.save_total_limit, ddp, sharded=cfg.fsdp)
    if ddp.is_main and not resume:
        resumer.discard_all()
        run.write_static(model, tokenizer, labels, {"max_length": cfg.max_length, "text_columns": cfg.text_columns,
                                                     "text_pair_column": cfg.text_pair_column,
                                                     **({"label_columns": data.label_columns} if data.tasks else {})},
                          train_config)
    elif ddp.is_main:
        run.write_train_config(train_config)
    logger = MetricsLogger(run.metrics_path, total_steps, device, enabled=ddp.is_main)
    processes = (f", {ddp.world_size} processes ({'FSDP2' if cfg.fsdp else 'DDP'}), global batch "
                 f"{cfg.batch_size * ddp.world_size}" if ddp.enabled else "")
    logger.write(f"fastcls: {data.describe(batches)}, {total_steps} steps, "
                 f"{device} {precision}{' (bf16 weights, fp32 masters)' if bf16 else ''}{processes}, "
                 f"{'unpadded' if model.packed else 'padded'} batches"
                 f"{', CUDA graphs' if graphs else ''}{describe_lr_decay(groups, cfg.lr, cfg.layer_lr_decay)}, "
                 f"{train_set.num_truncated} rows truncated to --max-length "
                 f"{cfg.max_length}")
    if data.augmentation is not None:
        logger.write(data.augmentation.describe())
    state = TrainState(model, optimizer, total_steps, run.out, before_read=sync_rows)
    stopping = EarlyStopping(cfg.metric, cfg.patience, cfg.metric_task)
    training = Training(model, optimizer, scheduler, scaler, generator, state, stopping, step.loss_sum,
                        data_digest(train_set))
    loop, threads = Loop(), None
    if resume:  # the newest checkpoint's state, and the run folder as it was then
        loop, threads = resumer.load_newest(training)
        logger.write(f"resumed from {resumer.loaded}: step {state.step}, epoch {state.epoch}")
    for callback in callbacks:
        callback.on_train_begin(state)

    samples, tokens, padded_tokens, rank_tokens = loop.samples, loop.tokens, loop.padded_tokens, loop.rank_tokens
    train_seconds, epoch_seconds, epoch_start, first_micro = (loop.train_seconds, loop.epoch_seconds,
                                                              loop.epoch_start, loop.micro)
    loss = TrainLoss(step.loss_sum, ddp, loop.loss)
    tick = time.perf_counter()
    with (use_generator(generator), resumer.signals,
          deterministic_mode(resolve_deterministic(cfg.deterministic, device), device, threads)):
        if resume and cache is not None:  # what the interrupted run had cached
            refill_prefix_cache(model, train_set, batches, state.epoch, first_micro, device, precision, pad_id, ddp)
        while state.step < total_steps and not state.should_stop:
            # fresh EDA copies: this epoch's own
            train_set = data.train_for(state.epoch, last=(state.epoch + 1) * steps_per_epoch >= total_steps)
            micro_batches = batches.batches(state.epoch)
            if not first_micro:  # a resumed epoch keeps its start
                epoch_start = train_seconds + time.perf_counter() - tick
            for i, global_rows in enumerate(micro_batches[first_micro:], start=first_micro):
                rows, weight, counts = data.share(global_rows, ddp)  # all of them in a single process
                shape = None
                if graphs:  # a few fixed shapes, each replayed from its own graph
                    shape = (cfg.batch_size, bucket_length(int(train_set.lengths[rows].max()), cfg.max_length))
                batch = data.with_counts(collate(train_set, rows, packed=model.packed, pad_token_id=pad_id,
                                                 shape=shape), counts)
                accumulating = (i + 1) % cfg.grad_accum and i + 1 < len(micro_batches)
                step.micro(batch, weight, sync=not accumulating)
                loss.add()
                samples += len(global_rows)
                tokens += int(train_set.lengths[global_rows].sum())
                rank_tokens += int(train_set.lengths[rows].sum()) if weight else 0
                padded_tokens += batch.num_tokens
                if accumulating:
                    continue
                step.update()
                state.step += 1
                logger.step()

                if state.step % cfg.log_every == 0 or state.step == total_steps:
                    lr = (scheduler.lrs_after(state.step)[0] if isinstance(scheduler, DeviceLRSchedule)
                          else optimizer.param_groups[0]["lr"])  # the device schedule's without a sync
                    state.last_loss = _finite_loss(loss.since_logged(), state.step, run, logger, lr)
                    record = logger.train(state.step, round(state.step / steps_per_epoch, 4), state.last_loss, lr,
                                          samples, tokens, train_seconds + time.perf_counter() - tick)
                    for callback in callbacks:
                        callback.on_log(state, record)
                if dev_set is not None and (state.step % eval_every == 0 or state.step == total_steps):
                    sync_rows()  # training's work (the steps the rows skipped), before the evaluation reads them
                    train_seconds += time.perf_counter() - tick
                    record = {"kind": "eval", "step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
                              "train_loss": _finite_loss(loss.since_evaluation(), state.step, run, logger),
                              "samples_per_s": samples / train_seconds}
                    report = evaluate_logits(predict_logits(model, dev_set, cfg.eval_batch_size, device, precision,
                                                            pad_id, ddp), dev_set, labels)
                    record.update(report, dev_loss=report.pop("loss"))
                    logger.evaluation(record)
                    state.log.append(record)
                    if stopping.improved(record):
                        state.best = record
                        _save_finite(run, parallel, state.step)
                        for callback in callbacks:
                            callback.on_save(state, run.out)
                    for callback in callbacks:
                        callback.on_evaluate(state, record)
                    if stopping.should_stop:
                        logger.write(f"early stop: no {cfg.metric} gain in {cfg.patience} evaluations")
                        state.should_stop = True
                    tick = time.perf_counter()
                for callback in callbacks:
                    callback.on_step_end(state)
                if ddp.enabled and any(not isinstance(c, Reporter) for c in callbacks):  # a stop on one rank stops all
                    state.should_stop = ddp.agree(state.should_stop)
                # --save-every, or SIGINT/SIGTERM; on CUDA the ranks agree on a signal at logging steps only, which
                # read the device anyway
                if resumer.due(state.step, device.type == "cpu" or state.step % cfg.log_every == 0):
                    sync_rows()
                    saving = time.perf_counter()
                    loop = Loop(i + 1, samples, tokens, padded_tokens, rank_tokens, train_seconds + saving - tick,
                                epoch_start, epoch_seconds, loss.state_dict())
                    saved = resumer.save(training, loop, state.epoch)
                    tick += time.perf_counter() - saving  # saving is not training time
                    if resumer.stop_signal is not None:
                        logger.close()
                        raise TrainingInterrupted(resumer.stop_signal, state.step, saved, run.out)
                if state.step >= total_steps or state.should_stop:
                    break
            first_micro = 0
            _synchronize(device)  # once an epoch, so that the epoch's time is the device's
            epoch_seconds.append(train_seconds + time.perf_counter() - tick - epoch_start)
            state.epoch += 1
    sync_rows()
    logger.close()
    if dev_set is None or stopping.best is None:  # no dev set, or a callback stopped before any evaluation
        train_seconds += time.perf_counter() - tick
        _finite_loss(loss.since_evaluation(), state.step, run, logger)
        _save_finite(run, parallel, state.step)
        for callback in callbacks:
            callback.on_save(state, run.out)
    frozen = frozen_report(model, cache, no_cache_reason, epoch_seconds)
    if cache is not None:
        model.body.use_prefix_cache(None, None)
        cache.close()
    if data.augmentation is not None:
        data.augmentation.close()
    ranks = rank_report(ddp, rank_tokens, padded_tokens, step.forward_seconds, cfg.batch_size)
    if cfg.fsdp:  # the kept model is rank 0's whole copy; the other ranks return their shards
        full = parallel.full_model()
        model = full if full is not None else model
    if weights is not None:
        weights.restore()
    if (stopping.best or {}).get("step", state.step) != state.step and not (cfg.fsdp and not ddp.is_main):
        run.load_into(model)  # the kept checkpoint is an earlier step's than the last
    model.eval()
    train_seconds = max(train_seconds, 1e-9)
    result = TrainResult(run.out, model, tokenizer, labels, state.step, stopping.best, samples / train_seconds,
                         tokens / train_seconds, train_seconds, time.perf_counter() - start, frozen, cfg.max_length)
    if ddp.is_main:
        run.write_state({"steps": state.step, "best": stopping.best, "train_samples_per_s": result.train_samples_per_s,
                         "train_tokens_per_s": result.train_tokens_per_s, "train_seconds": train_seconds,
                         "total_seconds": result.total_seconds, "epoch_seconds": epoch_seconds, "frozen": frozen,
                         "distributed": ranks, "skipped_rows": skipped_rows,
                         "augment_wait_seconds": data.augmentation.waited_seconds if data.augmentation else None,
                         "cuda_graphs": graph_report(step, tokens, padded_tokens) if graphs else None})
    if frozen is not None and ddp.is_main:
        log.info("frozen: " + ", ".join(f"{k} {v}" for k, v in frozen.items()))
    for callback in callbacks:
        callback.on_train_end(state)
    return result
