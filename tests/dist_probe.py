"""``csfrn.cli`` as a torchrun worker script, with what the distributed tests need to look inside a rank:

- ``PROBE_OUT``: each rank appends its own loss terms of every step to ``$PROBE_OUT/rank<R>.jsonl`` (read on the
  host: test-only, the training itself makes no such sync);
- ``PROBE_STEP_SLEEP``: seconds each step sleeps after it (signals and SIGSTOP then land mid-run, not after it);
- ``PROBE_WORK_DIRS``: comma-separated work_dirs, one per rank (a node's own disk), instead of train.work_dir.

None of them changes what a step computes."""

import importlib
import json
import os
import sys
import time

from csfrn.cli import main

train_module = importlib.import_module("csfrn.engine.train")  # the module (csfrn.engine.train is also a function)

RANK = int(os.environ.get("RANK", "0"))
_step = train_module.train_step


def _probed_step(*args, **kwargs):
    losses, norm = _step(*args, **kwargs)
    if os.environ.get("PROBE_OUT"):
        record = {k: float(v) for k, v in losses.items()}
        record["loss"] = float(sum(losses.values()))
        with open(os.path.join(os.environ["PROBE_OUT"], f"rank{RANK}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    time.sleep(float(os.environ.get("PROBE_STEP_SLEEP", "0")))
    return losses, norm


train_module.train_step = _probed_step

if __name__ == "__main__":
    argv = sys.argv[1:]
    if os.environ.get("PROBE_WORK_DIRS"):
        argv += ["--set", f"train.work_dir={os.environ['PROBE_WORK_DIRS'].split(',')[RANK]}"]
    sys.exit(main(argv))
