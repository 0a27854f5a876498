"""Deployment: the inference graph of a CSFRN model exported to ONNX and to ``torch.export`` (.pt2).

    export_onnx(model, path, size, opset=19, dynamic=False)   -> path   (onnx / onnxruntime / onnxscript needed)
    export_program(model, path, size)                         -> path   (reload: torch.export.load after import csfrn)
    check_onnx(model, path, sizes) / check_program(model, path, sizes) -> max abs difference against PyTorch
    OnnxModel(path)                                           a callable running the .onnx file in onnxruntime

Only the inference graph is exported: ``model(images) -> logits`` in eval mode, which runs neither the class ops
(``class_avg_pool``, ``center_distance``: training losses only) nor the auxiliary head. The deformable
convolutions are emitted as the standard ONNX ``DeformConv`` (opset 19): ``csfrn::deform_conv2d`` as one node,
``csfrn::dual_deform_conv2d`` as two nodes sharing the offset (and mask) input. The translation goes through a
custom translation table of the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, onnxscript).

The optional dependencies come with ``pip install -e .[deploy]``. The commands on top of this module are
``csfrn export`` (:func:`csfrn.commands.export.export_from_checkpoint`) and ``csfrn predict --model``
(:func:`csfrn.commands.predict.exported_model_and_config`).
"""

import importlib
import json
import os

import torch
import torch.nn.functional as F

from . import ops  # noqa: F401  (registers torch.ops.csfrn.*)
from .errors import ConfigError, UnreadableFileError, UsageError, UserError
from .ops._checks import pair
from .models.plug import model_logits

# The first onnxruntime release whose CPU execution provider implements DeformConv (opset 19).
ORT_DEFORMCONV_VERSION = "1.25.0"  # 1.24.4 has none (microsoft/onnxruntime#27393)
MIN_OPSET = 19
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class DeployDependencyError(UserError, ImportError):
    """An optional deploy dependency (onnx, onnxruntime, onnxscript) is missing or too old."""


def _require(name):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise DeployDependencyError(
            f"{name} is not installed ({err}); install the deploy extras: "
            f"pip install -e .[deploy]  (onnx, onnxruntime>={ORT_DEFORMCONV_VERSION}, "
            f"onnxscript)"
        ) from None


def _size(name, size):
    """(H, W) from an int or two ints; a ConfigError naming ``name`` otherwise."""
    return tuple(pair(name, size, minimum=1, error=ConfigError, expected="H W (one or two integers)"))


def image_size(name, size):
    """``size`` (an int, or H and W) as (H, W) of positive ints, or a ConfigError naming ``name``."""
    return _size(name, size)


def require_onnx(runtime=True):
    """onnx and onnxscript (and with ``runtime`` onnxruntime) importable, or a :class:`DeployDependencyError`
    naming the deploy extra: what an ONNX export (and its check) needs, said before any work."""
    for name in ("onnx", "onnxscript") + (("onnxruntime",) if runtime else ()):
        _require(name)


def load_onnx(path):
    """The ModelProto in ``path`` (onnx.load)."""
    return _require("onnx").load(path)


