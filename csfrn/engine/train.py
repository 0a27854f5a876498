"""Iteration-based training: SGD or AdamW (``engine/optim.py``) + poly decay (+ linear warm-up), AMP on CUDA,
DDP through torchrun with SyncBN, per-sample seeded data, JSON-lines metrics (TensorBoard when installed),
periodic evaluation keeping best.pth and last.pth, and exact resume; channels_last, torch.compile and no host
sync between log points (``csfrn.engine.speed``)."""

import dataclasses
import json
import math
import os
import random

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data import build_dataset
from ..data.transforms import eval_transforms, train_transforms
from ..errors import ConfigError, OutputExistsError, TrainingDivergedError, TrainingInterrupted, UserError
from ..losses import check_labels, labels_checked
from .checkpoint import (
    CheckpointError,
    build_model_from_config,
    check_num_classes,
    load_checkpoint,
    load_model_state,
    remove_stale_temp_files,
    require_keys,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from . import speed
from .config import Config, check_training
from .distributed import (
    SeededBatchSampler,
    SeededTransforms,
    cleanup,
    convert_sync_batchnorm,
    init_distributed,
    mean_over_ranks,
    raise_on_every_rank,
    timeout_error,
)
from .ema import build_ema
from .evaluate import evaluate, write_report
from .interrupt import signal_name, stop_requests
from .optim import build_optimizer, load_optimizer_state, poly_lambda  # noqa: F401  (poly_lambda: part of this module's API)
from .resume import (
    as_restart,
    check_agreement,
    check_iterations,
    check_meaning,
    config_differences,
    fresh_groups,
    meaning_changes,
    rederive_schedule,
    restart_count,
    resume_problem,
    world_size_note,
)
from .run_files import (
    CONFIG_FILE,
    ENV_FILE,
    LOG_FILE,
    TrainLog,
    check_tensorboard,
    peak_memory_gib,
    write_config,
    write_env,
)
from .run_lock import LOCK_NAME, run_lock
from .step import AMP_DTYPES, train_step


def _amp_settings(amp, device):
    if amp not in AMP_DTYPES:
        raise ConfigError(f"train.amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    if AMP_DTYPES[amp] is not None and device.type != "cuda":
        raise ConfigError(f"train.amp={amp} needs a CUDA device; use train.amp=none on {device}")
    return AMP_DTYPES[amp], amp == "fp16"


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
        if tensorboard:  # installed: run_files.check_tensorboard said so before the run started
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(work_dir, "tb"))

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


# What a training run writes into its work_dir (and `csfrn eval` beside its checkpoints: eval_<split>.json /
# .csv); --overwrite removes the previous run's copies first.
RUN_OUTPUTS = (
    "last.pth",
    "best.pth",
    "best_ema.pth",
    "metrics.jsonl",
    "val_last.json",
    "val_last.csv",
    "val_last_ema.json",
    "val_last_ema.csv",
    "confusion.csv",
    "confusion.png",
    CONFIG_FILE,
    ENV_FILE,
    LOG_FILE,
)


def _is_run_output(name):
    return (
        name in RUN_OUTPUTS
        or (name.startswith("iter_") and name.endswith(".pth"))
        or (name.startswith("eval_") and name.endswith((".json", ".csv")))
    )


def check_work_dir(train_cfg, overwrite=False):
    """Refuse to start a new run over a previous one (its last.pth / best.pth) unless ``overwrite``; with
    ``overwrite``, return the previous run's files to remove (checkpoints, metrics, reports, TensorBoard events).
    ``--resume auto`` without last.pth but with best.pth starts at iteration 0 (the evaluation came before the
    first checkpoint); a torchelastic restart is a resume (:func:`csfrn.engine.resume.as_restart`)."""
    train_cfg, overwrite = as_restart(train_cfg, overwrite)
    work_dir = train_cfg.work_dir
    if overwrite and train_cfg.resume:
        raise ConfigError("--overwrite starts over and --resume continues: give one of them")
    if _resume_path(train_cfg) or not os.path.isdir(work_dir):
        return []
    names = set(os.listdir(work_dir))
    if not overwrite:
        if "last.pth" in names:
            raise OutputExistsError(
                f"work_dir {work_dir} already holds a run (last.pth): continue it with "
                f"--resume auto, or start over with --overwrite"
            )
        if train_cfg.resume == "auto" and ("best.pth" in names or restart_count()):
            return []  # a run that stopped before its first last.pth: it starts again at iteration 0
        if "best.pth" in names:
            raise OutputExistsError(
                f"work_dir {work_dir} already holds a run (best.pth): continue it with "
                f"--resume auto (from iteration 0: it has no last.pth), start over with "
                f"--overwrite, or choose another --work-dir"
            )
        left = sorted(n for n in names if n != LOCK_NAME and not (n.startswith(".") and n.endswith(".tmp")))
        if train_cfg.resume == "auto" and left:  # nothing to resume, and not empty: never truncate its metrics
            raise ConfigError(
                f"--resume auto: work_dir {work_dir} has no last.pth to resume but holds "
                f"{', '.join(left[:4])}{' ...' if len(left) > 4 else ''} (a run stopped before its "
                f"first checkpoint?); start over with --overwrite, or choose another --work-dir"
            )
        return []
    old = [n for n in names if _is_run_output(n)]
    tb = os.path.join(work_dir, "tb")
    old = [os.path.join(work_dir, n) for n in sorted(old)]
    if os.path.isdir(tb):
        old += [os.path.join(tb, n) for n in sorted(os.listdir(tb)) if n.startswith("events.out.tfevents.")]
    return old


def train(cfg: Config, model=None, overwrite=False, resume_changed=False):
    """Train as ``cfg`` says; returns {"iter", "best_mIoU", "last": last evaluation summary or None,
    "model": the trained module (unwrapped)}.

    Run under torchrun for several processes. ``model`` overrides the one built from ``cfg.model``. A work_dir
    that holds a previous run (last.pth or best.pth) is refused (FileExistsError) unless the run resumes
    (``train.resume``) or ``overwrite`` is true (the previous run's checkpoints, metrics and reports are removed).
    A resume whose seed, global batch, world size or model differ from the checkpoint's is refused unless
    ``resume_changed``. Under torchrun, rank 0 chooses the checkpoint and every rank checks its own copy; a
    torchelastic restart (``TORCHELASTIC_RESTART_COUNT`` > 0) resumes from last.pth, ``overwrite`` applies to the
    first start only. Errors every rank meets alike are raised on rank 0; the other ranks exit with status 2.
    """
    train_cfg, overwrite = as_restart(cfg.train, overwrite)
    cfg = dataclasses.replace(cfg, train=train_cfg)
    check_training(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_tensorboard(cfg.train)
    check_work_dir(cfg.train, overwrite)
    info = init_distributed(cfg.train.device, cfg.train.dist_timeout)
    try:
        with stop_requests() as stop, run_lock(cfg.train.work_dir, info):
            old_files = check_work_dir(cfg.train, overwrite)  # again, now that no other run can change it
            return _train(cfg, model, info, old_files, stop, resume_changed)
    except RuntimeError as err:  # torch.distributed's errors
        timed_out = timeout_error(err, info, cfg.train.dist_timeout)
        if timed_out is None:
            raise
        raise timed_out from None
    finally:
        cleanup()


def _checkpoint_view(path):
    """(state, {"path", "iter", "checksum"}) of the checkpoint at ``path``, (None, None) where there is none,
    (None, {"path", "error"}) where it cannot be read."""
    if path is None or not os.path.isfile(path):
        return None, None
    try:
        state = load_checkpoint(path)
    except UserError as err:
        return None, {"path": path, "error": str(err)}
    return state, _view(path, state)


def _view(path, state):
    if not isinstance(state, dict):
        return {"path": path, "iter": None, "checksum": None}
    return {"path": path, "iter": state.get("iter"), "checksum": (state.get("checksum") or {}).get("value")}


def _choose_resume(tcfg, info):
    """Rank 0 chooses the checkpoint to resume from (and, without one, the best mIoU of a best.pth left by a run
    that stopped before its first last.pth); every rank checks that its own copy (the same file on a shared disk)
    is that checkpoint. Returns (this rank's path or None, its loaded state or None, best mIoU to beat)."""
    mine = (
        _resume_path(tcfg)
        if info.is_main
        else (os.path.join(tcfg.work_dir, "last.pth") if tcfg.resume == "auto" else tcfg.resume)
    )
    if info.is_main:
        error, state, view, best = None, None, None, float("-inf")
        best_path = os.path.join(tcfg.work_dir, "best.pth")
        try:  # an unreadable file: every rank stops with rank 0's error (none waits for a broadcast)
            state = load_checkpoint(mine) if mine else None
            view = None if state is None else _view(mine, state)
            if state is None and tcfg.resume == "auto" and os.path.isfile(best_path):
                best = float(load_checkpoint(best_path).get("mIoU", best))
        except CheckpointError as err:
            if not info.distributed:
                raise
            error = str(err)
        decision = [view, best, error]
    else:
        decision = [None, None, None]
    if not info.distributed:
        return mine, state, decision[1]
    torch.distributed.broadcast_object_list(decision, src=0)
    chosen, best, error = decision
    if error:
        raise_on_every_rank(CheckpointError(error), info)
    problem = None
    if not info.is_main:
        state, view = _checkpoint_view(mine)
        problem = resume_problem(info.rank, chosen, view)
    problems = [None] * info.world_size
    torch.distributed.all_gather_object(problems, problem)
    try:
        check_agreement(problems)
    except UserError as err:
        raise_on_every_rank(err, info)
    return (mine if chosen is not None else None), state, best


def _train(cfg, model, info, old_files=(), stop=None, resume_changed=False):
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
    resume, state, best_before = _choose_resume(tcfg, info)
    restarts = restart_count()
    if info.is_main and restarts and not resume:
        print(
            f"torchelastic restart {restarts}: no last.pth in {tcfg.work_dir} yet: starting again at iteration 0",
            flush=True,
        )
    elif info.is_main and not resume and best_before > float("-inf"):
        print(
            f"no last.pth in {tcfg.work_dir} (the run stopped before its first checkpoint): starting at "
            f"iteration 0; its best.pth (mIoU {100 * best_before:.2f}) is replaced only by a better one",
            flush=True,
        )
    if resume:
        try:  # the same file on every rank (checked above): every rank meets the same errors
            state = require_keys(
                state,
                resume,
                ("model", "config", "optimizer", "scheduler", "scaler", "rng", "iter", "best_mIoU", "world_size"),
                "resumed from",
            )
            check_num_classes(state, resume, cfg.model.num_classes)
            finished = check_iterations(
                state["iter"], state["config"].get("train", {}).get("iters"), tcfg.iters, resume
            )
            if not finished:
                check_meaning(
                    meaning_changes(state["config"], cfg.to_dict(), state["world_size"], info.world_size),
                    resume,
                    resume_changed,
                )
        except UserError as err:
            raise_on_every_rank(err, info)
        diffs = config_differences(state["config"], cfg.to_dict())
        if info.is_main and diffs:
            print(f"note: the config differs from {resume}'s: {'; '.join(diffs)}", flush=True)
        if finished:
            if model is None:
                model = build_model_from_config(cfg.model, load_pretrained=False)
            load_model_state(model, state["model"], resume, cfg.model, state["config"])
            if info.is_main:
                print(
                    f"{resume}: the run is finished (iteration {state['iter']} of train.iters={tcfg.iters}); "
                    f"nothing to train (raise train.iters to train on)",
                    flush=True,
                )
            return {"iter": state["iter"], "best_mIoU": state["best_mIoU"], "last": None, "model": model}
    torch.manual_seed(tcfg.seed)  # the same initial weights on every rank
    if model is None:
        # A resumed model gets its weights from the checkpoint: model.pretrained may be gone by now.
        model = build_model_from_config(cfg.model, load_pretrained=state is None)
    num_classes = cfg.model.num_classes
    train_set = build_dataset(dcfg, dcfg.train_split, num_classes=num_classes, seed=tcfg.seed)
    if train_set.num_classes != num_classes:
        raise ConfigError(
            f"model.num_classes is {num_classes} but dataset '{dcfg.dataset}' has "
            f"{train_set.num_classes} classes; expected model.num_classes={train_set.num_classes}"
        )
    val_set = build_dataset(dcfg, dcfg.val_split, eval_transforms(), num_classes=num_classes, seed=tcfg.seed)
    if info.distributed and tcfg.sync_bn:
        model = convert_sync_batchnorm(model, device)
    channels_last = speed.use_channels_last(tcfg.channels_last, device)
    model.to(device, memory_format=speed.memory_format(channels_last))
    optimizer = build_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(tcfg))
    configured = fresh_groups(optimizer)
    amp_dtype, use_scaler = _amp_settings(tcfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_iter, best = 0, best_before
    if state is not None:
        load_model_state(model, state["model"], resume, cfg.model, state["config"])
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_iter, best = state["iter"], state["best_mIoU"]
        rederive_schedule(optimizer, scheduler, configured, start_iter)  # the configured lr / iters apply
        if state["world_size"] == info.world_size:
            set_rng_state(state["rng"][info.rank])
        elif info.is_main:
            print(world_size_note(resume, state["world_size"], info.world_size), flush=True)
        if info.is_main:
            print(
                f"{f'torchelastic restart {restarts}: ' if restarts else ''}resumed from {resume} at iteration "
                f"{start_iter}",
                flush=True,
            )
    else:
        # Different dropout masks per rank, reproducibly.
        torch.manual_seed(tcfg.seed + info.rank)
        random.seed(tcfg.seed + info.rank)
        np.random.seed(tcfg.seed + info.rank)

    net = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if info.distributed
        else model
    )
    # Training runs the compiled module (model and losses: the losses are computed in its forward); evaluation
    # runs the eager model unless eval.compile.
    step_net = speed.maybe_compile(net, tcfg.compile)
    eval_model = speed.maybe_compile(model, cfg.eval.compile)
    sampler = SeededBatchSampler(
        len(train_set), dcfg.batch_size, tcfg.seed, start_iter, tcfg.iters, info.rank, info.world_size
    )
    transforms = train_transforms(dcfg.crop_size, dcfg.scale_range, dcfg.base_size, dcfg.flip, dcfg.photometric)
    # A private generator: creating the loader iterator must not consume the global RNG (exact resume).
    loader = torch.utils.data.DataLoader(
        SeededTransforms(train_set, transforms),
        batch_sampler=sampler,
        generator=torch.Generator(),
        **speed.loader_options(dcfg.num_workers, device, dcfg.prefetch_factor),
    )
    log = MetricsLog(tcfg.work_dir, tcfg.tensorboard, keep_until=start_iter) if info.is_main else None
    ema = build_ema(model, tcfg.ema, state, log=print if info.is_main else None)
    best_ema = state.get("best_ema_mIoU", float("-inf")) if state is not None else float("-inf")
    text_log = None
    if info.is_main:
        write_config(cfg, tcfg.work_dir)
        write_env(tcfg.work_dir, device, info.world_size)
        text_log = TrainLog(tcfg.work_dir, tcfg.iters)
        text_log.line(
            f"resumed from {resume} at iteration {start_iter}"
            if resume
            else f"started: {tcfg.iters} iterations, global batch {dcfg.batch_size} on {info.world_size} "
            f"process(es), device {device}"
        )
    clipped = torch.zeros((), dtype=torch.int64, device=device)  # steps clipped since the last log line
    bar = tqdm(
        total=tcfg.iters,
        initial=start_iter,
        desc="train",
        dynamic_ncols=True,
        disable=not (info.is_main and tcfg.progress),
    )
    last_summary = None
    model.train()
    it = start_iter
    saved_at = start_iter if state is not None else None

    def stop_here():  # SIGINT / SIGTERM: last.pth at this iteration (every rank takes part), then leave
        signum = stop.agreed(info) if stop is not None else 0
        if not signum:
            return
        path = os.path.join(tcfg.work_dir, "last.pth")
        if saved_at != it:
            ckpt = _training_state(cfg, model, optimizer, scheduler, scaler, it, best, info)
            if info.is_main:
                save_checkpoint(ckpt, path)
            if info.distributed:  # no rank leaves before the file is complete
                torch.distributed.barrier()
        bar.close()
        raise TrainingInterrupted(
            signum,
            f"interrupted by {signal_name(signum)} at iteration {it} of "
            f"{tcfg.iters}; last checkpoint {path} (iteration {it}); continue with "
            f"--resume auto",
            it,
            path,
        )

    stop_here()
    batches = iter(loader)
    times = speed.StepTimes()
    # Between two log points nothing here reads a device value: the step only queues work.
    while (batch := times.next_batch(batches)) is not None:
        check_labels(batch[1], num_classes)  # on the CPU, before the copy: the step then makes no host sync for it
        images, labels = speed.to_device(*batch, device, channels_last)
        with labels_checked():
            losses, grad_norm = train_step(
                step_net, images, labels, optimizer, scaler, amp_dtype, tcfg.accumulate, tcfg.clip_grad
            )
        loss = sum(losses.values())
        scheduler.step()
        if ema is not None:
            ema.update()
        if grad_norm is not None:
            clipped += grad_norm > tcfg.clip_grad
        it += 1
        bar.update(1)

        logged = it % tcfg.log_interval == 0 or it == tcfg.iters
        if logged:
            # The means over the global batch (every rank's share): what is logged and checked for divergence.
            values = mean_over_ranks({**losses, "loss": loss}, info)
            if not all(math.isfinite(v) for v in values.values()):
                terms = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
                raise_on_every_rank(
                    TrainingDivergedError(
                        f"loss is not finite at iteration {it} ({terms}; checked every train.log_interval="
                        f"{tcfg.log_interval} iterations); expected finite losses: try a lower train.lr or more "
                        f"train.warmup_iters"
                    ),
                    info,
                )
            lr = optimizer.param_groups[0]["lr"]
            step_times = times.figures()  # after reading the losses: the device work is done
            rate = 1e3 / max(step_times["step_ms"], 1e-9)
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in values.items()}, "lr": f"{lr:.2e}"})
            record = {
                "kind": "train",
                "iter": it,
                **values,
                "lr": lr,
                "it/s": rate,
                "images/s": rate * dcfg.batch_size,
                **step_times,
            }
            if device.type == "cuda":  # peak since the start, as mmseg's "memory"
                record["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            clip = None
            if grad_norm is not None:
                clip = (tcfg.clip_grad, float(grad_norm), int(clipped), times.steps)
                record.update(grad_norm=clip[1], clipped=clip[2])
                clipped.zero_()
            if log is not None:
                log.write(record)
                data_s, step_s = step_times["data_ms"] / 1e3, step_times["step_ms"] / 1e3
                text_log.iteration(it, lr, values, data_s, step_s - data_s, peak_memory_gib(device), clip)
            if info.is_main and not tcfg.progress:  # no bar: the same numbers as a line
                print(
                    f"iter {it}/{tcfg.iters}: "
                    + "  ".join(f"{k} {v:.4f}" for k, v in values.items())
                    + f"  lr {lr:.3e}  {rate:.2f} it/s",
                    flush=True,
                )

        do_eval = it == tcfg.iters or (tcfg.eval_interval and it % tcfg.eval_interval == 0)
        if do_eval:
            summary, _ = evaluate(eval_model, val_set, num_classes, cfg.eval, device, dcfg.base_size)
            last_summary = summary
            improved = summary["mIoU"] > best
            best = max(best, summary["mIoU"])
            if info.is_main:
                bar.write(
                    f"iter {it}: mIoU {100 * summary['mIoU']:.2f}  mAcc {100 * summary['mAcc']:.2f}  "
                    f"aAcc {100 * summary['aAcc']:.2f}"
                )
                val = {
                    "kind": "val",
                    "iter": it,
                    "mIoU": summary["mIoU"],
                    "mAcc": summary["mAcc"],
                    "aAcc": summary["aAcc"],
                }
                text_log.evaluation(it, summary)
                write_report(summary, train_set.classes, tcfg.work_dir, name="val_last")
                if improved:
                    save_checkpoint(
                        {"model": model.state_dict(), "iter": it, "mIoU": summary["mIoU"], "config": cfg.to_dict()},
                        os.path.join(tcfg.work_dir, "best.pth"),
                    )
                    text_log.line(f"iter {it}: saved best.pth (mIoU {100 * summary['mIoU']:.2f})")
            if ema is not None:
                ema_summary, _ = evaluate(ema.module, val_set, num_classes, cfg.eval, device, dcfg.base_size)
                ema_improved = ema_summary["mIoU"] > best_ema
                best_ema = max(best_ema, ema_summary["mIoU"])
                if info.is_main:
                    val.update({f"ema_{k}": ema_summary[k] for k in ("mIoU", "mAcc", "aAcc")})
                    text_log.evaluation(it, ema_summary, label="EMA val")
                    write_report(ema_summary, train_set.classes, tcfg.work_dir, name="val_last_ema")
                    if ema_improved:
                        save_checkpoint(
                            {
                                "model": ema.state_dict(),
                                "iter": it,
                                "mIoU": ema_summary["mIoU"],
                                "config": cfg.to_dict(),
                            },
                            os.path.join(tcfg.work_dir, "best_ema.pth"),
                        )
                        text_log.line(f"iter {it}: saved best_ema.pth (EMA mIoU {100 * ema_summary['mIoU']:.2f})")
            if info.is_main:
                log.write(val)
        if it % tcfg.checkpoint_interval == 0 or it == tcfg.iters:
            state = _training_state(cfg, model, optimizer, scheduler, scaler, it, best, info)
            if ema is not None:
                state.update(ema=ema.state_dict(), best_ema_mIoU=best_ema)
            if info.is_main:
                save_checkpoint(state, os.path.join(tcfg.work_dir, "last.pth"))
                if tcfg.keep_checkpoints:
                    save_checkpoint(state, os.path.join(tcfg.work_dir, f"iter_{it:06d}.pth"))
                text_log.line(
                    f"iter {it}: saved last.pth" + (f" and iter_{it:06d}.pth" if tcfg.keep_checkpoints else "")
                )
            saved_at = it
            if info.distributed:
                torch.distributed.barrier()
        if logged:  # the next interval's times start here, after this one's evaluation and checkpoint
            times.restart()
        if it < tcfg.iters:
            stop_here()
    bar.close()
    if log is not None:
        log.close()
        text_log.line(
            f"finished at iteration {it}: best mIoU {100 * best:.2f}"
            + (f", best EMA mIoU {100 * best_ema:.2f}" if ema is not None else "")
        )
        text_log.close()
    result = {"iter": it, "best_mIoU": best, "last": last_summary, "model": model}
    if ema is not None:
        result.update(best_ema_mIoU=best_ema, ema=ema.module)
    return result


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
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _gather_rng(info),
        "iter": it,
        "best_mIoU": best,
        # no sampler state: the sampler is a pure function of (train.seed, iteration). (Checkpoints from before
        # this have a "sampler" key that nothing reads.)
        "world_size": info.world_size,
        "config": cfg.to_dict(),
    }
