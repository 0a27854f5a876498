"""Lovasz hinge, CAC, smooth and OHEM losses against loops written from their definitions."""

import pytest
import torch
import torch.nn.functional as F

from csfrn.losses import CACLoss, OhemCrossEntropy, SmoothLoss, lovasz_hinge


# ---------------------------------------------------------------- Lovasz hinge, one image at a time
def jaccard_loss_of_prefix(mistakes, positives):
    """Berman's Delta_J1(M) = |M| / |{y = 1} union M| for the set M of mispredicted pixels."""
    union = positives | mistakes
    return len(mistakes) / len(union) if union else 0.0


def lovasz_one_image(logits, labels, ignore_index=None):
    """Berman et al. (2018) Eq. 9 / Alg. 1 for one flat image: pixels sorted by hinge error, each weighted by
    the increase of the Jaccard loss when it joins the mispredicted set; ignored pixels are removed."""
    keep = [i for i in range(len(labels)) if ignore_index is None or int(labels[i]) != ignore_index]
    if not keep:
        return logits.sum() * 0.0
    errors = [1.0 - logits[i] * (2.0 * float(labels[i]) - 1.0) for i in keep]
    order = sorted(range(len(keep)), key=lambda j: -float(errors[j].detach()))
    positives = {keep[j] for j in range(len(keep)) if int(labels[keep[j]]) == 1}
    total, mistakes, previous = logits.sum() * 0.0, set(), 0.0
    for j in order:
        mistakes.add(keep[j])
        current = jaccard_loss_of_prefix(mistakes, positives)
        total = total + torch.relu(errors[j]) * (current - previous)
        previous = current
    return total


def make_binary(shape, seed, ignore_index=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 2, shape, generator=g)
    if ignore_index is not None:
        labels[torch.rand(shape, generator=g) < 0.25] = ignore_index
    return logits, labels


@pytest.mark.parametrize("ignore_index", [None, 255])
def test_lovasz_per_image_equals_loop(ignore_index):
    logits, labels = make_binary((5, 3, 4), seed=0, ignore_index=ignore_index)
    labels[1] = 0  # no positive pixel
    if ignore_index is not None:
        labels[2] = ignore_index  # nothing valid: contributes 0, still counted
    logits.requires_grad_(True)
    got = lovasz_hinge(logits, labels, per_image=True, ignore_index=ignore_index)
    (g_got,) = torch.autograd.grad(got, logits)
    flat_l, flat_y = logits.reshape(5, -1), labels.reshape(5, -1)
    want = sum(lovasz_one_image(flat_l[b], flat_y[b], ignore_index) for b in range(5)) / 5
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)
    # [B, P] and [B, H, W] are the same thing
    torch.testing.assert_close(
        lovasz_hinge(logits.reshape(5, 12), labels.reshape(5, 12), ignore_index=ignore_index), got
    )


@pytest.mark.parametrize("ignore_index", [None, 255])
def test_lovasz_flattened_equals_loop(ignore_index):
    logits, labels = make_binary((3, 10), seed=1, ignore_index=ignore_index)
    got = lovasz_hinge(logits, labels, per_image=False, ignore_index=ignore_index)
    want = lovasz_one_image(logits.reshape(-1), labels.reshape(-1), ignore_index)
    torch.testing.assert_close(got, want)


def test_lovasz_perfect_and_empty():
    labels = torch.tensor([[1, 0, 1, 0]])
    assert lovasz_hinge(torch.tensor([[3.0, -2.0, 1.0, -1.5]]), labels).item() == 0.0
    # one image has every pixel ignored: it adds 0 to the mean over two images
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    lab = torch.tensor([[255, 255, 255, 255], [1, 0, 1, 0]])
    both = lovasz_hinge(logits, lab, ignore_index=255)
    second = lovasz_hinge(logits[1:], lab[1:], ignore_index=255)
    torch.testing.assert_close(both, second / 2)
    assert lovasz_hinge(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.long)).item() == 0.0