class _Inference(torch.nn.Module):
    """``model(images) -> logits`` in eval mode (a plugged model's ``segment``): the graph that is exported (no
    labels, so no class ops)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return model_logits(self.model, images)


def _dynamic_dims():
    """Batch, height and width dynamic (any batch, images of 16 pixels or more each side)."""
    return {
        0: torch.export.Dim("batch", min=1),
        2: torch.export.Dim("height", min=16),
        3: torch.export.Dim("width", min=16),
    }


def inference_module(model):
    """The model in eval mode wrapped so that its forward takes only the images."""
    return _Inference(model.eval()).eval()


def _example(size, batch=1, seed=0):
    h, w = size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=g)


# ---------------------------------------------------------------- ONNX: the translation of csfrn's ops
def _deform_attrs(input, offset, weight, stride, padding, dilation):
    c_in, w_in = input.shape[1], weight.shape[1]
    kh, kw = weight.shape[2], weight.shape[3]
    taps = 2 * int(kh) * int(kw)
    if not all(isinstance(d, int) for d in (c_in, w_in, offset.shape[1])):
        raise ValueError("DeformConv export needs static channel counts (input, weight and offset channels)")
    return dict(
        group=int(c_in) // int(w_in),
        offset_group=int(offset.shape[1]) // taps,
        kernel_shape=[int(kh), int(kw)],
        strides=[int(s) for s in stride],
        pads=[int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])],
        dilations=[int(d) for d in dilation],
    )


def _translation_table(dynamic=False):
    from onnxscript import opset19 as op  # here: onnxscript is optional (the deploy extra)

    def deform_conv2d(input, offset, weight, bias, mask, stride, padding, dilation):
        return op.DeformConv(
            input, weight, offset, bias, mask, **_deform_attrs(input, offset, weight, stride, padding, dilation)
        )

    def dual_deform_conv2d(x, y, offset, weight_x, weight_y, bias_x, bias_y, mask, stride, padding, dilation):
        out_x = op.DeformConv(
            x, weight_x, offset, bias_x, mask, **_deform_attrs(x, offset, weight_x, stride, padding, dilation)
        )
        out_y = op.DeformConv(
            y, weight_y, offset, bias_y, mask, **_deform_attrs(y, offset, weight_y, stride, padding, dilation)
        )
        return out_x, out_y

    def adaptive_avg_pool2d(x, output_size):
        """PSP's pyramid pooling for inputs of any size: bin i of n covers [floor(i*L/n), ceil((i+1)*L/n)) as in
        PyTorch, a Slice and ReduceMean per bin and axis (a mean over a rectangle is the mean of its row means).
        The exporter's own decomposition fixes the bins at the example's size."""

        def const(v):
            return op.Constant(value_ints=[int(v)])

        def pool(t, axis, n):
            if n == 1:
                return op.ReduceMean(t, const(axis), keepdims=1)
            length = op.Shape(t, start=axis, end=axis + 1)
            parts = []
            for i in range(n):
                start = op.Div(op.Mul(length, const(i)), const(n))
                end = op.Div(op.Add(op.Mul(length, const(i + 1)), const(n - 1)), const(n))
                parts.append(op.ReduceMean(op.Slice(t, start, end, const(axis)), const(axis), keepdims=1))
            return op.Concat(*parts, axis=axis)

        oh, ow = (int(v) for v in output_size)
        return pool(pool(x, 2, oh), 3, ow)

    table = {
        torch.ops.csfrn.deform_conv2d.default: deform_conv2d,
        torch.ops.csfrn.dual_deform_conv2d.default: dual_deform_conv2d,
    }
    if dynamic:
        table[torch.ops.aten.adaptive_avg_pool2d.default] = adaptive_avg_pool2d
        table[torch.ops.aten._adaptive_avg_pool2d.default] = adaptive_avg_pool2d
    return table


def _metadata(config):
    meta = {"producer": "csfrn", "csfrn.input": "normalised RGB [N, 3, H, W] float32 (ImageNet mean / std)"}
    if config is not None:
        meta["csfrn.config"] = json.dumps(config.to_dict() if hasattr(config, "to_dict") else config)
    return meta


def export_onnx(model, path, size, opset=19, dynamic=False, config=None, check=True):
    """Export ``model``'s inference graph to ONNX at ``path``.

    Args:
        model: a CSFRN (or any module whose eval ``model(images)`` returns logits).
        size: (H, W) of the example input (the fixed input size unless ``dynamic``).
        opset: ONNX opset, at least 19 (the first with DeformConv).
        dynamic: batch, height and width dynamic.
        config: optional csfrn Config stored in the file's metadata (``csfrn predict --model`` reads the class
            count, dataset and eval settings from it).
        check: run ``onnx.checker`` on the written file.

    Returns:
        ``path``. The graph has inputs ``images`` and output ``logits``; its deformable convolutions are ONNX
        ``DeformConv`` nodes and it has no node of a csfrn custom domain.
    """
    _require("onnxscript")
    onnx = _require("onnx")
    size = _size("size", size)
    if int(opset) < MIN_OPSET:
        raise ConfigError(f"opset {opset}: DeformConv needs ONNX opset {MIN_OPSET} or later")
    module = inference_module(model)
    example = (_example(size, batch=2 if dynamic else 1),)  # batch 1 would be specialised
    kwargs = {}
    if dynamic:
        kwargs["dynamic_shapes"] = {"images": _dynamic_dims()}
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            example,
            None,
            dynamo=True,
            opset_version=int(opset),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            custom_translation_table=_translation_table(dynamic),
            verbose=False,
            optimize=True,
            **kwargs,
        )
    proto = program.model_proto
    for key, value in _metadata(config).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(proto, path)
    if check:
        onnx.checker.check_model(path)
    custom = custom_nodes(proto)
    if custom:
        raise RuntimeError(f"the exported graph still holds custom nodes {sorted(custom)}")
    return path


def custom_nodes(proto):
    """op types of the nodes of ``proto`` (a ModelProto, functions included) outside the standard ONNX domain."""
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    local = {f"{f.domain}::{f.name}" for f in proto.functions}
    return {
        f"{n.domain}::{n.op_type}"
        for n in nodes
        if n.domain not in ("", "ai.onnx") and f"{n.domain}::{n.op_type}" not in local
    }


def op_types(proto):
    """Counts of the op types of ``proto``'s main graph and its local functions."""
    counts = {}
    for n in list(proto.graph.node) + [n for f in proto.functions for n in f.node]:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


