"""The training loop: tokenise once, length-grouped batches, autocast, AdamW, warmup/decay, evaluate, keep the best."""
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastcls.components.checkpoint import (
    append_jsonl,
    save_json_atomic,
    save_weights_atomic,
)
from fastcls.components.host_memory import keep_freed_host_memory
from fastcls.components.lr_schedule import (
    ScheduleConfig,
    build_scheduler,
    resolve_warmup_steps,
)
from fastcls.components.optimizer import OptimizerConfig, build_optimizer
from fastcls.components.precision import (
    autocast,
    grad_scaler,
    resolve_device,
    resolve_precision,
    to_device,
)
from fastcls.components.prefix_cache import PrefixCache
from fastcls.config import TrainConfig
from fastcls.data import (
    LabelMap,
    LengthGroupedBatches,
    collate,
    collate_packed,
    read_examples,
    tokenize_examples,
)
from fastcls.errors import TrainingError
from fastcls.evaluate import evaluate_logits, predict_logits
from fastcls.model import (
    FASTCLS_FILE,
    WEIGHTS_FILE,
    build_classifier,
    load_tokenizer,
    save_static_files,
)
from fastcls.patching import patch


@dataclass
class TrainResult:
    output: Path
    model: torch.nn.Module  # as it stands after the last step (the kept checkpoint may be an earlier one)
    steps: int
    best: dict | None  # dev metrics of the kept checkpoint
    train_samples_per_s: float
    train_tokens_per_s: float  # real tokens, padding excluded
    train_seconds: float
    total_seconds: float
    frozen: dict | None = None  # what freezing and the prefix cache did (None when nothing is frozen)


def _read(path, cfg: TrainConfig):
    return read_examples(
        path, text_columns=cfg.text_columns, text_pair_column=cfg.text_pair_column, label_column=cfg.label_column
    )


def _prefix_cache(cfg: TrainConfig, model, train_set, device, epochs: int, unpadded: bool):
    """(the cache of the frozen prefix's output per training row, or None; why not, when None)."""
    if not model.frozen_embeddings:
        return None, "nothing to cache: the embeddings train"
    if not cfg.cache_frozen:
        return None, "off (--no-cache-frozen)"
    if not unpadded:
        return None, ("needs the unpadded path (--unpad off)" if model.stack is not None
                      else f"{type(model.encoder).__name__} has no unpadded path")
    if epochs < 2:
        return None, "one epoch: every row is seen once"
    hidden = model.encoder.config.hidden_size
    return PrefixCache(train_set.offsets, hidden, device, int(cfg.cache_budget_gb * 2**30)), None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BestCheckpoint:
    """Logs each evaluation to metrics.jsonl, keeps the best weights, and says when patience runs out."""

    def __init__(self, out: Path, metric: str, patience: int | None):
        self.out, self.metric, self.patience = out, metric, patience
        self.record: dict | None = None
        self.evals_without_gain = 0

    def update(self, record: dict, model: torch.nn.Module) -> bool:
        append_jsonl(record, self.out / "metrics.jsonl")
        tqdm.write(f"step {record['step']}: dev accuracy {record['accuracy']:.4f}, "
                   f"macro-F1 {record['macro_f1']:.4f}, loss {record['dev_loss']:.4f}")
        key = "dev_loss" if self.metric == "loss" else self.metric
        value, best = record[key], None if self.record is None else self.record[key]
        if best is None or (value < best if self.metric == "loss" else value > best):
            self.record, self.evals_without_gain = record, 0
            save_weights_atomic(model.state_dict(), self.out / WEIGHTS_FILE)
        else:
            self.evals_without_gain += 1
        return self.patience is not None and self.evals_without_gain >= self.patience


