"""The bad-input contract of the tools: exit status non-zero, no traceback, the last line of stderr naming the
offender, and an earlier run's files in the same OUTPUT_DIR unchanged; faults during a run (an image that
cannot be decoded, a truncated checkpoint) end the same way; the same from spawned workers (`--num-gpus 2`)."""
import hashlib
import os
import shutil

import pytest

pytest.importorskip("detectron2")
pytestmark = pytest.mark.slow  # tool subprocesses and training runs

from conftest import CONFIG_DIR, TINY_OPTS, tool_exit_message, tool_main  # noqa: E402
from test_train import GN_SHAPES, SMALL, tiny_shapes  # noqa: E402,F401  (tiny_shapes: a fixture)

from gn_det.data import generate_shapes  # noqa: E402

SYNCBN = os.path.join(CONFIG_DIR, "COCO-InstanceSegmentation", "mask_rcnn_R_50_FPN_3x_syncbn.yaml")


def file_hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(tmp_path):
    """An OUTPUT_DIR holding an earlier run's files."""
    out = tmp_path / "earlier_run"
    out.mkdir()
    for name, text in [("config.yaml", "OUTPUT_DIR: earlier\n"), ("log.txt", "earlier log\n"),
                       ("metrics.json", '{"iteration": 9, "total_loss": 1.0}\n'), ("model_final.pth", "weights"),
                       ("results.json", '{"val": {"bbox": {"AP": 1.0}}}')]:
        (out / name).write_text(text)
    return out


