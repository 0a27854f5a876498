"""Iteration-based training: SGD + poly decay (+ linear warm-up), AMP on CUDA, DDP through torchrun with SyncBN,
per-sample seeded data, JSON-lines metrics (TensorBoard when installed), periodic evaluation keeping best.pth
and last.pth, and exact resume."""
import json
import math
import os
import random
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data import build_dataset
from ..data.transforms import eval_transforms, train_transforms
from ..errors import ConfigError, OutputExistsError, TrainingDivergedError
from ..losses import check_labels, labels_checked
from .checkpoint import (build_model_from_config, check_num_classes, load_checkpoint, load_model_state,
                         remove_stale_temp_files, require_keys, rng_state, save_checkpoint, set_rng_state)
from .config import Config, check_training
from .distributed import (SeededBatchSampler, SeededTransforms, cleanup, convert_sync_batchnorm, init_distributed)
from .evaluate import evaluate, write_report


def poly_lambda(train_cfg):
    """lr factor at iteration it: mmseg's poly (with min_lr) times its linear warm-up."""
    base, iters, power, min_lr = train_cfg.lr, train_cfg.iters, train_cfg.power, train_cfg.min_lr
    warmup, ratio = train_cfg.warmup_iters, train_cfg.warmup_ratio

    def factor(it):
        lr = (base - min_lr) * (1 - min(it, iters) / iters) ** power + min_lr
        if it < warmup:
            lr *= 1 - (1 - it / warmup) * (1 - ratio)
        return lr / base
    return factor


def build_optimizer(model, train_cfg):
    """SGD with two groups: the backbone at lr, everything else at lr * head_lr_mult. Weight decay everywhere,
    as in the paper's (and mmseg's) recipe."""
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    groups = [{"params": backbone, "lr": train_cfg.lr},
              {"params": rest, "lr": train_cfg.lr * train_cfg.head_lr_mult}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=train_cfg.lr, momentum=train_cfg.momentum,
                           weight_decay=train_cfg.weight_decay)


def _amp_settings(amp, device):
    if amp == "none":
        return None, False
    if amp not in ("bf16", "fp16"):
        raise ConfigError(f"train.amp must be none, bf16 or fp16, got {amp!r}")
    if device.type != "cuda":
        raise ConfigError(f"train.amp={amp} needs a CUDA device; use train.amp=none on {device}")
    return (torch.bfloat16 if amp == "bf16" else torch.float16), amp == "fp16"