# ---------------------------------------------------------------- CAC
def cac_loop(emb, margin_map, labels, delta, binary, ignore_index=255):
    """Eq. 4 image by image and class by class."""
    per_image = []
    for n in range(emb.shape[0]):
        b, c, y = emb[n].flatten(1), margin_map[n].flatten(), labels[n].flatten()
        valid = y != ignore_index
        classes = torch.unique(y[valid]).tolist()
        if not classes:
            continue
        losses = []
        for k in classes:
            inside = y == k
            s_k = b[:, inside].mean(1)
            m_k = c[inside].mean()
            phi = 1 - torch.exp(-((b - s_k[:, None]) ** 2).sum(0) * torch.exp(delta * m_k))
            if binary == "lovasz":
                losses.append(lovasz_one_image((1 - 2 * phi)[valid], inside[valid].long()))
            else:
                target = (~inside[valid]).to(phi.dtype)
                losses.append(F.binary_cross_entropy(phi[valid], target))
        per_image.append(sum(losses) / len(losses))
    return sum(per_image) / len(per_image)


@pytest.mark.parametrize("binary", ["lovasz", "bce"])
def test_cac_equals_loop(binary, ops_path):
    g = torch.Generator().manual_seed(2)
    emb = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    margin = (torch.randn(2, 1, 4, 5, generator=g, dtype=torch.float64) * 0.1).requires_grad_(True)
    labels_small = torch.randint(0, 4, (2, 4, 5), generator=g)
    labels_small[0, 0] = 255
    labels_small[1][labels_small[1] == 2] = 7  # class ids need not be contiguous
    # labels at twice the size: nearest-neighbour downsampling takes every other pixel
    labels = labels_small.repeat_interleave(2, 1).repeat_interleave(2, 2)
    labels[:, 1::2] = 255
    got = CACLoss(delta=10.0, binary=binary)(emb, margin, labels)
    want = cac_loop(emb, margin, labels_small, 10.0, binary)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, (emb, margin))
    g_want = torch.autograd.grad(want, (emb, margin))
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("binary", ["lovasz", "bce"])
def test_cac_of_diverged_embeddings_is_nan_not_an_error(binary, ops_path):
    """NaN embeddings (a diverged run) give a NaN loss, which the training loop reports with its iteration;
    BCE used to raise from inside binary_cross_entropy instead."""
    emb = torch.randn(2, 3, 4, 5)
    emb[0, :, 1, 1] = float("nan")
    labels = torch.randint(0, 3, (2, 4, 5))
    loss = CACLoss(binary=binary)(emb, torch.zeros(2, 1, 4, 5), labels)
    assert torch.isnan(loss)


def separated(scale):
    """Embeddings constant per class, classes ``scale`` apart; labels with an ignored stripe."""
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :, 4:] = 1
    labels[1, 4:, :] = 2
    labels[:, 0] = 255
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]) * scale
    emb = centres[labels.clamp(max=2)].permute(0, 3, 1, 2).contiguous()
    emb[:, :, 0] = 100.0  # ignored pixels may hold anything
    return emb, torch.zeros(2, 1, 8, 8), labels


@pytest.mark.parametrize("binary", ["lovasz", "bce"])
def test_cac_small_when_separated_large_when_mixed(binary, ops_path):
    loss = CACLoss(binary=binary)
    emb, margin, labels = separated(scale=10.0)
    assert loss(emb, margin, labels).item() < 1e-6
    g = torch.Generator().manual_seed(3)
    mixed = torch.randn(2, 2, 8, 8, generator=g)  # embeddings that ignore the labels
    assert loss(mixed, margin, labels).item() > 0.5
    # classes that share one point are as bad as can be for the own-class-vs-rest split
    assert loss(torch.zeros(2, 2, 8, 8), margin, labels).item() > 0.9


def test_cac_margins_widen_or_narrow_the_kernel(ops_path):
    emb, _, labels = separated(scale=1.0)
    emb = emb + 0.3 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(4))
    loss = CACLoss(binary="bce")
    wide, narrow = torch.full((2, 1, 8, 8), -0.3), torch.full((2, 1, 8, 8), 0.3)
    assert loss(emb, wide, labels) != loss(emb, narrow, labels)
    torch.testing.assert_close(loss(emb, None, labels), loss(emb, torch.zeros(2, 1, 8, 8), labels))


