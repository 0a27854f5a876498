"""Export to ONNX (deformable convs as ONNX DeformConv, run in onnxruntime) and to torch.export (.pt2)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from csfrn import cli, deploy, ops
from csfrn.engine.config import load_config
from csfrn.engine.checkpoint import build_model_from_config
from csfrn.errors import UsageError
from csfrn.models import build_model
from csfrn.nn import DeformConv2d

from conftest import rgb, write_png

onnx = pytest.importorskip("onnx", reason="pip install -e .[deploy]")
ort = pytest.importorskip("onnxruntime", reason="pip install -e .[deploy]")
pytest.importorskip("onnxscript", reason="pip install -e .[deploy]")

TOL = 1e-4
TINY = dict(width=8, blocks=(1, 1, 1, 1), channels=16, aux_channels=8, embed_dim=8)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _deformed(model, scale=1.0):
    """Non-zero offsets in AAM (they start at zero), so that the export is checked off the plain-conv path."""
    torch.manual_seed(0)
    with torch.no_grad():
        model.csflm.fuse.offset.weight.normal_(0, 0.05 * scale)
        model.csflm.fuse.offset.bias.normal_(0, 1.5)
    return model.eval()


def _nodes(path, op_type):
    return [n for n in onnx.load(path).graph.node if n.op_type == op_type]


def _assert_standard_onnx(path, deform_nodes):
    proto = onnx.load(path)
    assert deploy.custom_nodes(proto) == set()
    assert not [n for n in proto.graph.node if "csfrn" in n.domain or "csfrn" in n.op_type]
    assert deploy.op_types(proto).get("DeformConv", 0) == deform_nodes
    return proto


@pytest.fixture(scope="module")
def tiny_aam():
    return _deformed(build_model("deeplabv3plus", 4, backbone="resnet50c", fusion="aam", **TINY))


# ---------------------------------------------------------------- the ops alone
class _Single(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.offset = nn.Conv2d(4, 2 * 2 * 9, 3, padding=2, stride=2, dilation=2)  # offset groups 2
        self.mask = nn.Conv2d(4, 2 * 9, 3, padding=2, stride=2, dilation=2) if mask else None
        self.dcn = DeformConv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)

    def forward(self, x):
        mask = torch.sigmoid(self.mask(x)) if self.mask is not None else None
        return self.dcn(x, self.offset(x) * 3, mask)


class _Dual(nn.Module):
    def __init__(self):
        super().__init__()
        self.offset = nn.Conv2d(6, 18, 3, padding=1)
        self.mask = nn.Conv2d(6, 9, 3, padding=1)
        self.wx = nn.Parameter(torch.randn(4, 2, 3, 3))  # groups 2
        self.wy = nn.Parameter(torch.randn(5, 4, 3, 3))
        self.bx = nn.Parameter(torch.randn(4))
        self.by = nn.Parameter(torch.randn(5))

    def forward(self, img):
        x, y = img[:, :2].repeat(1, 2, 1, 1), img.repeat(1, 2, 1, 1)[:, :4]
        feats = torch.cat([x, img[:, :2]], 1)
        offset, mask = self.offset(feats) * 4, torch.sigmoid(self.mask(feats))
        out_x, out_y = ops.dual_deform_conv2d(x, y, offset, self.wx, self.wy, self.bx, self.by, padding=1, mask=mask)
        return torch.cat([out_x, out_y], 1)


class _FourChannels(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, img):
        return self.inner(torch.cat([img, img[:, :1]], 1))


@pytest.mark.parametrize("mask", (False, True))
def test_deform_conv2d_as_one_deformconv_node(tmp_path, mask):
    """groups, offset groups, stride, padding, dilation and the DCNv2 mask map onto DeformConv's attributes."""
    torch.manual_seed(1)
    model = _FourChannels(_Single(mask)).eval()
    path = deploy.export_onnx(model, str(tmp_path / "dcn.onnx"), (17, 23), dynamic=True)
    _assert_standard_onnx(path, 1)
    (node,) = _nodes(path, "DeformConv")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["group"] == 2 and attrs["offset_group"] == 2
    assert list(attrs["strides"]) == [2, 2] and list(attrs["dilations"]) == [2, 2]
    assert list(attrs["pads"]) == [2, 2, 2, 2]
    assert len([i for i in node.input if i]) == (5 if mask else 4)
    assert deploy.check_onnx(model, path, [(17, 23), (30, 12)], batch=2) <= TOL


def test_dual_deform_conv2d_as_two_nodes_sharing_offset_and_mask(tmp_path):
    torch.manual_seed(2)
    model = _Dual().eval()
    path = deploy.export_onnx(model, str(tmp_path / "dual.onnx"), (19, 21), dynamic=True)
    _assert_standard_onnx(path, 2)
    a, b = _nodes(path, "DeformConv")
    assert a.input[2] == b.input[2] and a.input[4] == b.input[4]  # one offset, one mask
    assert {
        onnx.helper.get_attribute_value(n.attribute[[x.name for x in n.attribute].index("group")]) for n in (a, b)
    } == {2, 1}
    assert deploy.check_onnx(model, path, [(19, 21), (8, 33)], batch=2) <= TOL
    # the offsets matter: without them the network gives other logits
    with torch.no_grad():
        x = torch.randn(1, 3, 19, 21)
        ref = model(x)
        model.offset.bias.zero_(), model.offset.weight.zero_()
        assert (model(x) - ref).abs().max() > 1e-2