class MetricsLog:
    """JSON lines in work_dir/metrics.jsonl, mirrored to TensorBoard when it is installed and wanted."""

    def __init__(self, work_dir, tensorboard=True, keep_until=0):
        self.path = os.path.join(work_dir, "metrics.jsonl")
        # A resumed run repeats the iterations after its checkpoint: drop their old records.
        if os.path.isfile(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["iter"] <= keep_until]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(work_dir, "tb"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("iter", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["iter"])

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _resume_path(train_cfg):
    if train_cfg.resume == "auto":
        path = os.path.join(train_cfg.work_dir, "last.pth")
        return path if os.path.isfile(path) else None
    return train_cfg.resume


# What a training run writes into its work_dir; --overwrite removes the previous run's copies first.
RUN_OUTPUTS = ("last.pth", "best.pth", "metrics.jsonl", "val_last.json", "val_last.csv")


def check_work_dir(train_cfg, overwrite=False):
    """Refuse to start a new run over a previous one (its last.pth / best.pth) unless ``overwrite``; with
    ``overwrite``, return the previous run's files to remove (checkpoints, metrics, reports, TensorBoard events)."""
    work_dir = train_cfg.work_dir
    if overwrite and train_cfg.resume:
        raise ConfigError("--overwrite starts over and --resume continues: give one of them")
    if _resume_path(train_cfg) or not os.path.isdir(work_dir):
        return []
    names = set(os.listdir(work_dir))
    if not overwrite:
        if "last.pth" in names:
            raise OutputExistsError(f"work_dir {work_dir} already holds a run (last.pth): continue it with "
                                  f"--resume auto, or start over with --overwrite")
        if "best.pth" in names:
            raise OutputExistsError(f"work_dir {work_dir} already holds a run (best.pth): start over with "
                                  f"--overwrite, or choose another --work-dir")
        return []
    old = [n for n in names if n in RUN_OUTPUTS or (n.startswith("iter_") and n.endswith(".pth"))]
    tb = os.path.join(work_dir, "tb")
    old = [os.path.join(work_dir, n) for n in sorted(old)]
    if os.path.isdir(tb):
        old += [os.path.join(tb, n) for n in sorted(os.listdir(tb)) if n.startswith("events.out.tfevents.")]
    return old


def train(cfg: Config, model=None, overwrite=False):
    """Train as ``cfg`` says; returns {"iter", "best_mIoU", "last": last evaluation summary or None,
    "model": the trained module (unwrapped)}.

    Run under torchrun for several processes. ``model`` overrides the one built from ``cfg.model``. A work_dir
    that holds a previous run (last.pth or best.pth) is refused (FileExistsError) unless the run resumes
    (``train.resume``) or ``overwrite`` is true (the previous run's checkpoints, metrics and reports are removed).
    """
    check_training(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    old_files = check_work_dir(cfg.train, overwrite)
    info = init_distributed(cfg.train.device)
    try:
        return _train(cfg, model, info, old_files)
    finally:
        cleanup()


def _train(cfg, model, info, old_files=()):
    tcfg, dcfg = cfg.train, cfg.data
    device = info.device
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    os.makedirs(tcfg.work_dir, exist_ok=True)
    if info.is_main:
        remove_stale_temp_files(tcfg.work_dir)
    if info.distributed:  # every rank has checked the work_dir before the main one empties it
        torch.distributed.barrier()
    if info.is_main:
        for path in old_files:
            os.unlink(path)
    resume = _resume_path(tcfg)
    state = None
    if resume:
        state = require_keys(load_checkpoint(resume), resume, ("model", "config", "optimizer", "scheduler",
                                                               "scaler", "rng", "iter", "best_mIoU", "world_size"),
                             "resumed from")
        check_num_classes(state, resume, cfg.model.num_classes)
    torch.manual_seed(tcfg.seed)  # the same initial weights on every rank
    if model is None:
        # A resumed model gets its weights from the checkpoint: model.pretrained may be gone by now.
        model = build_model_from_config(cfg.model, load_pretrained=state is None)
    num_classes = cfg.model.num_classes
    train_set = build_dataset(dcfg, dcfg.train_split, num_classes=num_classes, seed=tcfg.seed)
    if train_set.num_classes != num_classes:
        raise ConfigError(f"model.num_classes is {num_classes} but dataset '{dcfg.dataset}' has "
                          f"{train_set.num_classes} classes; expected model.num_classes={train_set.num_classes}")
    val_set = build_dataset(dcfg, dcfg.val_split, eval_transforms(), num_classes=num_classes, seed=tcfg.seed)
    if info.distributed and tcfg.sync_bn:
        model = convert_sync_batchnorm(model, device)
    model.to(device)
    optimizer = build_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(tcfg))
    amp_dtype, use_scaler = _amp_settings(tcfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_iter, best = 0, float("-inf")
    if state is not None:
        load_model_state(model, state["model"], resume, cfg.model, state["config"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_iter, best = state["iter"], state["best_mIoU"]
        if state["world_size"] == info.world_size:
            set_rng_state(state["rng"][info.rank])
        elif info.is_main:
            print(f"note: {resume} was written by {state['world_size']} processes, this run has "
                  f"{info.world_size}: data order and augmentations continue exactly, dropout streams do not",
                  flush=True)
        if info.is_main:
            print(f"resumed from {resume} at iteration {start_iter}", flush=True)
    else:
        # Different dropout masks per rank, reproducibly.
        torch.manual_seed(tcfg.seed + info.rank)
        random.seed(tcfg.seed + info.rank)
        np.random.seed(tcfg.seed + info.rank)

    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.distributed else model
    sampler = SeededBatchSampler(len(train_set), dcfg.batch_size, tcfg.seed, start_iter, tcfg.iters,
                                 info.rank, info.world_size)
    transforms = train_transforms(dcfg.crop_size, dcfg.scale_range, dcfg.base_size, dcfg.flip, dcfg.photometric)
    # A private generator: creating the loader iterator must not consume the global RNG (exact resume).
    loader = torch.utils.data.DataLoader(SeededTransforms(train_set, transforms), batch_sampler=sampler,
                                         num_workers=dcfg.num_workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator())
    log = MetricsLog(tcfg.work_dir, tcfg.tensorboard, keep_until=start_iter) if info.is_main else None
    bar = tqdm(total=tcfg.iters, initial=start_iter, desc="train", dynamic_ncols=True,
               disable=not (info.is_main and tcfg.progress))
    last_summary = None
    model.train()
    tic, tic_iter = time.perf_counter(), start_iter
    it = start_iter
    for images, labels in loader:
        check_labels(labels, num_classes)  # on the CPU, before the copy: the step then makes no host sync for it
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None), labels_checked():
            _, losses = net(images, labels)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        it += 1
        bar.update(1)

        if it % tcfg.log_interval == 0 or it == tcfg.iters:
            values = {k: float(v.detach()) for k, v in losses.items()}
            values["loss"] = float(loss.detach())
            if not all(math.isfinite(v) for v in values.values()):
                terms = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
                raise TrainingDivergedError(
                    f"loss is not finite at iteration {it} ({terms}; checked every train.log_interval="
                    f"{tcfg.log_interval} iterations); expected finite losses: try a lower train.lr or more "
                    f"train.warmup_iters")
            lr = optimizer.param_groups[0]["lr"]
            speed = (it - tic_iter) / max(time.perf_counter() - tic, 1e-9)
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in values.items()}, "lr": f"{lr:.2e}"})
            record = {"kind": "train", "iter": it, **values, "lr": lr, "it/s": speed,
                      "images/s": speed * dcfg.batch_size}
            if device.type == "cuda":   # peak since the start, as mmseg's "memory"
                record["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if log is not None:
                log.write(record)
            tic, tic_iter = time.perf_counter(), it

        do_eval = it == tcfg.iters or (tcfg.eval_interval and it % tcfg.eval_interval == 0)
        if do_eval:
            summary, _ = evaluate(model, val_set, num_classes, cfg.eval, device, dcfg.base_size)
            last_summary = summary
            improved = summary["mIoU"] > best
            best = max(best, summary["mIoU"])
            if info.is_main:
                bar.write(f"iter {it}: mIoU {100 * summary['mIoU']:.2f}  mAcc {100 * summary['mAcc']:.2f}  "
                          f"aAcc {100 * summary['aAcc']:.2f}")
                log.write({"kind": "val", "iter": it, "mIoU": summary["mIoU"], "mAcc": summary["mAcc"],
                           "aAcc": summary["aAcc"]})
                write_report(summary, train_set.classes, tcfg.work_dir, name="val_last")
                if improved:
                    save_checkpoint({"model": model.state_dict(), "iter": it, "mIoU": summary["mIoU"],
                                     "config": cfg.to_dict()}, os.path.join(tcfg.work_dir, "best.pth"))
        if it % tcfg.checkpoint_interval == 0 or it == tcfg.iters:
            state = _training_state(cfg, model, optimizer, scheduler, scaler, it, best, info)
            if info.is_main:
                save_checkpoint(state, os.path.join(tcfg.work_dir, "last.pth"))
                if tcfg.keep_checkpoints:
                    save_checkpoint(state, os.path.join(tcfg.work_dir, f"iter_{it:06d}.pth"))
            if info.distributed:
                torch.distributed.barrier()
    bar.close()
    if log is not None:
        log.close()
    return {"iter": it, "best_mIoU": best, "last": last_summary, "model": model}


def _gather_rng(info):
    """Every rank's RNG states (each rank has its own dropout stream)."""
    mine = rng_state()
    if not info.distributed:
        return [mine]
    states = [None] * info.world_size
    torch.distributed.all_gather_object(states, mine)
    return states


def _training_state(cfg, model, optimizer, scheduler, scaler, it, best, info):
    """Everything a resume needs, as tensors and plain containers (loadable with weights_only=True)."""
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "rng": _gather_rng(info), "iter": it, "best_mIoU": best,
        "world_size": info.world_size,
        # The sampler is a pure function of (seed, iteration): its position is the iteration.
        "sampler": {"seed": cfg.train.seed, "iter": it, "batch_size": cfg.data.batch_size},
        "config": cfg.to_dict()}
