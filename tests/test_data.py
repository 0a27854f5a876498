"""Datasets against small fake trees in their real layouts, label mappings, errors, transforms, Synthetic."""

import numpy as np
import pytest
import torch

from csfrn.data import ADE20K, COCOStuff, Cityscapes, FolderDataset, PascalContext, Synthetic
from csfrn.data import transforms as T
from csfrn.data.cityscapes import ID_TO_TRAINID, train_ids_to_label_ids
from csfrn.data.coco_stuff import RAW_TO_TRAIN, UNUSED_IDS

from conftest import rgb, write_jpg, write_png


def _check_item(image, label, hw):
    assert image.dtype == torch.uint8 and image.shape == (3, *hw)
    assert label.dtype == torch.int64 and label.shape == hw


# ---------------------------------------------------------------- Cityscapes
def _cityscapes(root, label_ids, train_ids=None, split="train", city="aachen", stem="aachen_000000_000019"):
    write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb(*label_ids.shape))
    write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids)
    if train_ids is not None:
        write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", train_ids)


def test_cityscapes_maps_label_ids_like_the_official_table(tmp_path):
    ids = np.array(
        [[0, 1, 6, 7, 8, 9, 11, 12], [17, 19, 20, 23, 24, 26, 31, 33], [255, 29, 30, 14, 15, 16, 18, 25]],
        dtype=np.uint8,
    )
    _cityscapes(tmp_path, ids)
    image, label = Cityscapes(str(tmp_path), "train")[0]
    _check_item(image, label, (3, 8))
    expected = [
        [255, 255, 255, 0, 1, 255, 2, 3],
        [5, 6, 7, 10, 11, 13, 16, 18],
        [255, 255, 255, 255, 255, 255, 255, 12],
    ]
    assert label.tolist() == expected
    # the whole table: all 19 train ids come from exactly one label id each
    assert sorted(t for t in ID_TO_TRAINID.values() if t != 255) == list(range(19))
    back = train_ids_to_label_ids(np.array(expected, dtype=np.uint8))
    assert back[0, 3] == 7 and back[1, 7] == 33 and back[2, 7] == 25 and back[0, 0] == 0


def test_cityscapes_prefers_label_train_ids(tmp_path):
    ids = np.full((4, 4), 7, dtype=np.uint8)
    train_ids = np.full((4, 4), 18, dtype=np.uint8)
    _cityscapes(tmp_path, ids, train_ids, split="val")
    ds = Cityscapes(str(tmp_path), "val")
    assert ds.samples[0][1].endswith("_gtFine_labelTrainIds.png")
    assert ds[0][1].unique().tolist() == [18]
    assert len(ds.classes) == len(ds.palette) == 19


