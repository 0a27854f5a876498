"""Why does CSFLM hurt at the demo scale? Trains one model as the demo config says (plus --set overrides) and
logs, every --every iterations, what the CAC loss sees: the class margins m_k and the scale exp(delta m_k),
phi on the pixels of the class and on the other pixels (and how many are saturated), the loss terms, the size
of the embeddings, and how many labelled classes the 8x8 label map keeps. Also, at step 0, how far the fused
features F are from the head's features A. Writes JSON lines to --out.

    python benchmarks/diagnose_csflm.py --out diag.jsonl [--set model.fusion=concat ...]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from csfrn import ops  # noqa: E402
from csfrn.engine.config import load_config  # noqa: E402
from csfrn.engine.demo import DEMO_CONFIG  # noqa: E402
from csfrn.engine.checkpoint import build_model_from_config  # noqa: E402
from csfrn.engine.train import train  # noqa: E402
from csfrn.losses.cac import class_index  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=DEMO_CONFIG)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--every", type=int, default=25)
    p.add_argument(
        "--identity-fusion",
        action="store_true",
        help="an experiment, not the library's init: start "
        "the fusion as (nearly) the identity on A (1x1 weights [I on A, 0 on B]; AAM's 3x3 convs Dirac), so that "
        "F = ReLU(BN(A)) at step 0",
    )
    p.add_argument("--labels-only", action="store_true", help="only the label statistics at the feature size")
    args = p.parse_args(argv)
    if args.labels_only:
        cfg = load_config(args.config, args.overrides)
        print(json.dumps(label_stats(cfg)))
        return
    cfg = load_config(args.config, args.overrides + [f"train.work_dir={args.out}.run", "train.progress=false"])
    torch.manual_seed(cfg.train.seed)
    model = build_model_from_config(cfg.model)
    delta = cfg.model.delta
    if args.identity_fusion:
        identity_fusion(model.csflm)
    state = {"step": 0, "csflm": None}
    out = open(args.out, "w")

    def on_csflm(module, inputs, output):
        state["csflm"] = (inputs[0].detach(), output)

    def on_forward(module, inputs, output):
        if not module.training or len(inputs) < 2:
            return
        state["step"] += 1
        step = state["step"]
        if step != 1 and step % args.every:
            return
        a, o = state["csflm"]
        b, c, f = o.embeddings.detach(), o.margins, o.features.detach()
        labels = inputs[1].long()
        idx = class_index(labels, b.shape[2:], 255)
        full = class_index(labels, labels.shape[1:], 255)
        rec = {"step": step, **{k: float(v) for k, v in output[1].items()}}
        rec["classes_full"] = int(
            (full.compact != full.k).any()
            and sum(
                int(torch.unique(full.compact[n][full.compact[n] != full.k]).numel()) for n in range(labels.shape[0])
            )
        )
        rec["classes_8x8"] = sum(
            int(torch.unique(idx.compact[n][idx.compact[n] != idx.k]).numel()) for n in range(labels.shape[0])
        )
        rec["emb_norm"] = float(b.norm(dim=1).mean())
        stacked = b if c is None else torch.cat([b, c.detach()], 1)
        means, counts = ops.class_avg_pool(stacked, idx.compact, idx.k, ignore_index=idx.k)
        d = b.shape[1]
        centers = means[..., :d].contiguous()
        m = means[..., d] if c is not None else means.new_zeros(means.shape[:2])
        phi = ops.center_distance(b, centers, m.contiguous(), delta)
        pres = counts > 0
        mk = m[pres]
        rec.update(
            m_min=float(mk.min()),
            m_mean=float(mk.mean()),
            m_max=float(mk.max()),
            scale_max=float(torch.exp(delta * mk).max()),
            scale_mean=float(torch.exp(delta * mk).mean()),
        )
        lab = idx.compact[:, None]  # [N,1,h,w]
        ks = torch.arange(idx.k)[None, :, None, None]
        pos = (lab == ks) & pres[:, :, None, None]
        neg = (lab != ks) & (lab != idx.k) & pres[:, :, None, None]
        rec["phi_pos"] = float(phi[pos].mean())
        rec["phi_neg"] = float(phi[neg].mean())
        rec["neg_saturated"] = float((phi[neg] > 0.999).float().mean())
        rec["pos_saturated"] = float((phi[pos] > 0.999).float().mean())
        if step == 1:
            a_up, f_up = a.flatten(), f.flatten()
            rec["init_corr_F_A"] = float(torch.corrcoef(torch.stack([a_up, f_up]))[0, 1])
            rec["init_relerr_F_A"] = float((f - a).norm() / a.norm())
        out.write(json.dumps(rec) + "\n")
        out.flush()

    model.csflm.register_forward_hook(on_csflm)
    model.register_forward_hook(on_forward)
    result = train(cfg, model=model, overwrite=True)
    out.write(json.dumps({"final_val_mIoU": result["last"]["mIoU"]}) + "\n")
    out.close()


@torch.no_grad()
def identity_fusion(csflm):
    c = csflm.embed.in_channels
    d = csflm.embed.out_channels
    if csflm.fusion == "concat":
        w = csflm.fuse[0].weight if isinstance(csflm.fuse, torch.nn.Sequential) else csflm.fuse.conv.weight
        w.zero_()
        w[:, :c, 0, 0] = torch.eye(c)
    else:
        aam = csflm.fuse
        torch.nn.init.dirac_(aam.weight_x)
        torch.nn.init.dirac_(aam.weight_y)
        w = aam.fuse[0].weight if isinstance(aam.fuse, torch.nn.Sequential) else aam.fuse.conv.weight
        w.zero_()
        w[:, d:, 0, 0] = torch.eye(c)


def label_stats(cfg, images=256):
    """How the CAC loss's labels (nearest-neighbour to the feature size, image size / output stride) differ from
    the full-resolution ones over training crops: (image, class) pairs that vanish, and feature cells whose label
    is not the majority class of the pixels they cover."""
    from csfrn.data import build_dataset
    from csfrn.engine.distributed import SeededTransforms
    from csfrn.data.transforms import train_transforms
    from csfrn.losses.cac import resize_labels

    d = cfg.data
    ds = SeededTransforms(
        build_dataset(d, d.train_split, num_classes=cfg.model.num_classes, seed=0),
        train_transforms(d.crop_size, d.scale_range, d.base_size, d.flip, d.photometric),
    )
    stride = cfg.model.output_stride
    lost = pairs = cells = wrong = 0
    for i in range(images):
        _, lab = ds[(i % len(ds.dataset), i)]
        lab = lab.long()
        h, w = lab.shape[0] // stride, lab.shape[1] // stride
        small = resize_labels(lab[None], (h, w))[0]
        full = set(torch.unique(lab[lab != 255]).tolist())
        kept = set(torch.unique(small[small != 255]).tolist())
        pairs += len(full)
        lost += len(full - kept)
        blocks = lab[: h * stride, : w * stride].reshape(h, stride, w, stride).permute(0, 2, 1, 3).reshape(h, w, -1)
        for y in range(h):
            for x in range(w):
                vals = blocks[y, x]
                vals = vals[vals != 255]
                if vals.numel():
                    cells += 1
                    wrong += int(int(torch.mode(vals).values) != int(small[y, x]))
    return {
        "feature_size": [h, w],
        "class_pairs_lost": lost / max(pairs, 1),
        "cells_not_majority": wrong / max(cells, 1),
    }


if __name__ == "__main__":
    main()
