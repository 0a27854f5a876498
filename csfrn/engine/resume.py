"""What a resumed training needs beyond the checkpoint's tensors: where it stands against the configured
``train.iters``, which config keys differ from the checkpoint's, and the lr schedule re-derived from the
configured values (a changed lr, iters, momentum, ... takes effect as if the run had been started with it)."""
from ..errors import ConfigError

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
    return [f"{key} {old.get(key)!r} -> {new[key]!r}" for key in new
            if key not in _NOT_COMPARED and key in old and old[key] != new[key]]


def check_iterations(state_iter, saved_iters, iters, path):
    """True when the checkpoint's run is finished and ``train.iters`` was not raised (nothing to do); an error
    when the checkpoint is already past ``iters``."""
    if state_iter < iters:
        return False
    if state_iter == iters and (saved_iters is None or saved_iters <= iters):
        return True
    raise ConfigError(f"checkpoint {path} is at iteration {state_iter}, past train.iters={iters}: raise "
                      f"train.iters above {state_iter} to train on, or start over with --overwrite")


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