def test_cityscapes_errors_name_paths_and_values(tmp_path):
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        Cityscapes(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Cityscapes(str(tmp_path / "nowhere"), "train")
    _cityscapes(tmp_path, np.array([[7, 40]], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"labelIds\.png.*value 40"):
        Cityscapes(str(tmp_path), "train")[0]
    (tmp_path / "leftImg8bit" / "val" / "x").mkdir(parents=True)
    (tmp_path / "gtFine" / "val" / "x").mkdir(parents=True)
    (tmp_path / "leftImg8bit" / "val" / "x" / "a_leftImg8bit.png").write_bytes(b"not a png")
    with pytest.raises(FileNotFoundError, match="a_gtFine_labelTrainIds.png"):
        Cityscapes(str(tmp_path), "val")
    write_png(tmp_path / "gtFine" / "val" / "x" / "a_gtFine_labelIds.png", np.zeros((2, 2)))
    with pytest.raises(OSError, match="a_leftImg8bit.png"):
        Cityscapes(str(tmp_path), "val")[0]
    with pytest.raises(ValueError, match="split"):
        Cityscapes(str(tmp_path), "training")


# ---------------------------------------------------------------- ADE20K
def test_ade20k_reduce_zero_label_and_test_split(tmp_path):
    raw = np.array([[0, 1, 2], [150, 255, 75]], dtype=np.uint8)
    write_jpg(tmp_path / "images" / "training" / "ADE_train_1.jpg", rgb(2, 3))
    write_png(tmp_path / "annotations" / "training" / "ADE_train_1.png", raw)
    ds = ADE20K(str(tmp_path), "train")
    image, label = ds[0]
    _check_item(image, label, (2, 3))
    assert label.tolist() == [[255, 0, 1], [149, 255, 74]]
    assert len(ds.classes) == len(ds.palette) == 150
    write_jpg(tmp_path / "images" / "testing" / "ADE_test_1.jpg", rgb(2, 3))
    assert ADE20K(str(tmp_path), "test")[0][1].eq(255).all()
    write_png(tmp_path / "annotations" / "training" / "ADE_train_1.png", np.array([[151]], dtype=np.uint8))
    with pytest.raises(ValueError, match="ADE_train_1.png.*value 151"):
        ds[0]
    (tmp_path / "images" / "validation").mkdir()
    with pytest.raises(FileNotFoundError, match="annotations/validation"):
        ADE20K(str(tmp_path), "val")


# ---------------------------------------------------------------- COCO-Stuff
def test_coco_stuff_164k_maps_182_raw_ids_to_171(tmp_path):
    raw = np.array([[0, 10, 12, 181], [255, 11, 91, 92]], dtype=np.uint8)
    write_jpg(tmp_path / "images" / "val2017" / "000000000139.jpg", rgb(2, 4))
    write_png(tmp_path / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", raw)
    ds = COCOStuff(str(tmp_path), "val")
    image, label = ds[0]
    _check_item(image, label, (2, 4))
    assert label.tolist() == [[0, 10, 11, 170], [255, 255, 80, 81]]
    assert len(ds.classes) == len(ds.palette) == 171
    assert len(RAW_TO_TRAIN) == 171 and not set(UNUSED_IDS) & set(RAW_TO_TRAIN)
    write_png(tmp_path / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", np.array([[200]]))
    with pytest.raises(ValueError, match="000000000139.png.*value 200"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="train2017"):
        COCOStuff(str(tmp_path), "train")


def test_coco_stuff_10k_layout_with_png_labels(tmp_path):
    write_jpg(tmp_path / "images" / "COCO_train2014_000000000077.jpg", rgb(3, 3))
    write_png(tmp_path / "annotations" / "COCO_train2014_000000000077.png", np.full((3, 3), 93))
    (tmp_path / "imageLists").mkdir()
    (tmp_path / "imageLists" / "train.txt").write_text("COCO_train2014_000000000077\n")
    (tmp_path / "imageLists" / "test.txt").write_text("COCO_train2014_missing\n")
    assert COCOStuff(str(tmp_path), "train")[0][1].unique().tolist() == [RAW_TO_TRAIN[93]]
    with pytest.raises(FileNotFoundError, match="COCO_train2014_missing.jpg"):
        COCOStuff(str(tmp_path), "val")
    with pytest.raises(FileNotFoundError, match="10k layout"):
        COCOStuff(str(tmp_path / "images"), "train")


# ---------------------------------------------------------------- PASCAL Context
def test_pascal_context_59_classes(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    write_jpg(voc / "JPEGImages" / "2008_000002.jpg", rgb(2, 2))
    write_png(voc / "SegmentationClassContext" / "2008_000002.png", np.array([[0, 1], [59, 255]]))
    (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (voc / "ImageSets" / "SegmentationContext" / "train.txt").write_text("2008_000002\n")
    ds = PascalContext(str(tmp_path), "train")
    assert ds[0][1].tolist() == [[255, 0], [58, 255]]
    assert len(ds.classes) == len(ds.palette) == 59
    with pytest.raises(FileNotFoundError, match="val.txt"):
        PascalContext(str(tmp_path), "val")
    write_png(voc / "SegmentationClassContext" / "2008_000002.png", np.array([[60]]))
    with pytest.raises(ValueError, match="2008_000002.png.*value 60"):
        ds[0]


# ---------------------------------------------------------------- FolderDataset
def test_folder_dataset_pairs_by_stem(tmp_path):
    (tmp_path / "classes.txt").write_text("sky\nground\n")
    write_jpg(tmp_path / "images" / "train" / "b.jpg", rgb(2, 2))
    write_png(tmp_path / "images" / "train" / "a.png", rgb(2, 2, seed=1))
    write_png(tmp_path / "masks" / "train" / "a.png", np.array([[0, 1], [255, 1]]))
    write_png(tmp_path / "masks" / "train" / "b.png", np.array([[1, 1], [1, 1]]))
    ds = FolderDataset(str(tmp_path), "train")
    assert ds.classes == ("sky", "ground") and len(ds.palette) == 2 and len(ds) == 2
    image, label = ds[0]
    assert torch.equal(image, torch.from_numpy(rgb(2, 2, seed=1)).permute(2, 0, 1))
    assert label.tolist() == [[0, 1], [255, 1]]
    write_png(tmp_path / "masks" / "train" / "b.png", np.array([[2, 1], [1, 1]]))
    with pytest.raises(ValueError, match="b.png.*value 2"):
        ds[1]
    with pytest.raises(FileNotFoundError, match="images/val"):
        FolderDataset(str(tmp_path), "val")
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        FolderDataset(str(tmp_path), "train")


# ---------------------------------------------------------------- Synthetic
def test_synthetic_is_deterministic_and_well_formed():
    a = Synthetic("train", seed=3, size=32, length=5, num_classes=5)
    b = Synthetic("train", seed=3, size=32, length=5, num_classes=5)
    for i in range(5):
        (ia, la), (ib, lb) = a[i], b[i]
        _check_item(ia, la, (32, 32))
        assert torch.equal(ia, ib) and torch.equal(la, lb)
        assert 0 <= int(la.min()) and int(la.max()) < 5
    assert not torch.equal(a[0][0], Synthetic("val", seed=3, size=32, length=5)[0][0])
    assert not torch.equal(a[0][0], Synthetic("train", seed=4, size=32, length=5)[0][0])
    assert len(a.classes) == len(a.palette) == 5


def test_synthetic_paired_classes_share_colour_but_not_texture():
    ds = Synthetic("train", seed=0, size=64, length=64, num_classes=5, noise=0.0)
    means, grads = {}, {}
    for i in range(64):
        image, label = ds[i]
        img = image.float()
        dx = (img[:, :, 1:] - img[:, :, :-1]).abs().mean(0)
        for k in (1, 2):
            m = label == k
            inner = m[:, 1:] & m[:, :-1]
            if inner.sum() > 50:
                means.setdefault(k, []).append(img[:, m].mean(1))
                grads.setdefault(k, []).append(float(dx[inner].mean()))
    mean1, mean2 = torch.stack(means[1]).mean(0), torch.stack(means[2]).mean(0)
    assert (mean1 - mean2).abs().max() < 15  # same mean colour, up to the random colour shifts
    # class 1 has horizontal-axis stripes (changes along x), class 2 vertical ones (constant along x)
    assert np.mean(grads[1]) > 3 * np.mean(grads[2])


# ---------------------------------------------------------------- transforms
def _coded_pair(h=40, w=56):
    """An image whose red channel is 40 * label in flat regions, so alignment can be checked after transforms."""
    label = torch.zeros(h, w, dtype=torch.int64)
    label[5:25, 10:30] = 1
    label[20:38, 35:52] = 2
    label[0:6, 40:56] = 3
    image = torch.stack([label * 40, torch.full_like(label, 100), label * 20]).to(torch.uint8)
    return image, label


def _assert_aligned(image, label):
    interior = torch.ones_like(label, dtype=torch.bool)
    padded = label == 255
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            interior &= torch.roll(label, (dy, dx), (0, 1)) == label
    interior[0, :] = interior[-1, :] = interior[:, 0] = interior[:, -1] = False
    keep = interior & ~padded
    assert keep.sum() > 50
    assert torch.allclose(image[0].float()[keep], 40.0 * label[keep].float(), atol=2)


@pytest.mark.parametrize("seed", range(6))
def test_train_transforms_keep_image_and_label_aligned(seed):
    image, label = _coded_pair()
    pipeline = T.Compose([T.RandomScale((0.75, 2.0)), T.RandomCrop((48, 48), fill=(0, 0, 0)), T.RandomFlip()])
    g = torch.Generator().manual_seed(seed)
    out_image, out_label = pipeline(image, label, generator=g)
    assert out_image.shape == (3, 48, 48) and out_label.shape == (48, 48)
    assert set(out_label.unique().tolist()) <= {0, 1, 2, 3, 255}
    _assert_aligned(out_image, out_label)


def test_crop_pads_label_with_ignore_and_image_with_mean():
    image, label = _coded_pair(10, 12)
    out_image, out_label = T.RandomCrop((16, 20))(image, label, generator=torch.Generator().manual_seed(0))
    assert out_label[10:].eq(255).all() and out_label[:, 12:].eq(255).all()
    assert torch.equal(out_label[:10, :12], label)
    norm, _ = T.Normalize()(out_image, out_label)
    assert norm[:, 12:, :].abs().max() < 0.01  # the padding normalises to ~0


def test_transforms_reproducible_from_generator_and_photometric_keeps_label():
    image, label = _coded_pair()
    pipeline = T.train_transforms((32, 32))
    a = pipeline(image, label, generator=torch.Generator().manual_seed(7))
    b = pipeline(image, label, generator=torch.Generator().manual_seed(7))
    c = pipeline(image, label, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].dtype == torch.float32 and a[1].dtype == torch.int64
    jittered, same = T.PhotoMetricDistortion()(image, label, generator=torch.Generator().manual_seed(1))
    assert same is label and jittered.dtype == torch.uint8
