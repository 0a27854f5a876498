"""What a resumed training needs beyond the checkpoint's tensors: where it stands against the configured
``train.iters``, which config keys differ from the checkpoint's, and the lr schedule re-derived from the
configured values (a changed lr, iters, momentum, ... takes effect as if the run had been started with it);
which of those differences change the run's meaning (refused unless ``--resume-changed``); and torchelastic
restarts, which are resumes."""

import dataclasses
import os

from ..errors import ConfigError, ResumeMismatchError

# Keys that say where or how a run is written, not what it computes.
_NOT_COMPARED = ("train.resume", "train.work_dir")


def _flatten(tree, prefix=""):
    out = {}
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("model", "data", "train", "eval") and not prefix:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(saved, current):
    """``["train.lr 0.01 -> 0.1", ...]``: the keys whose value in ``current`` (a config dict) differs from
    ``saved`` (the checkpoint's), where they are written excepted."""
    old, new = _flatten(saved), _flatten(current)
    return [
        f"{key} {old.get(key)!r} -> {new[key]!r}"
        for key in new
        if key not in _NOT_COMPARED and key in old and old[key] != new[key]
    ]


# Keys that make the resumed run another run than the checkpoint's (besides the world size): refused unless
# --resume-changed. model.pretrained is not among them: a resumed model takes its weights from the checkpoint.
_MEANING = ("train.seed", "data.batch_size")


def _changes_meaning(key):
    return key in _MEANING or (key.startswith("model.") and key != "model.pretrained")


def meaning_changes(saved, current, saved_world_size, world_size):
    """The differences between the checkpoint's config ``saved`` and ``current`` that change what the run
    computes (seed, global batch, world size, model): ``["train.seed 0 -> 3", ...]``."""
    changes = [d for d in config_differences(saved, current) if _changes_meaning(d.split(" ", 1)[0])]
    if saved_world_size != world_size:
        changes.append(f"world size {saved_world_size} -> {world_size}")
    return changes


def check_meaning(changes, path, allowed):
    """Refuse the ``changes`` (:func:`meaning_changes`) of a resume from ``path`` unless ``allowed``."""
    if changes and not allowed:
        raise ConfigError(
            f"resuming {path} with {'; '.join(changes)}: the run would not continue the one in the "
            f"checkpoint; restore the checkpoint's values, or pass --resume-changed to continue with "
            f"the changes anyway"
        )


def world_size_note(path, saved, now):
    return (
        f"note: {path} was written by {saved} processes, this run has {now}: data order and augmentations "
        f"continue exactly, but dropout streams do not, and every step's gradient changes (each process "
        f"averages the loss over its own {'share' if now > 1 else 'batch'} before the processes are averaged: "
        f"with other shares the pixels are weighted otherwise)"
    )


def restart_count():
    """How often torchelastic restarted this worker group (``TORCHELASTIC_RESTART_COUNT``; 0: the first start,
    or no torchelastic)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def as_restart(train_cfg, overwrite):
    """A torchelastic restart is a resume: ``train.resume`` becomes ``auto`` (unless a checkpoint is named) and
    ``--overwrite`` (which applies to the first start only) is dropped. Returns (train config, overwrite)."""
    if restart_count() == 0:
        return train_cfg, overwrite
    return dataclasses.replace(train_cfg, resume=train_cfg.resume or "auto"), False


def resume_problem(rank, chosen, mine):
    """What is wrong with rank ``rank``'s copy of the checkpoint that rank 0 chose, or None.

    ``chosen``: rank 0's decision, None (no resume) or {"path", "iter", "checksum"}; ``mine``: this rank's own
    view, None (it has no checkpoint to resume) or {"path", "iter", "checksum"} or {"path", "error"}."""
    if chosen is None:
        if mine is None:
            return None
        return (
            f"rank {rank}: its {mine['path']} exists (iteration {mine.get('iter', '?')}) but rank 0 has no "
            f"checkpoint to resume and starts at iteration 0"
        )
    if mine is None:
        return f"rank {rank}: cannot read {chosen['path']}, which rank 0 resumes from (not found)"
    if "error" in mine:
        return f"rank {rank}: cannot read {mine['path']}: {mine['error']}"
    if mine["iter"] != chosen["iter"]:
        return (
            f"rank {rank}: its {mine['path']} is at iteration {mine['iter']}, rank 0's {chosen['path']} at "
            f"iteration {chosen['iter']}"
        )
    if mine["checksum"] != chosen["checksum"]:
        return (
            f"rank {rank}: its {mine['path']} (iteration {mine['iter']}) differs from rank 0's {chosen['path']} "
            f"(sha256 {str(mine['checksum'])[:12]}..., rank 0's {str(chosen['checksum'])[:12]}...)"
        )
    return None


def check_agreement(problems):
    """One error naming every rank whose checkpoint differs from rank 0's (``problems``: one entry per rank)."""
    problems = [p for p in problems if p]
    if problems:
        raise ResumeMismatchError(
            f"the processes do not resume from the same checkpoint: {'; '.join(problems)}; "
            f"every rank resumes from the checkpoint rank 0 chooses: give every node the "
            f"same work_dir contents (a shared disk, or copy rank 0's last.pth)"
        )


def check_iterations(state_iter, saved_iters, iters, path):
    """True when the checkpoint's run is finished and ``train.iters`` was not raised (nothing to do); an error
    when the checkpoint is already past ``iters``."""
    if state_iter < iters:
        return False
    if state_iter == iters and (saved_iters is None or saved_iters <= iters):
        return True
    raise ConfigError(
        f"checkpoint {path} is at iteration {state_iter}, past train.iters={iters}: raise "
        f"train.iters above {state_iter} to train on, or start over with --overwrite"
    )


def fresh_groups(optimizer):
    """The hyperparameters of a freshly built optimizer's groups (everything but the parameters), taken after
    the scheduler was attached (which records each group's ``initial_lr``)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def rederive_schedule(optimizer, scheduler, groups, iteration):
    """After ``optimizer`` / ``scheduler`` loaded a checkpoint's states: put back the configured
    hyperparameters ``groups`` (:func:`fresh_groups`) and set every lr to what the configured schedule gives at
    ``iteration`` (the checkpoint's own base lrs would otherwise scale the new schedule)."""
    for group, fresh in zip(optimizer.param_groups, groups):
        group.update(fresh)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler.last_epoch = iteration
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(iteration)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
