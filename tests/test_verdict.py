"""The dataset check done once: the verdict cached by the files' fingerprints, and shared by process 0."""
import functools
import json
import os

import pytest

pytest.importorskip("detectron2")

from gn_det.analysis.startup import generate_coco_scale  # noqa: E402
from gn_det.data import register, verdict  # noqa: E402
from gn_det.errors import InputError  # noqa: E402


@pytest.fixture
def tiny_coco(tmp_path, monkeypatch):
    """A 6-image, 15-annotation COCO set (images hard links to one JPEG) and an empty gn-det cache."""
    monkeypatch.setenv("GN_DET_CACHE", str(tmp_path / "cache"))
    return generate_coco_scale(str(tmp_path / "coco"), num_images=6, num_annotations=15, num_categories=3,
                               image_size=32)


@pytest.fixture
def checks(monkeypatch):
    """Counts the full checks (JSON parsed, images looked up) that run."""
    calls = []
    full_check = register.check_coco_dataset_verdict

    def counted(*args):
        calls.append(args)
        return full_check(*args)

    monkeypatch.setattr(register, "check_coco_dataset_verdict", counted)
    return calls


def cached_files():
    folder = verdict.verdict_dir()
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_verdict_is_cached_and_reused(tiny_coco, checks):
    json_file, image_dir = tiny_coco
    classes = register.check_coco_dataset_once(json_file, image_dir, "tiny")
    assert classes == ["class_1", "class_2", "class_3"]
    assert len(checks) == 1
    files = cached_files()
    assert len(files) == 1 and files[0].endswith(".json")  # written atomically: no temporary file left
    with open(os.path.join(verdict.verdict_dir(), files[0])) as f:
        entry = json.load(f)
    assert entry["key"]["json_file"] == os.path.abspath(json_file)
    assert register.check_coco_dataset_once(json_file, image_dir, "other name") == classes
    assert register.check_coco_dataset_once(os.path.relpath(json_file), image_dir, "tiny") == classes
    assert len(checks) == 1
    assert register.check_coco_dataset(json_file, image_dir) == classes  # the check itself is never cached
    assert len(checks) == 2


def test_changed_json_is_checked_again(tiny_coco, checks):
    json_file, image_dir = tiny_coco
    register.check_coco_dataset_once(json_file, image_dir, "tiny")
    # same size, only the mtime changes
    st = os.stat(json_file)
    os.utime(json_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    register.check_coco_dataset_once(json_file, image_dir, "tiny")
    assert len(checks) == 2
    # another size: an image more, whose file is missing; the check fails as check_coco_dataset does
    with open(json_file) as f:
        coco = json.load(f)
    coco["images"].append(dict(coco["images"][0], id=99, file_name="nowhere.jpg"))
    with open(json_file, "w") as f:
        json.dump(coco, f)
    message = rf"dataset 'tiny': {json_file}: image 99 file 'nowhere.jpg' is not in {image_dir}"
    with pytest.raises(InputError, match=message):
        register.check_coco_dataset_once(json_file, image_dir, "tiny")
    with pytest.raises(InputError, match=message):  # a failed check is not cached: it fails again, the same way
        register.check_coco_dataset_once(json_file, image_dir, "tiny")
    assert len(checks) == 4


def test_removed_image_is_found_despite_a_cached_verdict(tiny_coco, checks):
    json_file, image_dir = tiny_coco
    register.check_coco_dataset_once(json_file, image_dir, "tiny")
    os.remove(os.path.join(image_dir, "000000000003.jpg"))  # the folder's mtime/ctime change
    with pytest.raises(InputError, match=r"image 3 file '000000000003.jpg' is not in "):
        register.check_coco_dataset_once(json_file, image_dir, "tiny")
    assert len(checks) == 2


def test_missing_files_fail_before_the_cache(tiny_coco, tmp_path):
    json_file, image_dir = tiny_coco
    register.check_coco_dataset_once(json_file, image_dir, "tiny")
    with pytest.raises(InputError, match=r"dataset 'tiny': image folder .*elsewhere does not exist"):
        register.check_coco_dataset_once(json_file, str(tmp_path / "elsewhere"), "tiny")
    os.remove(json_file)
    with pytest.raises(InputError, match=r"dataset 'tiny': annotation file .*instances\.json does not exist"):
        register.check_coco_dataset_once(json_file, image_dir, "tiny")


def test_symlinked_image_or_unreadable_cache_means_a_full_check(tiny_coco, checks):
    json_file, image_dir = tiny_coco
    image = os.path.join(image_dir, "000000000002.jpg")
    os.remove(image)
    os.symlink(os.path.join(os.path.dirname(image_dir), "one.jpg"), image)
    register.check_coco_dataset_once(json_file, image_dir, "tiny")
    assert cached_files() == []  # a symlink's target is not fingerprinted: not cached
    register.check_coco_dataset_once(json_file, image_dir, "tiny")
    assert len(checks) == 2
    os.remove(image)
    os.link(os.path.join(os.path.dirname(image_dir), "one.jpg"), image)
    register.check_coco_dataset_once(json_file, image_dir, "tiny")
    (name,) = cached_files()
    with open(os.path.join(verdict.verdict_dir(), name), "w") as f:
        f.write("{not json")
    register.check_coco_dataset_once(json_file, image_dir, "tiny")
    assert len(checks) == 4
    register.check_coco_dataset_once(json_file, image_dir, "tiny")  # the rewritten verdict
    assert len(checks) == 4


def test_a_verdict_of_an_older_check_does_not_skip_the_current_one(tiny_coco, checks):
    """A dataset passed before the check required a bbox: its verdict, keyed as it was then, is not read."""
    json_file, image_dir = tiny_coco
    with open(json_file) as f:
        coco = json.load(f)
    del coco["annotations"][0]["bbox"]
    with open(json_file, "w") as f:
        json.dump(coco, f)
    old_key = {"json_file": json_file, "json": register.fingerprint(json_file), "image_dir": image_dir}
    verdict.write_verdict(old_key, {"thing_classes": ["class_1", "class_2", "class_3"],
                                    "image_folders": [[image_dir, register.fingerprint(image_dir)]]})
    assert verdict.read_verdict(old_key) is not None
    with pytest.raises(InputError, match=r"annotation 1 \{.* has no 'bbox'"):
        register.check_coco_dataset_once(json_file, image_dir, "tiny")
    assert len(checks) == 1


def test_shared_verdict_comes_from_process_0(monkeypatch):
    from detectron2.utils import comm

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "get_rank", lambda: 1)

    def not_in_this_process():
        raise AssertionError("only process 0 checks")

    monkeypatch.setattr(comm, "all_gather", lambda data: [("ok", ["a"]), data])
    assert verdict.shared(not_in_this_process, "the check") == ["a"]
    monkeypatch.setattr(comm, "all_gather", lambda data: [("input error", "dataset 'x': bad"), data])
    with pytest.raises(InputError, match="^dataset 'x': bad$"):
        verdict.shared(not_in_this_process, "the check")
    monkeypatch.setattr(comm, "all_gather", lambda data: [("failed", "OSError: disk"), data])
    with pytest.raises(RuntimeError, match="the check failed in process 0: OSError: disk"):
        verdict.shared(not_in_this_process, "the check")

    # process 0 checks and hands its verdict (or error) to all
    monkeypatch.setattr(comm, "get_rank", lambda: 0)
    sent = []
    monkeypatch.setattr(comm, "all_gather", lambda data: sent.append(data) or [data, None])
    assert verdict.shared(lambda: ["b"], "the check") == ["b"]

    def bad():
        raise InputError("dataset 'y': bad")

    with pytest.raises(InputError, match="dataset 'y': bad"):
        verdict.shared(bad, "the check")
    assert sent == [("ok", ["b"]), ("input error", "dataset 'y': bad")]