def test_cac_all_ignored_is_zero_and_differentiable(ops_path):
    emb = torch.randn(2, 4, 4, 4, requires_grad=True)
    margin = torch.randn(2, 1, 4, 4, requires_grad=True)
    out = CACLoss()(emb, margin, torch.full((2, 4, 4), 255))
    out.backward()
    assert out.item() == 0.0 and emb.grad.abs().sum() == 0


# ---------------------------------------------------------------- smooth
def test_smooth_equals_loop_and_detaches_the_mean(ops_path):
    g = torch.Generator().manual_seed(5)
    c = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 4), generator=g)
    labels[0, 0] = 255
    labels[1] = torch.where(labels[1] == 2, 0, labels[1])
    got = SmoothLoss()(c, labels)
    per_image, grad = [], torch.zeros_like(c)
    for n in range(2):
        y, v = labels[n].flatten(), c[n].flatten()
        classes = torch.unique(y[y != 255]).tolist()
        terms = []
        for k in classes:
            inside = y == k
            m = v[inside].mean().detach()
            terms.append(((v[inside] - m) ** 2).mean())
            g_k = torch.zeros_like(v)
            g_k[inside] = 2 * (v[inside] - m).detach() / inside.sum() / len(classes) / 2
            grad[n] += g_k.reshape(1, 4, 4)
        per_image.append(sum(terms) / len(terms))
    torch.testing.assert_close(got, sum(per_image) / 2)
    got.backward()
    torch.testing.assert_close(c.grad, grad)


def test_smooth_zero_for_constant_margins(ops_path):
    labels = torch.randint(0, 3, (2, 6, 6), generator=torch.Generator().manual_seed(6))
    c = torch.zeros(2, 6, 6)
    c[labels == 1] = 0.7
    c[labels == 2] = -0.2
    c = c[:, None]
    assert SmoothLoss()(c, labels).item() == pytest.approx(0.0, abs=1e-12)
    # labels at four times the size are downsampled inside
    assert SmoothLoss()(c, labels.repeat_interleave(4, 1).repeat_interleave(4, 2)).item() == pytest.approx(0.0)


# ---------------------------------------------------------------- OHEM
def logits_with_probs(probs, labels, num_classes=3):
    """Logits whose softmax gives the true class probability ``probs`` and splits the rest evenly."""
    other = (1 - probs) / (num_classes - 1)
    p = other[:, None].repeat(1, num_classes)
    p[torch.arange(len(probs)), labels.clamp(max=num_classes - 1)] = probs
    return p.log().t().reshape(1, num_classes, 1, -1).contiguous()


def test_ohem_keeps_pixels_below_thresh():
    probs = torch.tensor([0.1, 0.95, 0.5, 0.9, 0.6, 0.3, 0.99, 0.2])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 255])
    logits = logits_with_probs(probs, labels)
    loss = OhemCrossEntropy(thresh=0.7, min_kept=2)
    mask = loss.kept_mask(logits, labels[None, None])[0, 0]
    # below 0.7 and labelled: 0.1, 0.5, 0.6, 0.3 (the 0.2 pixel is ignored)
    assert mask.tolist() == [True, False, True, False, True, True, False, False]
    want = -torch.log(torch.tensor([0.1, 0.5, 0.6, 0.3])).mean()
    torch.testing.assert_close(loss(logits, labels[None, None]), want)


def test_ohem_keeps_at_least_min_kept():
    probs = torch.tensor([0.95, 0.8, 0.99, 0.9, 0.85, 0.5])
    labels = torch.tensor([0, 1, 2, 255, 1, 0])
    logits = logits_with_probs(probs, labels)
    mask = OhemCrossEntropy(thresh=0.7, min_kept=3).kept_mask(logits, labels[None, None])[0, 0]
    # only 0.5 is below 0.7: the three hardest labelled pixels are kept (0.5, 0.8, 0.85), never the ignored one
    assert mask.tolist() == [False, True, False, False, True, True]
    mask = OhemCrossEntropy(thresh=0.7, min_kept=100).kept_mask(logits, labels[None, None])[0, 0]
    assert mask.tolist() == [True, True, True, False, True, True]
    # with nothing ignored and everything kept it is the plain cross-entropy
    logits, labels = torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))
    torch.testing.assert_close(
        OhemCrossEntropy(thresh=1.0, min_kept=0)(logits, labels), F.cross_entropy(logits, labels)
    )