@pytest.fixture(scope="module")
def truncated_checkpoint(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("weights") / "truncated.pth"
    torch.save({"model": {"w": torch.zeros(4096)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    return path


def config_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# (id, arguments after --config-file's, the text the error line must contain)
def bad_input_cases(tmp_path, truncated_checkpoint):
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("these are not weights")
    missing_base = config_file(tmp_path, "missing_base.yaml", '_BASE_: "no/such/Base.yaml"\n')
    bad_yaml = config_file(tmp_path, "bad_yaml.yaml", "MODEL:\n  GN: [32,\n  WS: True\n")
    return [
        ("missing _BASE_", ["--config-file", missing_base], [missing_base, str(tmp_path / "no/such/Base.yaml")]),
        ("YAML syntax", ["--config-file", bad_yaml], [bad_yaml, "not valid YAML", "line"]),
        ("missing config file", ["--config-file", str(tmp_path / "none.yaml")], [str(tmp_path / "none.yaml")]),
        ("unknown key", ["--config-file", GN_SHAPES, "MODEL.GN.NUM_GROUP", "8"], ["MODEL.GN.NUM_GROUP"]),
        ("wrong type", ["--config-file", GN_SHAPES, "MODEL.GN.NUM_GROUPS", "many"], ["MODEL.GN.NUM_GROUPS", "many"]),
        ("groups vs channels", ["--config-file", GN_SHAPES, "MODEL.GN.NUM_GROUPS", "48"],
         ["MODEL.GN.NUM_GROUPS=48", "channels cannot be split", ".norm"]),
        ("weights missing", ["--config-file", GN_SHAPES, "MODEL.WEIGHTS", str(tmp_path / "none.pth")],
         ["MODEL.WEIGHTS", str(tmp_path / "none.pth"), "does not exist"]),
        ("weights not a checkpoint", ["--config-file", GN_SHAPES, "MODEL.WEIGHTS", str(not_a_checkpoint)],
         ["MODEL.WEIGHTS", str(not_a_checkpoint), "not a readable checkpoint"]),
        ("weights truncated", ["--config-file", GN_SHAPES, "MODEL.WEIGHTS", str(truncated_checkpoint)],
         [str(truncated_checkpoint), "not a readable checkpoint"]),
        ("fp16 on CPU", ["--config-file", GN_SHAPES, "MODEL.PRECISION", "fp16"],
         ["MODEL.PRECISION='fp16' needs a CUDA device"]),
        ("AMP on CPU", ["--config-file", GN_SHAPES, "SOLVER.AMP.ENABLED", "True"], ["SOLVER.AMP.ENABLED=True", "CUDA"]),
        ("batch size 0", ["--config-file", GN_SHAPES, "SOLVER.IMS_PER_BATCH", "0"], ["SOLVER.IMS_PER_BATCH=0"]),
        ("unregistered dataset", ["--config-file", GN_SHAPES, "DATASETS.TRAIN", "('unregistered',)"],
         ["DATASETS.TRAIN", "'unregistered'"]),
        ("dataset JSON missing", ["--config-file", GN_SHAPES, f"--dataset=x={tmp_path}/none.json,{tmp_path}"],
         [f"dataset 'x': annotation file {tmp_path}/none.json does not exist"]),
    ]


def test_each_bad_input_is_one_line_and_leaves_the_earlier_run_unchanged(tmp_path, earlier_run, tiny_shapes,
                                                                         truncated_checkpoint):
    before = file_hashes(earlier_run)
    for case, args, expected in bad_input_cases(tmp_path, truncated_checkpoint):
        # the tiny datasets and settings go first: the case's options override them
        flags = args[:2] + [a for a in args[2:] if a.startswith("--")]  # --config-file FILE, --dataset=...
        opts = [a for a in args[2:] if not a.startswith("--")]
        line = tool_exit_message("train_net.py", *flags, *tiny_shapes, *TINY_OPTS, *SMALL, *opts,
                                 "OUTPUT_DIR", str(earlier_run))
        for text in expected:
            assert text in line, (case, line)
        assert file_hashes(earlier_run) == before, case


def test_resume_from_a_truncated_checkpoint_names_it(earlier_run, tiny_shapes, truncated_checkpoint):
    shutil.copy(truncated_checkpoint, earlier_run / "model_0000009.pth")
    (earlier_run / "last_checkpoint").write_text("model_0000009.pth")
    before = file_hashes(earlier_run)
    line = tool_exit_message("train_net.py", "--config-file", GN_SHAPES, "--resume", *tiny_shapes, *SMALL,
                             "OUTPUT_DIR", str(earlier_run))
    assert f"the last checkpoint {earlier_run / 'model_0000009.pth'} is not a readable checkpoint" in line
    assert file_hashes(earlier_run) == before


def test_an_image_that_cannot_be_decoded_names_the_file_and_dataset(tmp_path, tiny_shapes):
    root = tmp_path / "broken"
    generate_shapes(str(root), num_train=4, num_val=2, image_size=128)
    for image in (root / "train").iterdir():  # every training image: the first batch meets one
        image.write_bytes(image.read_bytes()[:200])
    out = tmp_path / "run"
    out.mkdir()
    (out / "model_0000009.pth").write_bytes(b"an earlier checkpoint")
    # one DataLoader worker: its error reaches the trainer wrapped in the worker's traceback text
    line = tool_exit_message("train_net.py", "--config-file", GN_SHAPES,
                             f"--dataset=broken={root}/train.json,{root}/train", *tiny_shapes, *SMALL,
                             "DATALOADER.NUM_WORKERS", "1", "DATASETS.TRAIN", "('broken',)", "SOLVER.MAX_ITER", "2",
                             "OUTPUT_DIR", out)
    assert f"image {root}/train/" in line and "of dataset 'broken' cannot be decoded" in line, line
    assert (out / "model_0000009.pth").read_bytes() == b"an earlier checkpoint"


def test_undecodable_training_images_are_skipped_with_a_warning_behind_the_config_key(tmp_path, tiny_shapes):
    root = tmp_path / "one_broken"
    generate_shapes(str(root), num_train=4, num_val=2, image_size=128)
    *broken, good = sorted((root / "train").iterdir())  # 3 of 4: every batch of 2 meets one
    for image in broken:
        image.write_bytes(image.read_bytes()[:200])
    out = tmp_path / "run"
    tool_main("train_net.py", "--config-file", GN_SHAPES, f"--dataset=one_broken={root}/train.json,{root}/train",
              *tiny_shapes, *SMALL, "DATASETS.TRAIN", "('one_broken',)", "DATALOADER.SKIP_UNDECODABLE_IMAGES", "True",
              "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out))
    warnings = [line for line in (out / "log.txt").read_text().splitlines() if "cannot be decoded" in line]
    assert warnings and "skipped (DATALOADER.SKIP_UNDECODABLE_IMAGES; 1 skipped in this process)" in warnings[0]
    assert any(f"image {image} of dataset 'one_broken'" in warnings[0] for image in broken)
    assert not any(str(good) in line for line in warnings)
    assert (out / "model_final.pth").exists()


@pytest.mark.usefixtures("one_launch_at_a_time")
def test_bad_input_in_spawned_workers_is_one_line_from_the_parent(earlier_run, tiny_shapes):
    before = file_hashes(earlier_run)
    # launched from this process: the workers are spawned, and the parent ends in their one line
    line = tool_exit_message("train_net.py", "--config-file", GN_SHAPES, "--num-gpus", "2", *tiny_shapes, *SMALL,
                             "MODEL.GN.NUM_GROUPS", "48", "OUTPUT_DIR", earlier_run)
    assert "MODEL.GN.NUM_GROUPS=48" in line and "channels cannot be split" in line
    assert file_hashes(earlier_run) == before


def test_syncbn_config_on_two_cpu_processes_stops_with_one_line(earlier_run, monkeypatch):
    """The run's checks see the launch's world size. In this process as one of two (a spawned worker's one line
    reaching the parent: the test above)."""
    from detectron2.utils import comm

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    before = file_hashes(earlier_run)
    line = tool_exit_message("train_net.py", "--config-file", SYNCBN, *TINY_OPTS, "OUTPUT_DIR", earlier_run)
    assert "MODEL.RESNETS.NORM='SyncBN' needs CUDA with 2 processes" in line and "'naiveSyncBN'" in line
    assert file_hashes(earlier_run) == before


def test_feature_stats_tool_checks_its_layer_before_anything_is_written(earlier_run, tiny_shapes):
    before = file_hashes(earlier_run)
    line = tool_exit_message("feature_stats.py", "train", "--config-file", GN_SHAPES, "--layer",
                             "backbone.fpn_output9", *tiny_shapes, *SMALL, "OUTPUT_DIR", str(earlier_run))
    assert "the model has no module 'backbone.fpn_output9'" in line
    assert file_hashes(earlier_run) == before


def test_other_tools_end_bad_input_in_one_line(tmp_path):
    bad_yaml = config_file(tmp_path, "bad.yaml", "MODEL: [\n")
    weights = tmp_path / "weights"
    cases = [
        ("convert_weights.py", [str(tmp_path / "none.pth"), str(weights / "out.pkl")], ["none.pth", "does not exist"]),
        ("convert_weights.py", [str(tmp_path / "none.pth"), str(weights / "out.pkl"), "--config-file", bad_yaml],
         [bad_yaml, "not valid YAML"]),
        ("compare_runs.py", [str(tmp_path), "--out", str(tmp_path / "cmp" / "c")], [str(tmp_path), "OUTPUT_DIR"]),
        ("sweep.py", ["--norms", "GN", "--ims", "2", "--out", str(tmp_path / "sweep"), "SOLVER.MAX_ITR", "3"],
         ["SOLVER.MAX_ITR"]),
        ("sweep.py", ["--norms", "GN", "--ims", "2", "--out", str(tmp_path / "sweep"), "SOLVER.MAX_ITER"],
         ["SOLVER.MAX_ITER"]),
        ("paper_protocol.py", ["--out", str(tmp_path / "protocol"), "--weights-dir", str(weights),
                               "MODEL.GN.NUM_GROUPS", "48x"], ["MODEL.GN.NUM_GROUPS", "48x"]),
        ("pretrain_classifier.py", ["--norm", "GN", "--out", str(weights / "gn.pth"), "--iters", "0",
                                    "--data", str(tmp_path / "pretrain_data")], ["iters=0"]),
        ("benchmark.py", ["--config", "MODEL.GN.NUM_GROUP", "8"], ["MODEL.GN.NUM_GROUP"]),
        ("benchmark.py", ["--variants", "d2_gn_amp", "--device", "cpu"], ["d2_gn_amp", "needs --device cuda"]),
    ]
    for tool, args, expected in cases:
        line = tool_exit_message(tool, *args)
        for text in expected:
            assert text in line, (tool, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written by any of them


def raise_in_worker(error_type, message, _args):
    raise error_type(message)


@pytest.mark.usefixtures("one_launch_at_a_time")
def test_launch_keeps_the_traceback_of_a_bug_in_a_worker():
    """A bug in a spawned worker reaches the parent as torch's exception with the worker's traceback. (A worker's
    InputError arrives as its one line: test_bad_input_in_spawned_workers_is_one_line_from_the_parent through
    train_net, and tests/test_verdict.py for an InputError subclass.)"""
    import functools
    import types

    from torch.multiprocessing import ProcessRaisedException

    from gn_det.engine import launch

    args = types.SimpleNamespace(num_gpus=2, num_machines=1, machine_rank=0, dist_url="auto")
    with pytest.raises(ProcessRaisedException, match=r"(?s)Traceback.*KeyError: 'internal'"):
        launch(functools.partial(raise_in_worker, KeyError, "internal"), args)


@pytest.mark.parametrize("batch, world_size, ok", [(3, 2, False), (4, 2, True), (0, 1, False), (2, 1, True)])
def test_batch_must_split_evenly_over_the_processes(batch, world_size, ok):
    from gn_det.config import get_gn_cfg
    from gn_det.engine.run import check_run, yaml_settings
    from gn_det.errors import InputError

    settings = yaml_settings(get_gn_cfg(GN_SHAPES, ["SOLVER.IMS_PER_BATCH", str(batch), "MODEL.DEVICE", "cpu"]),
                             "my.yaml")
    check_run(settings, world_size, training=False)  # evaluation ignores the training batch
    if ok:
        check_run(settings, world_size, training=True)
    else:
        with pytest.raises(InputError, match=rf"^my\.yaml: SOLVER\.IMS_PER_BATCH={batch} must be a positive "
                                             rf"multiple of the number of processes \({world_size}\)$"):
            check_run(settings, world_size, training=True)


def test_evaluation_checks_only_the_test_datasets():
    from gn_det.config import get_gn_cfg
    from gn_det.engine.run import check_datasets, yaml_settings
    from gn_det.errors import InputError

    settings = yaml_settings(get_gn_cfg(GN_SHAPES, ["DATASETS.TRAIN", "('unregistered_train',)", "DATASETS.TEST", "()"]),
                             "my.yaml")
    check_datasets(settings, training=False)
    with pytest.raises(InputError, match=r"^my\.yaml: DATASETS\.TRAIN names dataset 'unregistered_train'"):
        check_datasets(settings, training=True)
