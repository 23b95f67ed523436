"""The start-up benchmark's kit (gn_det/analysis/startup.py): the generated set and the report."""
import json
import os

import pytest

from gn_det.analysis import startup


def test_generated_set_is_coco_with_hard_linked_images(tmp_path, monkeypatch):
    monkeypatch.setattr(startup, "LINKS_PER_FILE", 4)  # the copies ext4's link limit needs, on a small scale
    json_file, image_dir = startup.generate_coco_scale(str(tmp_path), num_images=10, num_annotations=23,
                                                       num_categories=5, image_size=32)
    with open(json_file) as f:
        coco = json.load(f)
    assert [len(coco[k]) for k in ("images", "annotations", "categories")] == [10, 23, 5]
    per_image = [sum(a["image_id"] == i["id"] for a in coco["annotations"]) for i in coco["images"]]
    assert sorted(set(per_image)) == [2, 3]
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        (polygon,) = annotation["segmentation"]
        assert len(polygon) == 2 * startup.POLYGON_POINTS
        assert all(x - 0.1 <= px <= x + w + 0.1 for px in polygon[0::2])
        assert all(y - 0.1 <= py <= y + h + 0.1 for py in polygon[1::2])
    inodes = {os.stat(os.path.join(image_dir, i["file_name"])).st_ino for i in coco["images"]}
    assert len(inodes) == 3  # one.jpg, one_1.jpg, one_2.jpg
    assert startup.dataset_size(json_file, image_dir) == {
        "images": 10, "annotations": 23, "json_mb": round(os.path.getsize(json_file) / 1e6, 1)}
    assert startup.generate_coco_scale(str(tmp_path)) == (json_file, image_dir)  # there already: kept


def test_summary_rows_give_every_run_and_the_ratio_of_medians():
    runs = [{"side": side, "processes": 1, "seconds": s, "cpu_seconds": s / 2}
            for side, s in [("stock", 40.0), ("gn_first", 44.0), ("gn_again", 30.0), ("stock", 50.0),
                            ("gn_first", 46.0), ("gn_again", 36.0)]]
    (row,) = startup.summary_rows({"runs": runs})
    assert row == [1, "40.0 / 50.0; median 45.0", "44.0 / 46.0; median 45.0 (1.00x)",
                   "30.0 / 36.0; median 33.0 (0.73x)"]
    assert startup.summary_rows({"runs": runs}, clock="cpu_seconds")[0][1] == "20.0 / 25.0; median 22.5"


@pytest.mark.slow
def test_benchmark_times_both_sides_on_a_small_set(d2, tmp_path):
    # gn-det's second start ("gn_again") is the same command on a warm cache (the cache: tests/test_verdict.py)
    sides = ("stock", "gn_first")
    report = startup.run_startup_benchmark(
        str(tmp_path), processes=(1,), repeats=1, sides=sides, on_result=None,
        generate_kwargs={"num_images": 8, "num_annotations": 20, "num_categories": 80})
    assert [(r["side"], r["processes"]) for r in report["runs"]] == [(side, 1) for side in sides]
    assert all(0 < r["cpu_seconds"] and 0 < r["seconds"] for r in report["runs"])
    assert report["dataset"]["images"] == 8