# ---------------------------------------------------------------- tiny CSFRN (AAM)
def test_tiny_csfrn_onnx_dynamic(tiny_aam, tmp_path):
    path = deploy.export_onnx(tiny_aam, str(tmp_path / "tiny.onnx"), (48, 64), dynamic=True)
    proto = _assert_standard_onnx(path, 2)
    a, b = _nodes(path, "DeformConv")
    assert a.input[2] == b.input[2]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert deploy.check_onnx(tiny_aam, path, [(48, 64), (72, 40)], batch=2) <= TOL


@pytest.mark.parametrize("head", ("psp", "nonlocal", "fcn"))
def test_other_heads_onnx_dynamic(tmp_path, head):
    """PSP's pyramid pooling stays right at any size (bins 1, 2, 3, 6 over a 5-pixel-wide map included)."""
    model = _deformed(build_model(head, 4, backbone="resnet50c", fusion="aam", **TINY))
    path = deploy.export_onnx(model, str(tmp_path / f"{head}.onnx"), (48, 64), dynamic=True)
    _assert_standard_onnx(path, 2)
    assert deploy.check_onnx(model, path, [(48, 64), (64, 40), (96, 88)], batch=2) <= TOL


@pytest.mark.parametrize("size", ((32, 32), (40, 56)))
def test_tiny_csfrn_onnx_fixed_sizes(tiny_aam, tmp_path, size):
    path = deploy.export_onnx(tiny_aam, str(tmp_path / "tiny.onnx"), size)
    _assert_standard_onnx(path, 2)
    assert deploy.check_onnx(tiny_aam, path, [size]) <= TOL
    # the OnnxModel wrapper runs any image size on a fixed-size export (resized in and out)
    runner = deploy.OnnxModel(path)
    assert runner.fixed_size == size and runner.num_classes == 4
    assert runner(torch.randn(2, 3, 20, 30)).shape == (2, 4, 20, 30)


def test_tiny_csfrn_pt2_reloads(tiny_aam, tmp_path):
    try:
        path = deploy.export_program(tiny_aam, str(tmp_path / "tiny.pt2"), (48, 64), dynamic=True)
    except UsageError as err:
        # torch 2.11's max_pool2d shape rule guards on the size's parity (2.14 does not, which CI runs)
        assert tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 14), err
        assert str(err).startswith(f"--dynamic: torch {torch.__version__} cannot export this model for every")
        return
    program = torch.export.load(path)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "csfrn.dual_deform_conv2d.default" in targets
    assert not any("class_avg_pool" in t or "center_distance" in t for t in targets)
    assert deploy.check_program(tiny_aam, path, [(48, 64), (72, 40)], batch=2) <= TOL


