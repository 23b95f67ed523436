"""Reading a run's metrics.json for compare_runs."""
import json

import pytest

pytest.importorskip("detectron2")  # gn_det's package imports it

from gn_det import InputError  # noqa: E402
from gn_det.analysis.runs import Run, comparison_rows, load_runs  # noqa: E402


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
