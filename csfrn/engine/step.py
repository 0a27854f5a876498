"""One optimizer step of training: gradient accumulation over micro-batches (``train.accumulate``), AMP, gradient
clipping (``train.clip_grad``), without a device-to-host sync."""

import contextlib

import torch

# train.amp: autocast dtype of each choice (None: no autocast); fp16 also takes a GradScaler.
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_step(net, images, labels, optimizer, scaler, amp_dtype=None, accumulate=1, clip_grad=None):
    """Forward and backward ``accumulate`` equal micro-batches of the batch (``images`` [N, 3, H, W], ``labels``
    [N, H, W]; N divisible by ``accumulate``), each loss divided by ``accumulate``, then one optimizer step. With
    losses that are means over the batch and no BatchNorm effects this equals one step on the whole batch up to
    float rounding. Under DDP the gradients are all-reduced once, after the last micro-batch. ``clip_grad``: the
    gradients' global L2 norm is clipped to it before the step (after unscaling, under fp16).

    Returns ({loss name: mean over the micro-batches, detached}, the gradient norm before clipping as a 0-d
    tensor, or None without clipping)."""
    optimizer.zero_grad(set_to_none=True)
    totals = {}
    parts = zip(images.chunk(accumulate), labels.chunk(accumulate)) if accumulate > 1 else [(images, labels)]
    for i, (x, y) in enumerate(parts):
        defer = i < accumulate - 1 and hasattr(net, "no_sync")  # DDP: all-reduce on the last one only
        with net.no_sync() if defer else contextlib.nullcontext():
            with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                _, losses = net(x, y)
            loss = sum(losses.values())
            scaler.scale(loss / accumulate if accumulate > 1 else loss).backward()
        for name, value in losses.items():
            totals[name] = totals[name] + value.detach() if name in totals else value.detach()
    if accumulate > 1:
        totals = {name: value / accumulate for name, value in totals.items()}
    norm = None
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return totals, norm