# ---------------------------------------------------------------- torch.export (.pt2)
def export_program(model, path, size, dynamic=False, config=None):
    """``torch.export`` of ``model``'s inference graph, saved at ``path`` (.pt2) with the csfrn ``config`` (when
    given) as the extra file ``csfrn.config``. Reload it with ``torch.export.load(path)`` after ``import csfrn``
    (which registers the csfrn ops and their fake kernels); ``.module()(images)`` then returns the logits.
    Returns ``path``."""
    size = _size("size", size)
    module = inference_module(model)
    kwargs = {}
    if dynamic:
        kwargs["dynamic_shapes"] = {"images": _dynamic_dims()}
    with torch.no_grad():
        try:
            program = torch.export.export(module, (_example(size, batch=2 if dynamic else 1),), **kwargs)
        except torch._dynamo.exc.UserError as err:
            if not dynamic or "Constraints violated" not in str(err):
                raise
            # torch 2.11's shape rule of max_pool2d (the ResNet stem's) guards on the parity of the image size,
            # so no graph holds for every height and width there; later releases keep the sizes free.
            guard = next((line.strip(" -") for line in str(err).splitlines() if "guard" in line), "")
            raise UsageError(
                f"--dynamic: torch {torch.__version__} cannot export this model for every image size ({guard}); "
                "export at a fixed --size, or use a newer torch"
            ) from None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = {}
    if config is not None:
        extra[PROGRAM_CONFIG] = json.dumps(config.to_dict() if hasattr(config, "to_dict") else config)
    torch.export.save(program, path, extra_files=extra)
    return path


PROGRAM_CONFIG = "csfrn.config"
EXPORT_SUFFIXES = (".onnx", ".pt2")


class ProgramModel:
    """A .pt2 file from :func:`export_program`, called like the PyTorch model: ``m(images) -> logits``."""

    def __init__(self, path):
        self.path = path
        extra = {PROGRAM_CONFIG: ""}
        try:
            self.module = torch.export.load(path, extra_files=extra).module()
        except Exception as err:  # noqa: BLE001  (torch.export.load raises many kinds on a damaged file)
            raise UnreadableFileError(
                f"{path}: not a torch.export program ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''})"
            ) from None
        self.config = json.loads(extra[PROGRAM_CONFIG]) if extra[PROGRAM_CONFIG] else None

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self

    def __call__(self, images):
        with torch.no_grad():
            return self.module(images.float().cpu())


