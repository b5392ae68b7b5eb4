"""bench.targets' verdicts and its process runner (the measurements themselves need a GPU)."""

from bench.targets import run, verdicts


def test_verdicts_compare_each_target_and_say_what_was_not_measured():
    met = verdicts([11.9, 12.3, 11.8], 5.2, 1.9)
    assert [line.split()[-1] for line in met] == ["MET", "MET", "MET"]
    assert "median 11.90 s (11.90, 12.30, 11.80)" in met[0]

    missed = verdicts([12.01], 4.24, 3.1)
    assert [line.endswith("NOT MET") for line in missed] == [True, True, True]

    unmeasured = verdicts([], None, None)
    assert all(line.endswith("NOT MEASURED") for line in unmeasured)


def test_run_returns_the_json_written_or_none_with_the_log(tmp_path):
    writes = ["-c", "import json, sys; json.dump({'wall_s': 1.5}, open(sys.argv[2], 'w')); print('done')"]
    assert run("ok", writes, tmp_path, timeout_s=60) == {"wall_s": 1.5}
    assert (tmp_path / "ok.log").read_text().strip() == "done"

    fails = ["-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    assert run("bad", fails, tmp_path, timeout_s=60) is None
    assert "boom" in (tmp_path / "bad.log").read_text()

    hangs = ["-c", "import time; time.sleep(30)"]
    assert run("slow", hangs, tmp_path, timeout_s=1) is None