def test_a_launched_worker_leaves_its_process_group_when_it_returns(tmp_path):
    """A worker that exits with a gloo group alive may abort in the interpreter's teardown (SIGABRT)."""
    import torch.distributed as dist

    from gn_det.engine.launch import run_worker

    def in_group():
        assert dist.is_initialized()
        return "done"

    def bad():
        raise DatasetError("dataset 'y': bad")

    class DatasetError(InputError):
        pass

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert run_worker(in_group) == "done"
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # a subclass of InputError reaches the parent as a plain InputError of its line
    with pytest.raises(InputError, match="^dataset 'y': bad$") as raised:
        run_worker(bad)
    assert type(raised.value) is InputError


def check_in_each_process(json_file, image_dir, records):
    """Run by each process of a 2-process launch: the check once per folder of ``records`` (the verdict is
    cached on disk, so a later round reads it as a later start would), noting which processes ran the full check
    and, beside ``records``, which ran their exit handlers."""
    import atexit

    from detectron2.utils import comm

    full_check = register.check_coco_dataset_verdict
    rank = comm.get_rank()
    exit_mark = os.path.join(os.path.dirname(records[0]), f"exit_handlers_ran_{rank}")
    atexit.register(lambda: open(exit_mark, "w").close())
    for record in records:
        def counted(*args, record=record):
            open(os.path.join(record, f"checked_by_{rank}"), "w").close()
            return full_check(*args)

        register.check_coco_dataset_verdict = counted
        classes = register.check_coco_dataset_once(json_file, image_dir, "tiny")
        with open(os.path.join(record, f"classes_{rank}.json"), "w") as f:
            json.dump(classes, f)


@pytest.mark.slow
@pytest.mark.usefixtures("one_launch_at_a_time")
def test_process_0_checks_for_a_distributed_run(tiny_coco, tmp_path):
    from detectron2.engine import launch

    from gn_det.engine.launch import run_worker

    json_file, image_dir = tiny_coco
    records = [tmp_path / "first", tmp_path / "again"]
    for record in records:
        record.mkdir()
    launch(functools.partial(run_worker, check_in_each_process), 2, dist_url="auto",
           args=(json_file, image_dir, [str(record) for record in records]))
    assert sorted(os.listdir(tmp_path / "first")) == ["checked_by_0", "classes_0.json", "classes_1.json"]
    assert sorted(os.listdir(tmp_path / "again")) == ["classes_0.json", "classes_1.json"]  # the cached verdict
    # run_worker ends a finished worker without the interpreter's teardown, after its exit handlers
    assert (tmp_path / "exit_handlers_ran_0").exists() and (tmp_path / "exit_handlers_ran_1").exists()
    for rank in (0, 1):
        assert json.loads((tmp_path / "first" / f"classes_{rank}.json").read_text()) == ["class_1", "class_2",
                                                                                          "class_3"]