def ohem_mask_by_indexing(prob, valid, thresh, min_kept):
    """OCNet / HRNet's selection as they write it, with boolean indexing and a count read on the host."""
    p = prob[valid]
    keep = max(int((p < thresh).sum()), min(min_kept, p.numel()))
    chosen = torch.zeros_like(p, dtype=torch.bool)
    chosen[torch.argsort(p, stable=True)[:keep]] = True
    mask = torch.zeros_like(valid)
    mask[valid] = chosen
    return mask


@pytest.mark.parametrize("min_kept", [0, 1, 37, 10_000])
@pytest.mark.parametrize("thresh", [0.3, 0.7, 1.0])
def test_ohem_mask_equals_the_indexing_selection(thresh, min_kept):
    """The static-shape selection keeps exactly the pixels of the boolean-indexing one, ties included (the
    probabilities are rounded so many pixels share one)."""
    g = torch.Generator().manual_seed(min_kept + int(10 * thresh))
    logits = (torch.randn(2, 5, 9, 11, generator=g) * 2).round()
    labels = torch.randint(0, 5, (2, 9, 11), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.2] = 255
    loss = OhemCrossEntropy(thresh=thresh, min_kept=min_kept)
    valid = labels != 255
    prob = torch.softmax(logits, 1).gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    mask = loss.kept_mask(logits, labels)
    assert torch.equal(mask, ohem_mask_by_indexing(prob, valid, thresh, min_kept))
    assert mask.sum() > 0 or min_kept == 0


def lovasz_softmax_by_indexing(probs, labels, ignore_index=255):
    """Berman's lovasz_softmax_flat(classes='present'), with boolean indexing and torch.unique."""
    c = probs.shape[1]
    p = probs.permute(1, 0, 2, 3).reshape(c, -1)
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    p, labels = p[:, valid], labels[valid]
    losses = []
    for k in torch.unique(labels).tolist():
        fg = (labels == k).to(p.dtype)
        errors = (fg - p[k]).abs()
        order = torch.argsort(errors, descending=True)
        losses.append(torch.dot(errors[order], jaccard_grad(fg[order])))
    return torch.stack(losses).mean() if losses else probs.sum() * 0.0


def jaccard_grad(gt_sorted):
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


@pytest.mark.parametrize("ignore_index", [255, 0])
def test_lovasz_softmax_equals_berman_by_indexing(ignore_index):
    """Value and gradient in float64 against Berman's form, with ignored pixels, an absent class, and an
    ignore_index inside the class range (0: that class is never a target)."""
    from csfrn.losses import lovasz_softmax

    g = torch.Generator().manual_seed(ignore_index)
    logits = torch.randn(2, 4, 6, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 6, 7), generator=g)  # class 3 absent
    labels[torch.rand(labels.shape, generator=g) < 0.25] = ignore_index
    got_x = logits.clone().requires_grad_()
    got = lovasz_softmax(torch.softmax(got_x, 1), labels, ignore_index)
    want_x = logits.clone().requires_grad_()
    want = lovasz_softmax_by_indexing(torch.softmax(want_x, 1), labels, ignore_index)
    torch.testing.assert_close(got.double(), want)
    (g_got,) = torch.autograd.grad(got, got_x)
    (g_want,) = torch.autograd.grad(want, want_x)
    torch.testing.assert_close(g_got, g_want)
    everything_ignored = torch.full_like(labels, ignore_index)
    empty = lovasz_softmax(torch.softmax(logits, 1), everything_ignored, ignore_index)
    assert empty.item() == 0.0


