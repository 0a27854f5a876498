"""One source of options: ``ModelConfig``'s fields are ``build_model``'s parameters, ``add_csflm`` / ``build_external``
take the same supervision options, and the config's allowed values are those of the modules that use them."""

import dataclasses
import inspect

import pytest
import torch

from csfrn.engine import checkpoint as checkpoint_module
from csfrn.engine.config import Config, ModelConfig, validate
from csfrn.models import add_csflm, build_external, build_model
from csfrn.models.external import EXTERNAL_MODEL_KEYS

# ModelConfig only: another library's model instead of a CSFRN (build_external). build_model only: the ignore
# index, which the datasets, the metrics and the losses share (255) and no config changes.
CONFIG_ONLY = {"external"}
BUILDER_ONLY = {"ignore_index"}
# What build_model has that is no option of the losses or of CSFLM (what add_csflm takes the model for).
ARCHITECTURE = {
    "head",
    "num_classes",
    "backbone",
    "csflm",
    "fusion",
    "aux",
    "output_stride",
    "multi_grid",
    "pretrained",
    "width",
    "blocks",
    "channels",
    "aux_channels",
}


def parameters(fn):
    return inspect.signature(fn).parameters


def test_model_config_fields_are_build_model_parameters():
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    params = parameters(build_model)
    assert set(fields) - CONFIG_ONLY == set(params) - BUILDER_ONLY
    assert [n for n in fields if n not in CONFIG_ONLY] == [n for n in params if n not in BUILDER_ONLY]  # same order
    for name, p in params.items():
        if name in fields and p.default is not inspect.Parameter.empty:
            assert fields[name].default == p.default, name


def test_add_csflm_and_build_external_take_build_model_supervision_options():
    supervision = set(parameters(build_model)) - ARCHITECTURE
    assert supervision == {
        "embed_dim",
        "margins",
        "ohem",
        "thresh",
        "min_kept",
        "loss_weights",
        "binary",
        "delta",
        "csflm_supervision",
        "fusion_init",
        "ignore_index",
    }
    for fn in (add_csflm, build_external):
        params = parameters(fn)
        missing = supervision - set(params)
        assert not missing, (fn.__name__, missing)
        for name in supervision:
            assert params[name].default == parameters(build_model)[name].default, (fn.__name__, name)
    # the config keys build_external is called with: its parameters, all of them ModelConfig's
    assert set(EXTERNAL_MODEL_KEYS) == set(parameters(build_external)) - {"external", "ignore_index"}
    assert set(EXTERNAL_MODEL_KEYS) <= {f.name for f in dataclasses.fields(ModelConfig)}


def test_loss_only_keys_change_no_tensor_of_the_state_dict():
    """checkpoint._LOSS_ONLY: the model keys a checkpoint's weights do not depend on (left out of the differences
    a load error names)."""
    tiny = dict(width=8, blocks=(1, 1, 1, 1), channels=16, aux_channels=8, embed_dim=8)
    changed = {
        "ohem": True,
        "thresh": 0.5,
        "min_kept": 10,
        "loss_weights": {"cac": 1.0},
        "binary": "bce",
        "delta": 5.0,
        "fusion_init": "random",
    }
    assert set(checkpoint_module._LOSS_ONLY) == set(changed) | {"pretrained"}  # pretrained: loaded, not shaped

    def shapes(**kw):
        torch.manual_seed(0)
        return {k: v.shape for k, v in build_model("fcn", 3, **tiny, **kw).state_dict().items()}

    base = shapes()
    for key, value in changed.items():
        assert shapes(**{key: value}) == base, key
    assert shapes(csflm_supervision="mask") != base  # not a loss-only key: the mask head has weights


@pytest.mark.parametrize(
    "key, module, name",
    [
        ("model.fusion_init", "csfrn.nn.csflm", "FUSION_INITS"),
        ("model.csflm_supervision", "csfrn.losses.eq7", "SUPERVISIONS"),
        ("model.binary", "csfrn.losses.cac", "BINARY_LOSSES"),
        ("model.fusion", "csfrn.nn.csflm", "FUSIONS"),
        ("train.amp", "csfrn.engine.step", "AMP_DTYPES"),
        ("train.optimizer", "csfrn.engine.optim", "OPTIMIZERS"),
        ("eval.mode", "csfrn.engine.inference", "INFERENCE_MODES"),
    ],
)
def test_config_choices_are_those_of_the_module_that_uses_them(monkeypatch, key, module, name):
    """validate() takes each set of allowed values from its module: a value added there is accepted, one that is
    not there is refused naming the key."""
    import importlib

    mod = importlib.import_module(module)
    values = getattr(mod, name)
    extended = {**values, "new": None} if isinstance(values, dict) else tuple(values) + ("new",)
    section, field = key.split(".")
    cfg = Config()
    setattr(getattr(cfg, section), field, "new")
    with pytest.raises(ValueError, match=f"config key '{key}' is 'new'"):
        validate(cfg)
    monkeypatch.setattr(mod, name, extended)
    validate(cfg)