def test_pt2_loads_in_a_fresh_process_after_import_csfrn(tiny_aam, tmp_path):
    import subprocess
    import sys

    path = deploy.export_program(tiny_aam, str(tmp_path / "tiny.pt2"), (32, 40))
    code = (
        "import torch, csfrn; m = torch.export.load(%r).module(); print(tuple(m(torch.randn(1, 3, 32, 40)).shape))"
        % path
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("(1, 4, 32, 40)")


def test_eval_graph_has_no_class_ops(tiny_aam):
    """Inference needs neither labels nor centres: the exported graph holds no class op."""
    program = torch.export.export(deploy.inference_module(tiny_aam), (torch.randn(1, 3, 32, 32),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert [t for t in targets if t.startswith("csfrn.")] == ["csfrn.dual_deform_conv2d.default"]


def test_opset_below_19_refused(tiny_aam, tmp_path):
    with pytest.raises(ValueError, match="opset 19"):
        deploy.export_onnx(tiny_aam, str(tmp_path / "x.onnx"), (32, 32), opset=18)


def test_onnxruntime_without_deformconv_is_a_clear_error(tiny_aam, tmp_path, monkeypatch):
    path = deploy.export_onnx(tiny_aam, str(tmp_path / "tiny.onnx"), (32, 32))

    def old_runtime(*args, **kwargs):
        raise RuntimeError(
            "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for "
            "DeformConv(19) node with name 'node_DeformConv_0'"
        )

    monkeypatch.setattr(ort, "InferenceSession", old_runtime)
    with pytest.raises(deploy.DeployDependencyError, match=r"no DeformConv kernel.*onnxruntime >= 1\.25\.0"):
        deploy.OnnxModel(path)


# ---------------------------------------------------------------- the demo checkpoint, through the CLI
@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """A checkpoint of the demo's model (the shipped demo config), as `csfrn demo` / `csfrn train` write it."""
    cfg = load_config("demo")
    model = _deformed(build_model_from_config(cfg.model, load_pretrained=False))
    path = tmp_path_factory.mktemp("demo") / "best.pth"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "iter": 1000}, path)
    return str(path)


def test_cli_export_demo_checkpoint_both_formats(demo_checkpoint, tmp_path, capsys):
    onnx_path, pt2_path = str(tmp_path / "demo.onnx"), str(tmp_path / "demo.pt2")
    assert (
        cli.main(["export", "--checkpoint", demo_checkpoint, "--out", onnx_path, "--size", "64", "64", "--dynamic"])
        == 0
    )
    out = capsys.readouterr().out
    assert "2 DeformConv nodes" in out and "onnxruntime vs PyTorch" in out and "within 0.0001" in out
    _assert_standard_onnx(onnx_path, 2)
    assert deploy.OnnxModel(onnx_path).config["model"]["num_classes"] == 7
    assert cli.main(["export", "--checkpoint", demo_checkpoint, "--out", pt2_path, "--size", "64", "96"]) == 0
    assert "torch.export.load vs PyTorch" in capsys.readouterr().out
    # never replaced silently; a wrong extension is a user error
    assert cli.main(["export", "--checkpoint", demo_checkpoint, "--out", pt2_path, "--size", "64", "64"]) == 2
    assert "exists; add --overwrite" in capsys.readouterr().err
    assert (
        cli.main(["export", "--checkpoint", demo_checkpoint, "--out", str(tmp_path / "x.tflite"), "--size", "64", "64"])
        == 2
    )
    assert "must end in .onnx" in capsys.readouterr().err


def test_cli_predict_with_onnx_model_matches_checkpoint(demo_checkpoint, tmp_path, capsys):
    onnx_path = str(tmp_path / "demo.onnx")
    assert (
        cli.main(
            [
                "export",
                "--checkpoint",
                demo_checkpoint,
                "--out",
                onnx_path,
                "--size",
                "64",
                "64",
                "--dynamic",
                "--no-check",
            ]
        )
        == 0
    )
    write_png(str(tmp_path / "in" / "a.png"), rgb(64, 64, seed=1))
    write_png(str(tmp_path / "in" / "sub" / "b.png"), rgb(48, 80, seed=2))
    assert (
        cli.main(
            ["predict", "--checkpoint", demo_checkpoint, "--input", str(tmp_path / "in"), "--out", str(tmp_path / "pt")]
        )
        == 0
    )
    assert (
        cli.main(["predict", "--model", onnx_path, "--input", str(tmp_path / "in"), "--out", str(tmp_path / "ox")]) == 0
    )
    for stem in ("a", os.path.join("sub", "b")):
        a = np.asarray(Image.open(tmp_path / "pt" / f"{stem}_trainid.png"))
        b = np.asarray(Image.open(tmp_path / "ox" / f"{stem}_trainid.png"))
        assert a.shape == b.shape and (a == b).mean() > 0.999
    capsys.readouterr()
    assert (
        cli.main(
            [
                "predict",
                "--model",
                str(tmp_path / "nope.onnx"),
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )
    assert "--model" in capsys.readouterr().err


# ---------------------------------------------------------------- the full-width model
def test_full_width_deeplabv3plus_r50_exports_both_formats(tmp_path):
    """The paper's model (DeepLabv3+ on ResNet-50, full width, random init), exported at a small input size to
    keep the test short: the graph is the same at any size."""
    torch.manual_seed(0)
    model = _deformed(build_model("deeplabv3plus", 19, backbone="resnet50", fusion="aam"), scale=0.2)
    path = deploy.export_onnx(model, str(tmp_path / "r50.onnx"), (48, 48))
    _assert_standard_onnx(path, 2)
    assert deploy.check_onnx(model, path, [(48, 48)]) <= TOL
    pt2 = deploy.export_program(model, str(tmp_path / "r50.pt2"), (48, 48))
    assert deploy.check_program(model, pt2, [(48, 48)]) <= TOL


def test_dynamic_pt2_export_refused_in_one_line_where_torch_guards_on_the_size(tiny_aam, tmp_path, monkeypatch):
    """What torch 2.11 raises for the ResNet stem's max_pool2d under dynamic sizes, and csfrn's one line for it;
    any other export error goes through unchanged."""
    from torch._dynamo.exc import UserError, UserErrorType

    guard = "Not all values of height = L['images'].size()[2] in the specified range 16 <= height satisfy the guard"
    violated = UserError(UserErrorType.CONSTRAINT_VIOLATION, f"Constraints violated (height)!\n  - {guard}\n")

    def export(*args, **kwargs):
        raise violated

    monkeypatch.setattr(torch.export, "export", export)
    with pytest.raises(UsageError) as err:
        deploy.export_program(tiny_aam, str(tmp_path / "tiny.pt2"), (48, 64), dynamic=True)
    assert "\n" not in str(err.value) and guard in str(err.value) and "fixed --size" in str(err.value)
    assert not (tmp_path / "tiny.pt2").exists()
    with pytest.raises(UserError):  # at a fixed size the error is torch's own
        deploy.export_program(tiny_aam, str(tmp_path / "tiny.pt2"), (48, 64))
