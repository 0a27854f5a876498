"""Training, evaluation and inference: the train loop, slide / multi-scale / flip inference, metrics,
atomic checkpoints, distributed helpers and the config tree."""

from .. import COMMAND_LINE

# The command line imports the modules it needs one by one (see csfrn/__init__.py).
if not COMMAND_LINE:
    from .checkpoint import build_model_from_config, load_checkpoint, load_model_from_checkpoint, save_checkpoint
    from .config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig, load_config
    from .evaluate import evaluate, predict
    from .inference import inference, slide_inference
    from .metrics import confusion_matrix, summarize
    from .train import train

__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "build_model_from_config",
    "confusion_matrix",
    "evaluate",
    "inference",
    "load_checkpoint",
    "load_config",
    "load_model_from_checkpoint",
    "predict",
    "save_checkpoint",
    "slide_inference",
    "summarize",
    "train",
]