def test_loss_argument_checks():
    with pytest.raises(ValueError, match="unknown binary loss"):
        CACLoss(binary="dice")
    with pytest.raises(ValueError, match=r"margin_map must have shape \[N, 1, h, w\]"):
        CACLoss()(torch.randn(1, 4, 4, 4), torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="one shape"):
        lovasz_hinge(torch.randn(2, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels \[N, H, W\]"):
        OhemCrossEntropy()(torch.randn(1, 3, 4, 4), torch.zeros(1, 5, 4, dtype=torch.long))


# ---------------------------------------------------------------- shared label index, half precision
def test_losses_take_a_shared_class_index(ops_path):
    from csfrn.losses import class_index

    g = torch.Generator().manual_seed(7)
    emb, margin = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 1, 4, 5, generator=g) * 0.1
    labels = torch.randint(0, 4, (2, 8, 10), generator=g)
    labels[:, 0] = 255
    index = class_index(labels, (4, 5), 255)
    torch.testing.assert_close(CACLoss()(emb, margin, index), CACLoss()(emb, margin, labels))
    torch.testing.assert_close(SmoothLoss()(margin, index), SmoothLoss()(margin, labels))
    with pytest.raises(ValueError, match="ClassIndex"):
        CACLoss()(torch.randn(2, 3, 2, 5), None, index)


def test_lovasz_half_precision_counts_exactly():
    from csfrn.losses.lovasz import lovasz_hinge_rows

    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 1000, generator=g).to(torch.bfloat16)
    positive = torch.rand(3, 1000, generator=g) < 0.3
    valid = torch.rand(3, 1000, generator=g) < 0.9
    want = lovasz_hinge_rows(logits.float(), positive, valid)
    torch.testing.assert_close(lovasz_hinge_rows(logits, positive, valid), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_class_losses_run_half_precision_inputs_in_float32(dtype, ops_path):
    """Under autocast the embeddings arrive in half precision; the losses compute in float32, so a class of
    more than 65504 pixels (a float16 count saturates) or 256 (bfloat16 rounds) keeps its exact mean."""
    g = torch.Generator().manual_seed(9)
    labels = torch.zeros(1, 300, 300, dtype=torch.long)  # 90000 pixels of class 0
    labels[:, :, :7] = 1
    emb = (torch.randn(1, 4, 300, 300, generator=g) * 0.3).to(dtype)
    margin = (torch.randn(1, 1, 300, 300, generator=g) * 0.1).to(dtype)
    for loss, args in ((CACLoss(), (emb, margin)), (SmoothLoss(), (margin,))):
        half = [a.clone().requires_grad_() for a in args]
        full = [a.float().requires_grad_() for a in args]
        got, want = loss(*half, labels), loss(*full, labels)
        assert got.dtype == torch.float32 and torch.equal(got, want)
        for a, b in zip(torch.autograd.grad(got, half), torch.autograd.grad(want, full)):
            assert a.dtype == dtype and torch.equal(a, b.to(dtype))


@pytest.mark.parametrize("binary", ["lovasz", "bce"])
def test_static_class_index_gives_the_loop_losses(binary, ops_path):
    """The models' index (``num_classes`` slots, no torch.unique: no host sync, one graph under compile) gives
    Eq. 4 and Eq. 5 of the per-class loop, values and gradients, with classes absent from one image or from the
    whole batch and an image without a labelled pixel."""
    from csfrn.losses import class_index

    g = torch.Generator().manual_seed(11)
    emb = (torch.randn(3, 3, 4, 5, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    margin = (torch.randn(3, 1, 4, 5, generator=g, dtype=torch.float64) * 0.1).requires_grad_(True)
    labels = torch.randint(0, 3, (3, 4, 5), generator=g)
    labels[0, 0] = 255
    labels[1][labels[1] == 1] = 6  # classes 3, 4, 5 and 7 absent from the batch, 6 from images 0 and 2
    labels[2] = 255  # nothing labelled in image 2
    index = class_index(labels, (4, 5), 255, num_classes=8)
    assert index.k == 8 and index.compact.max() == 8
    got = CACLoss(delta=10.0, binary=binary)(emb, margin, index)
    want = cac_loop(emb, margin, labels, 10.0, binary)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (emb, margin)), torch.autograd.grad(want, (emb, margin)))
    torch.testing.assert_close(SmoothLoss()(margin, index), SmoothLoss()(margin, labels))
    everything_ignored = class_index(torch.full((2, 4, 5), 255), (4, 5), 255, num_classes=8)
    out = CACLoss()(emb[:2], margin[:2], everything_ignored)
    assert out.item() == 0.0 and torch.autograd.grad(out, emb)[0].abs().sum() == 0
