"""The paper's protocol in miniature: shape-crop classification data, classifiers that convert into gn-det
backbones computing the same features, and tools/paper_protocol.py end to end at tiny size."""
import json
import os
import pickle

import pytest

pytest.importorskip("detectron2")
pytestmark = pytest.mark.slow  # tool subprocesses and training runs

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from conftest import CONFIG_DIR, tool_exit_message, tool_main  # noqa: E402
from gn_det.analysis.pretrain import (  # noqa: E402
    CROP_PADDING,
    CROP_SIZE,
    FINETUNE_CONFIGS,
    augment,
    build_classifier,
    convert_and_check,
    ensure_pretrain_data,
    instance_crops,
    normalize,
)
from gn_det.config import get_gn_cfg  # noqa: E402
from gn_det.data import generate_shapes  # noqa: E402
from gn_det.errors import InputError  # noqa: E402
from gn_det.layers.norm import GroupNorm  # noqa: E402

SMALL = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "128",
         "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
         "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
         "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "TEST.DETECTIONS_PER_IMAGE", "10", "DATALOADER.NUM_WORKERS", "0",
         "TEST.EVAL_PERIOD", "0"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return generate_shapes(str(tmp_path_factory.mktemp("shapes")), num_train=6, num_val=3, image_size=128)


def test_instance_crops_are_one_per_instance_labelled_by_class(tiny_root):
    images, labels = instance_crops(os.path.join(tiny_root, "train.json"), os.path.join(tiny_root, "train"))
    with open(os.path.join(tiny_root, "train.json")) as f:
        annotations = json.load(f)["annotations"]
    assert images.shape == (len(annotations), 3, CROP_SIZE + CROP_PADDING, CROP_SIZE + CROP_PADDING)
    assert images.dtype == torch.uint8
    assert labels.tolist() == [a["category_id"] - 1 for a in annotations]
    generator = torch.Generator().manual_seed(0)
    assert augment(images[:4], generator).shape == (min(4, len(labels)), 3, CROP_SIZE, CROP_SIZE)