# ---------------------------------------------------------------- onnxruntime
def _ort_session(path, threads=None, spin=True):
    ort = _require("onnxruntime")
    onnx = _require("onnx")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as err:  # noqa: BLE001  (onnx raises DecodeError and others)
        raise UnreadableFileError(f"{path}: not an ONNX model ({type(err).__name__}: {err})") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spin:  # idle pool threads sleep instead of spinning (they would steal the cores of torch's threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]), proto
    except Exception as err:  # noqa: BLE001  (onnxruntime raises its own exception types)
        if "DeformConv" in str(err) and "DeformConv" in op_types(proto):
            raise DeployDependencyError(
                f"onnxruntime {ort.__version__} cannot run {path}: its CPU execution provider has no DeformConv "
                f"kernel; DeformConv runs in onnxruntime >= {ORT_DEFORMCONV_VERSION} "
                f"(pip install 'onnxruntime>={ORT_DEFORMCONV_VERSION}')"
            ) from None
        raise


class OnnxModel:
    """An exported .onnx file run by onnxruntime (CPU), called like the PyTorch model: ``m(images) -> logits``
    (torch tensors in and out, float32). A model exported without ``--dynamic`` takes only its export size: other
    images are resized to it and the logits resized back (bilinear), as :attr:`fixed_size` says."""

    def __init__(self, path, threads=None, spin=True):
        self.path = path
        self.session, self.proto = _ort_session(path, threads, spin)
        self.metadata = {p.key: p.value for p in self.proto.metadata_props}
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        self.fixed_size = tuple(shape[2:]) if all(isinstance(d, int) for d in shape[2:]) else None
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        out = self.session.get_outputs()[0].shape
        self.num_classes = out[1] if isinstance(out[1], int) else None

    @property
    def config(self):
        """The csfrn config dict stored at export, or None."""
        text = self.metadata.get("csfrn.config")
        return json.loads(text) if text else None

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self

    def run(self, images):
        """numpy float32 [N, 3, H, W] -> numpy logits."""
        return self.session.run(None, {self.input_name: images})[0]

    def __call__(self, images):
        size = tuple(images.shape[2:])
        x = images.float().cpu()
        if self.fixed_size is not None and size != self.fixed_size:
            x = F.interpolate(x, size=self.fixed_size, mode="bilinear", align_corners=False)
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            logits = torch.cat(
                [torch.from_numpy(self.run(x[i : i + 1].contiguous().numpy())) for i in range(x.shape[0])]
            )
        else:
            logits = torch.from_numpy(self.run(x.contiguous().numpy()))
        if tuple(logits.shape[2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


# ---------------------------------------------------------------- checks against PyTorch
@torch.no_grad()
def _max_diff(model, run, sizes, batch=1, seed=1):
    model = model.eval()
    worst = 0.0
    for i, size in enumerate(sizes):
        x = _example(_size("size", size), batch, seed + i)
        ref = model_logits(model, x).float()
        got = run(x)
        if tuple(got.shape) != tuple(ref.shape):
            raise AssertionError(f"exported model gives shape {list(got.shape)}, PyTorch {list(ref.shape)}")
        worst = max(worst, (got - ref).abs().max().item())
    return worst


def check_onnx(model, path, sizes, batch=1):
    """Max abs difference between onnxruntime on ``path`` and ``model`` on random images of each size."""
    session, _ = _ort_session(path)
    name = session.get_inputs()[0].name
    return _max_diff(model, lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]), sizes, batch)


def check_program(model, path, sizes, batch=1):
    """Max abs difference between ``torch.export.load(path)`` and ``model`` on random images of each size."""
    loaded = torch.export.load(path).module()
    return _max_diff(model, loaded, sizes, batch)