def _frozen_report(model, cache: PrefixCache | None, no_cache_reason: str | None, epoch_seconds: list[float]):
    """What freezing skipped. The cache's saving is measured, not modelled: every later epoch runs only the
    trainable layers, so (first epoch - later epochs' mean) x later epochs is the prefix time it saved."""
    if not model.frozen_embeddings and not model.frozen_layers:
        return None
    counts = [0, 0]
    for p in model.parameters():
        counts[p.requires_grad] += p.numel()
    report = {"frozen_params": counts[0], "trainable_params": counts[1],
              "epoch_seconds": [round(s, 2) for s in epoch_seconds]}
    if cache is None:
        report["cache"] = no_cache_reason
        return report
    later = epoch_seconds[1:]
    saved = (epoch_seconds[0] - sum(later) / len(later)) * len(later) if later else 0.0
    report.update(cache="on", cache_rows=cache.rows_filled, cache_hits=cache.hits,
                  cache_memory_mb=round(cache.bytes_in_memory / 2**20, 1),
                  cache_disk_mb=round(cache.bytes_on_disk / 2**20, 1), cache_seconds_saved=round(saved, 2))
    return report


def train(cfg: TrainConfig) -> TrainResult:
    cfg.resolve()
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cpu":
        keep_freed_host_memory()
    out = Path(cfg.output)
    if not cfg.overwrite and any((out / name).exists() for name in (WEIGHTS_FILE, FASTCLS_FILE)):
        raise ValueError(f"--output {out} already holds a model; choose another folder or pass --overwrite")

    tokenizer = load_tokenizer(cfg.model)
    train_rows = _read(cfg.train, cfg)
    labels = LabelMap.from_labels([row.label for row in train_rows])
    if len(labels) < 2:
        raise ValueError(f"--train: {cfg.train} has a single label {labels.names}; classification needs two or more")
    train_set = tokenize_examples(train_rows, tokenizer, cfg.max_length, label_map=labels)
    dev_set = None
    if cfg.dev is not None:
        dev_set = tokenize_examples(_read(cfg.dev, cfg), tokenizer, cfg.max_length, label_map=labels)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    model = build_classifier(cfg.model, len(labels), cfg.dropout).to(device)
    model.freeze(cfg.freeze_embeddings, cfg.freeze_layers)
    if cfg.grad_checkpointing:
        model.enable_checkpointing()
    model.train()
    if cfg.patch:
        patch(model)
    wants_cache = model.frozen_embeddings and cfg.cache_frozen
    unpadded = model.stack is not None and (cfg.unpad == "on" or (
        cfg.unpad == "auto" and (device.type == "cpu" or wants_cache)))
    optimizer = build_optimizer(model, OptimizerConfig(lr=cfg.lr, weight_decay=cfg.weight_decay))
    batches = LengthGroupedBatches(train_set.lengths, cfg.batch_size, group_size=cfg.group_size, seed=cfg.seed)
    steps_per_epoch = math.ceil(len(batches) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    schedule = ScheduleConfig(total_steps, resolve_warmup_steps(cfg.warmup, total_steps), cfg.decay)
    scheduler = build_scheduler(optimizer, schedule)
    scaler = grad_scaler(device, precision)
    eval_every = cfg.eval_every or steps_per_epoch
    cache, no_cache_reason = _prefix_cache(cfg, model, train_set, device, math.ceil(total_steps / steps_per_epoch),
                                           unpadded)
    prefix_dtype = None  # the dtype the prefix produced, restored when reading the cache

    save_static_files(out, model, tokenizer, labels, {"max_length": cfg.max_length, "text_columns": cfg.text_columns,
                                                      "text_pair_column": cfg.text_pair_column})
    save_json_atomic({**cfg.to_dict(), "resolved_precision": precision, "device": str(device)}, out / "train_config.json")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    print(f"fastcls: {len(train_set)} training rows, {len(labels)} labels, {total_steps} steps, "
          f"{device} {precision}, {'unpadded' if unpadded else 'padded'} batches, "
          f"{train_set.num_truncated} rows truncated to --max-length {cfg.max_length}")

    step, epoch, samples, tokens, train_seconds = 0, 0, 0, 0, 0.0
    best = BestCheckpoint(out, cfg.metric, cfg.patience)
    loss_sum = torch.zeros((), device=device)  # summed on the device: read back only at logging steps
    loss_count = 0
    progress = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
    epoch_seconds = []
    tick = time.perf_counter()
    while step < total_steps:
        micro_batches = batches.batches(epoch)
        epoch_start = train_seconds + time.perf_counter() - tick
        for i, indices in enumerate(micro_batches):
            # labels were checked against the label map when encoded: the fused head skips its target check
            if unpadded:
                batch = to_device(collate_packed(train_set, indices), device)
                prefix = cache.get(indices).to(prefix_dtype) if cache is not None and cache.filled(indices) else None
                with autocast(device, precision):
                    loss, _, prefix_out = model.packed_loss_and_logits(batch, fused=cfg.patch,
                                                                       head_impl=cfg.head_impl, prefix=prefix)
                if cache is not None and prefix is None:
                    cache.put(indices, prefix_out)
                    prefix_dtype = prefix_out.dtype
            else:
                batch = to_device(collate(train_set, indices, pad_id), device)
                with autocast(device, precision):
                    loss, _ = model.loss_and_logits(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                    batch.get("token_type_ids"), head_impl=cfg.head_impl)
            scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            loss_count += 1
            samples += len(indices)
            tokens += int(train_set.lengths[indices].sum())
            if (i + 1) % cfg.grad_accum and i + 1 < len(micro_batches):
                continue
            if cfg.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm, foreach=True)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)

            if step % cfg.log_every == 0 or step == total_steps:
                last_loss = (loss_sum / loss_count).item()
                if not math.isfinite(last_loss):
                    progress.close()
                    raise TrainingError(
                        f"training loss is {last_loss} at step {step} (lr {scheduler.get_last_lr()[0]:.3g}); "
                        f"try a lower --lr or --precision fp32. The best checkpoint so far stays in {out}"
                    )
                elapsed = train_seconds + time.perf_counter() - tick
                progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                     samples_s=f"{samples / elapsed:.0f}")
            if dev_set is not None and (step % eval_every == 0 or step == total_steps):
                train_seconds += time.perf_counter() - tick
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                          "train_loss": (loss_sum / max(1, loss_count)).item(), "samples_per_s": samples / train_seconds}
                loss_sum.zero_()
                loss_count = 0
                report = evaluate_logits(predict_logits(model, dev_set, cfg.eval_batch_size, device, precision, pad_id),
                                         dev_set, labels)
                report["dev_loss"] = report.pop("loss")
                if best.update({**record, **report}, model):
                    progress.write(f"early stop: no {cfg.metric} gain in {cfg.patience} evaluations")
                    total_steps = step
                tick = time.perf_counter()
            if step >= total_steps:
                break
        _synchronize(device)  # once an epoch, so that the epoch's time is the device's
        epoch_seconds.append(train_seconds + time.perf_counter() - tick - epoch_start)
        epoch += 1
    progress.close()
    if dev_set is None:
        train_seconds += time.perf_counter() - tick
        save_weights_atomic(model.state_dict(), out / WEIGHTS_FILE)
    frozen = _frozen_report(model, cache, no_cache_reason, epoch_seconds)
    if cache is not None:
        cache.close()
    result = TrainResult(out, model, step, best.record, samples / max(train_seconds, 1e-9),
                         tokens / max(train_seconds, 1e-9), train_seconds, time.perf_counter() - start, frozen)
    save_json_atomic({"steps": step, "best": best.record, "train_samples_per_s": result.train_samples_per_s,
                      "train_tokens_per_s": result.train_tokens_per_s, "train_seconds": train_seconds,
                      "total_seconds": result.total_seconds, "epoch_seconds": epoch_seconds, "frozen": frozen},
                     out / "trainer_state.json")
    if frozen is not None:
        print("frozen: " + ", ".join(f"{k} {v}" for k, v in frozen.items()))
    return result
