"""An exponential moving average (EMA) of a model's weights (``train.ema``: the decay), evaluated beside the raw
weights; its best evaluation is kept as ``best_ema.pth`` and its state is part of ``last.pth``, so a resumed run
continues it exactly."""

import copy

import torch


class ModelEma:
    """A copy of ``model`` whose floating-point parameters and buffers follow the model's after every optimizer
    step: ``e = decay * e + (1 - decay) * w`` (BatchNorm's running statistics too, as timm's ModelEmaV2 does);
    integer buffers (BatchNorm's batch counters) are copied. The copy is in eval mode and takes no gradients."""

    def __init__(self, model, decay):
        if not 0 < decay < 1:
            raise ValueError(f"ModelEma: decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._source = model
        ours, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in ours.items() if v.is_floating_point()]
        # state_dict tensors share storage with the parameters and buffers: pair them once
        self._ema_floats = [ours[k] for k in floats]
        self._model_floats = [theirs[k] for k in floats]
        self._ema_other = [v for k, v in ours.items() if not v.is_floating_point()]
        self._model_other = [theirs[k] for k, v in ours.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self):
        """One EMA step towards the model's current weights (call after each optimizer step)."""
        if self._ema_floats:
            torch._foreach_lerp_(self._ema_floats, self._model_floats, 1.0 - self.decay)
        for e, w in zip(self._ema_other, self._model_other):
            e.copy_(w)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)


def build_ema(model, decay, state=None, log=print):
    """The :class:`ModelEma` of ``model`` for ``train.ema`` = ``decay`` (None: no EMA), restored from a resumed
    training ``state`` when it holds one (a checkpoint written without EMA starts it from the resumed
    weights, and says so)."""
    if decay is None:
        return None
    ema = ModelEma(model, decay)
    if state is not None:
        if state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        elif log is not None:
            log("note: the resumed checkpoint holds no EMA weights: the EMA starts from the resumed weights")
    return ema
