"""Reading a run's metrics.json for compare_runs."""
import json

import pytest

pytest.importorskip("detectron2")  # gn_det's package imports it

from gn_det import InputError  # noqa: E402
from gn_det.analysis.runs import Run, comparison_rows, load_runs, markdown_table, run_labels  # noqa: E402

from conftest import tool_exit_message, tool_main  # noqa: E402


def write_lines(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_resumed_run_supersedes_lines_logged_again(tmp_path):
    first = [{"iteration": i, "total_loss": 2.0, "time": 1.0} for i in (19, 39, 59)]
    resumed = [{"iteration": i, "total_loss": 1.0, "time": 3.0} for i in (39, 59, 79)]
    write_lines(tmp_path / "metrics.json", first + resumed, tail='{"iteration": 99, "tot')  # killed mid-line
    run = Run(str(tmp_path))
    assert run.series("total_loss") == [(19, 2.0), (39, 1.0), (59, 1.0), (79, 1.0)]
    assert run.seconds_per_iter == 3.0


def test_final_results_come_from_results_json(tmp_path):
    write_lines(tmp_path / "metrics.json", [{"iteration": 99, "bbox/AP": 10.0, "segm/AP": 9.0}])
    (tmp_path / "results.json").write_text(json.dumps({"val": {"bbox": {"AP": 12.5}, "segm": {"AP": 11.0}}}))
    run = Run(str(tmp_path))
    assert run.metric("bbox/AP") == 12.5 and run.metric("segm/AP") == 11.0
    assert run.series("bbox/AP") == [(99, 10.0)]


def test_labels_name_the_runs_in_order(tmp_path):
    for name, ap in (("a", 10.0), ("b", 12.0)):
        (tmp_path / name).mkdir()
        write_lines(tmp_path / name / "metrics.json", [{"iteration": 9, "bbox/AP": ap}])
    runs = load_runs([str(tmp_path / "a"), str(tmp_path / "b")], ["GN", "BN*"])
    assert [row["run"] for row in comparison_rows(runs)] == ["GN", "BN*"]
    assert [r.name for r in load_runs([str(tmp_path / "a")])] == ["a"]  # the folder name without labels
    with pytest.raises(InputError, match="1 labels .* for 2 run folders"):
        load_runs([str(tmp_path / "a"), str(tmp_path / "b")], ["GN"])
    with pytest.raises(InputError, match="neither results.json nor metrics.json"):
        load_runs([str(tmp_path / "missing")])


def two_test_sets(folder, results=True):
    """A run evaluated on shapes_val and tinyval (its DATASETS.TEST order): detectron2 logs each evaluation as
    "<dataset>/bbox/AP" then, and results.json holds both."""
    folder.mkdir(parents=True, exist_ok=True)
    write_lines(folder / "metrics.json", [{"iteration": i, "shapes_val/bbox/AP": 10.0 + i, "tinyval/bbox/AP": 50.0 + i}
                                          for i in (9, 19)])
    if results:
        (folder / "results.json").write_text(json.dumps({"shapes_val": {"bbox": {"AP": 29.5}},
                                                         "tinyval": {"bbox": {"AP": 69.5}}}))
    return str(folder)


def one_test_set(folder, dataset, ap):
    """A run evaluated on ``dataset`` alone: metrics.json logs "bbox/AP" without the dataset."""
    folder.mkdir(parents=True)
    write_lines(folder / "metrics.json", [{"iteration": 19, "bbox/AP": ap, "total_loss": 1.0}])
    (folder / "results.json").write_text(json.dumps({dataset: {"bbox": {"AP": ap}}}))
    return str(folder)


def test_metrics_of_a_run_with_two_test_sets_are_read_for_one(tmp_path):
    run = Run(two_test_sets(tmp_path / "run"))
    assert run.series("bbox/AP") == [(9, 19.0), (19, 29.0)]  # the first test set's, not both interleaved
    assert run.datasets == ["shapes_val", "tinyval"] and run.dataset == "shapes_val"
    assert run.series("bbox/AP", "tinyval") == [(9, 59.0), (19, 69.0)]
    assert run.metric("bbox/AP") == 29.5 and run.metric("bbox/AP", "tinyval") == 69.5
    assert run.metric("bbox/AP", "coco_val") is None and run.series("bbox/AP", "coco_val") == []
    # without results.json: the same test set's last evaluation in metrics.json
    log_only = Run(two_test_sets(tmp_path / "log_only", results=False))
    assert log_only.metric("bbox/AP") == 29.0 and log_only.metric("bbox/AP", "tinyval") == 69.0
    assert log_only.datasets == ["shapes_val", "tinyval"]


def test_runs_are_compared_on_one_test_set(tmp_path):
    both = two_test_sets(tmp_path / "both")
    val = one_test_set(tmp_path / "val", "shapes_val", 31.5)
    tiny = one_test_set(tmp_path / "tiny", "tinyval", 70.0)
    with pytest.raises(InputError, match=r"different datasets: shapes_val \(the first run's test set\) is not among "
                                         r"the test sets of tiny \(.*tiny: tinyval\)") as err:
        comparison_rows(load_runs([val, both, tiny]))
    assert "\n" not in str(err.value)
    rows = comparison_rows(load_runs([val, both]))  # on shapes_val, the first run's test set
    assert [(r["bbox/AP"], r["Δ bbox/AP"]) for r in rows] == [(31.5, 0.0), (29.5, -2.0)]
    rows = comparison_rows(load_runs([both, tiny]), "tinyval")
    assert [(r["bbox/AP"], r["Δ bbox/AP"]) for r in rows] == [(69.5, 0.0), (70.0, 0.5)]


def test_compare_runs_refuses_runs_on_different_test_sets_before_writing(tmp_path, capsys):
    val = one_test_set(tmp_path / "val", "shapes_val", 31.5)
    tiny = one_test_set(tmp_path / "tiny", "tinyval", 70.0)
    out = tmp_path / "cmp" / "comparison"
    line = tool_exit_message("compare_runs.py", val, tiny, "--out", out)
    assert "shapes_val (the first run's test set) is not among the test sets of tiny" in line
    line = tool_exit_message("compare_runs.py", val, tiny, "--dataset", "tinyval", "--out", out)
    assert "tinyval (--dataset) is not among the test sets of val" in line
    assert not (tmp_path / "cmp").exists()
    both = two_test_sets(tmp_path / "both")
    tool_main("compare_runs.py", both, tiny, "--dataset", "tinyval", "--out", out)
    assert "AP on tinyval; wrote" in capsys.readouterr().out
    assert (tmp_path / "cmp" / "comparison.csv").read_text().splitlines()[1].startswith("both,69.5,")


def test_default_labels_add_parent_folders_until_distinct(tmp_path):
    dirs = [str(tmp_path / "vis" / "a" / "run"), str(tmp_path / "vis" / "b" / "run"), str(tmp_path / "c")]
    assert run_labels(dirs) == ["a/run", "b/run", "c"]
    assert run_labels(["x/run", "x/other"]) == ["run", "other"]
    with pytest.raises(InputError, match="the same run folder is given twice"):
        run_labels([dirs[0], dirs[0] + "/"])
    for d in dirs:
        one_test_set(tmp_path / d, "shapes_val", 1.0)
    assert [row["run"] for row in comparison_rows(load_runs(dirs))] == ["a/run", "b/run", "c"]


def test_table_formats_each_column(tmp_path):
    (tmp_path / "run").mkdir()
    write_lines(tmp_path / "run" / "metrics.json", [{"iteration": 9, "bbox/AP": 37.54, "time": 0.2312,
                                                     "peak_memory_mb": 1423.7}])
    row = markdown_table(comparison_rows(load_runs([str(tmp_path / "run")]))).splitlines()[2]
    assert [cell.strip() for cell in row.strip("|").split("|")] == [
        "run", "37.5", "–", "–", "–", "–", "–", "+0.0", "–", "0.231", "1424"]