def randomized(model, norm):
    """A classifier whose norms hold non-trivial γ/β (and BN statistics), so that equal outputs prove the
    conversion rather than the identity of a fresh norm."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    if norm == "BN":
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 3, CROP_SIZE, CROP_SIZE) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("norm", ["GN", "BN"])
def test_pretrained_classifier_loads_into_the_fine_tuning_model_and_computes_the_same_features(tmp_path, norm):
    classifier = randomized(build_classifier(norm), norm)
    state_dict_path, checkpoint_path = str(tmp_path / "cls.pth"), str(tmp_path / "cls.pkl")
    torch.save(classifier.state_dict(), state_dict_path)
    config = os.path.join(CONFIG_DIR, "shapes", FINETUNE_CONFIGS[norm])
    converted, match = convert_and_check(state_dict_path, checkpoint_path, config)
    assert converted.unused_keys == ["fc.weight", "fc.bias"] and not match.missing and not match.unused

    cfg = get_gn_cfg(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", checkpoint_path])
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(checkpoint_path)
    bottom_up = model.backbone.bottom_up
    expected_norm = GroupNorm if norm == "GN" else FrozenBatchNorm2d
    assert isinstance(bottom_up.res4[0].conv1.norm, expected_norm)

    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    # the detectron2 model normalizes its RGB input exactly as the classifier was fed
    torch.testing.assert_close((pixels.float() - model.pixel_mean) / model.pixel_std, normalize(pixels))
    x = normalize(pixels)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(classifier.children())[:-2])  # up to layer4
        torch.testing.assert_close(bottom_up(x)["res5"], trunk(x), rtol=1e-4, atol=1e-4)


def test_paper_protocol_chain_at_tiny_size(tmp_path, tiny_root, capsys):
    weights, out = tmp_path / "weights", tmp_path / "protocol"
    register = (f"['tiny_train={tiny_root}/train.json,{tiny_root}/train', "
                f"'tiny_val={tiny_root}/val.json,{tiny_root}/val']")
    capsys.readouterr()
    # the tool in this process; each fine-tuning run still trains in a train_net.py subprocess
    args = ["--weights-dir", weights, "--out", out, "--pretrain-data", tmp_path / "pretrain_shapes",
            "--pretrain-images", "6", "2", "--pretrain-iters", "2", "--pretrain-batch-size", "4",
            "DATASETS.REGISTER", register, "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)", *SMALL,
            "SOLVER.MAX_ITER", "2"]
    tool_main("paper_protocol.py", *args)
    stdout = capsys.readouterr().out
    for norm, name in (("GN", "shapes_resnet18_gn"), ("BN", "shapes_resnet18_bn")):
        assert (weights / f"{name}.pth").exists()
        assert 0.0 <= json.loads((weights / f"{name}.json").read_text())["val_accuracy"] <= 1.0
        assert f"[{norm}] converted to {weights / name}.pkl: all " in stdout
        run_dir = out / FINETUNE_CONFIGS[norm][:-len(".yaml")]
        assert set(json.loads((run_dir / "results.json").read_text())["tiny_val"]) == {"bbox", "segm"}
        # FREEZE_AT 2: the stem is exactly the pretrained one after fine-tuning, which proves it was loaded
        with open(weights / f"{name}.pkl", "rb") as f:
            pretrained_stem = pickle.load(f)["model"]["stem.conv1.weight"]
        final = torch.load(run_dir / "model_final.pth", map_location="cpu", weights_only=True)["model"]
        np.testing.assert_array_equal(final["backbone.bottom_up.stem.conv1.weight"].numpy(), pretrained_stem)
    table = (out / "comparison.md").read_text()
    assert "GN, pretrained GN" in table and "BN*, pretrained BN" in table and "Pretraining" in table
    assert (out / "comparison.png").stat().st_size > 10_000 and (out / "comparison.csv").exists()

    # what the protocol keeps was made as asked, or the run stops in one line before touching anything
    before = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    other_pretraining = list(args)
    other_pretraining[other_pretraining.index("--pretrain-iters") + 1] = "3"
    assert tool_exit_message("paper_protocol.py", *other_pretraining) == (
        f"paper_protocol.py: error: {weights}/shapes_resnet18_gn.pth was pretrained with iters=2 "
        f"({weights}/shapes_resnet18_gn.json), not the 3 asked; delete it or give another --weights-dir")
    gn_run = out / FINETUNE_CONFIGS["GN"][:-len(".yaml")]
    assert tool_exit_message("paper_protocol.py", *args[:-1], "3") == (
        f"paper_protocol.py: error: {gn_run} holds a finished run started with other options (see "
        f"{gn_run}/sweep_cell.json); delete the folder or give another --out")
    assert sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_pretrain_data_is_generated_per_image_count_and_a_folder_of_other_counts_is_refused(tmp_path, monkeypatch):
    """A generated folder is never regenerated, so the default folder is one per count, and a named folder
    holding other counts is an InputError naming it rather than silently used."""
    monkeypatch.setenv("GN_DET_CACHE", str(tmp_path))
    small, larger = ensure_pretrain_data(None, num_train=2, num_val=1), ensure_pretrain_data(None, 3, 1)
    assert small != larger
    for root, (train, val) in ((small, (2, 1)), (larger, (3, 1))):
        for split, count in (("train", train), ("val", val)):
            with open(os.path.join(root, f"{split}.json")) as f:
                assert len(json.load(f)["images"]) == count
    assert ensure_pretrain_data(small, 2, 1) == small
    with pytest.raises(InputError, match=f"{small} holds 2 train images, not the 3"):
        ensure_pretrain_data(small, 3, 1)


def test_pretrain_classifier_rejects_bad_input_before_writing_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("GN_DET_CACHE", str(tmp_path / "cache"))
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.png").touch()
    (tmp_path / "taken").touch()
    cases = {("--num-train", "0"): "num_train=0 must be >= 1", ("--num-val", "-1"): "num_val=-1 must be >= 1",
             ("--lr", "-1"): "lr=-1.0 must be a finite number > 0", ("--lr", "nan"): "lr=nan must be",
             ("--data", foreign): f"pretraining data {foreign} exists but is not a complete shapes dataset",
             ("--out", tmp_path / "taken" / "cls.pth"): f"{tmp_path / 'taken'} is a file, not a folder"}
    for option, expected in cases.items():
        args = ["--norm", "GN", "--out", tmp_path / "cls.pth", "--iters", "1", "--num-train", "1", "--num-val", "1",
                *option]  # the last of a repeated option wins
        assert expected in tool_exit_message("pretrain_classifier.py", *args), option
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "taken"]
    assert [p.name for p in foreign.iterdir()] == ["cat.png"]
