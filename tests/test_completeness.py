"""Complete loads: every image discover listed has exactly one outcome, or the load is refused
naming the shard and its images, with nothing committed.

The check's rules on hand-made run folders (no model), then through the real stages: a shard
whose infer never ran (marked success by hand) fails the load; a shard that finished but lost
its result is loaded from what it wrote.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from image_etl import stages, synth
from image_etl.completeness import staging_by_night, staging_path
from image_etl.errors import NOT_RETRYABLE, IncompleteNightError

from .conftest import DEMO_MODEL
from .dbrows import result_rows

DAY = dt.date(2026, 4, 11)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def staging_to_load(manifest: Path, plan: list[dict] | None, results: list[dict]) -> list[Path]:
    """The staging files of the run's own night (hand-made manifests name no date)."""
    return staging_by_night(manifest, plan, results)[None]


def run_folder(tmp_path: Path, shards: list[list[str]], staged: dict[int, list[tuple[str, str]]]
               ) -> tuple[Path, list[dict], list[dict]]:
    """A run folder as discover, partition and infer leave it: manifest, shard files, and a
    staging file (with a result) for each shard in ``staged``."""
    run_dir = tmp_path / "_runs" / "r1"
    run_dir.mkdir(parents=True)
    names = [n for shard in shards for n in shard]
    manifest = run_dir / "manifest.json"
    manifest.write_text(json.dumps({"images": [[n, 100] for n in names]}))
    plan, results = [], []
    for k, shard in enumerate(shards):
        shard_file = run_dir / f"shard-{k:03d}.json"
        shard_file.write_text(json.dumps({"images": [[n, 100] for n in shard]}))
        plan.append({"index": k, "shard_file": str(shard_file), "run_dir": str(run_dir)})
        if k in staged:
            path = staging_path(run_dir, k)
            _write_jsonl(path, [{"kind": "header", "fingerprint": "f"}]
                         + [{"rel_path": n, "status": s} for n, s in staged[k]])
            results.append({"index": k, "staging": str(path)})
    return manifest, plan, results


def test_a_whole_night_loads_every_shard(tmp_path):
    manifest, plan, results = run_folder(tmp_path, [["a.jpg", "b.jpg"], ["c.jpg"]],
                                         {0: [("a.jpg", "ok"), ("b.jpg", "failed")],
                                          1: [("c.jpg", "ok")]})
    assert staging_to_load(manifest, plan, results) == [Path(r["staging"]) for r in results]


def test_a_shard_that_never_ran_is_named_with_its_images(tmp_path):
    manifest, plan, results = run_folder(tmp_path, [["a.jpg"], ["b.jpg", "c.jpg"]],
                                         {0: [("a.jpg", "ok")]})
    with pytest.raises(IncompleteNightError) as info:
        staging_to_load(manifest, plan, results)
    message = str(info.value)
    assert "shard 1 (infer map index 1" in message and "never ran" in message
    assert "2 image(s) without an outcome: b.jpg, c.jpg" in message
    assert "nothing was committed" in message and "shard 0" not in message
    assert IncompleteNightError in NOT_RETRYABLE  # a load retry cannot make the images appear


def test_a_finished_shard_without_its_result_is_loaded_from_what_it_wrote(tmp_path):
    manifest, plan, results = run_folder(tmp_path, [["a.jpg"], ["b.jpg"]],
                                         {0: [("a.jpg", "ok")], 1: [("b.jpg", "ok")]})
    lost = results.pop(1)  # its XCom is gone (marked success after it finished, a lost XCom)
    assert staging_to_load(manifest, plan, results) == [Path(results[0]["staging"]),
                                                        Path(lost["staging"])]


def test_a_shard_that_stopped_halfway_without_a_result_fails_the_load(tmp_path):
    manifest, plan, results = run_folder(tmp_path, [["a.jpg"], ["b.jpg", "c.jpg", "d.jpg"]],
                                         {0: [("a.jpg", "ok")], 1: [("b.jpg", "ok")]})
    results.pop(1)
    with pytest.raises(IncompleteNightError, match=r"shard 1 .*did not finish\): 2 image\(s\) "
                                                    r"without an outcome: c.jpg, d.jpg"):
        staging_to_load(manifest, plan, results)


def test_a_staging_file_short_of_its_shard_fails_the_load(tmp_path):
    manifest, plan, results = run_folder(tmp_path, [["a.jpg", "b.jpg"]], {0: [("a.jpg", "ok")]})
    with pytest.raises(IncompleteNightError, match=r"shard 0 .*lacks them\): 1 image\(s\) "
                                                    r"without an outcome: b.jpg"):
        staging_to_load(manifest, plan, results)


def test_without_a_plan_a_listed_image_in_no_staged_rows_fails_the_load(tmp_path):
    manifest, _, results = run_folder(tmp_path, [["a.jpg"], ["b.jpg"]], {0: [("a.jpg", "ok")]})
    with pytest.raises(IncompleteNightError, match=r"1 listed image\(s\) in no shard's staged "
                                                    r"rows: b.jpg"):
        staging_to_load(manifest, None, results)


def test_an_image_with_two_outcomes_or_an_unknown_one_fails_the_load(tmp_path):
    manifest, plan, results = run_folder(tmp_path, [["a.jpg"], ["b.jpg"]],
                                         {0: [("a.jpg", "ok")],
                                          1: [("b.jpg", "maybe"), ("a.jpg", "ok")]})
    with pytest.raises(IncompleteNightError) as info:
        staging_to_load(manifest, plan, results)
    assert "'b.jpg' has outcome 'maybe'" in str(info.value)
    assert "'a.jpg' has an outcome from shard 0 and shard 1" in str(info.value)


def test_long_lists_are_cut_with_a_count(tmp_path):
    names = [f"img{i:02d}.jpg" for i in range(25)]
    manifest, plan, results = run_folder(tmp_path, [["a.jpg"], names], {0: [("a.jpg", "ok")]})
    with pytest.raises(IncompleteNightError, match=r"img09.jpg and 15 more"):
        staging_to_load(manifest, plan, results)


def test_late_nights_are_checked_and_returned_night_by_night(tmp_path):
    """Earlier nights' late files (shards of their own, dated) must be whole too."""
    manifest, plan, results = run_folder(tmp_path, [["a.jpg"], ["late1.jpg"], ["late2.jpg"]],
                                         {0: [("a.jpg", "ok")], 1: [("late1.jpg", "ok")]})
    data = json.loads(manifest.read_text())
    data["images"] = [["a.jpg", 100]]
    data["late"] = [{"date": "2026-04-09", "images": [["late1.jpg", 100], ["late2.jpg", 100]]}]
    manifest.write_text(json.dumps(data))
    for shard in plan[1:]:
        shard["date"] = "2026-04-09"
    results[1]["date"] = "2026-04-09"
    with pytest.raises(IncompleteNightError, match=r"night 2026-04-09: shard 2 .*never ran.*: "
                                                    r"1 image\(s\) without an outcome: late2.jpg"):
        staging_by_night(manifest, plan, results)
    plan.pop()
    data["late"][0]["images"].pop()
    manifest.write_text(json.dumps(data))
    assert staging_by_night(manifest, plan, results) == {
        None: [Path(results[0]["staging"])], "2026-04-09": [Path(results[1]["staging"])]}


# --- through the real stages ------------------------------------------------------------------

@pytest.fixture(scope="module")
def drop(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("complete_drop")
    synth.make_drop(root, DAY, 3, width=512, height=3000, seed=411)
    return root


def test_load_refuses_a_night_whose_shard_was_marked_success_before_it_ran(drop, tmp_path):
    db = f"sqlite:///{tmp_path / 'results.db'}"
    params = {"drop_dir": str(drop / "{date}"), "output_dir": str(tmp_path / "out"),
              "model_path": str(DEMO_MODEL), "devices": "cpu,cpu", "settle_seconds": 0,
              "batch_size": 2}
    discovered = stages.discover(params, run_id="manual__complete", run_date=DAY, db_url=None)
    plan = stages.partition(discovered)
    ran = stages.infer(plan[0])  # shard 1's infer was marked success in the UI: it never ran
    skipped = json.loads(Path(plan[1]["shard_file"]).read_text())["images"]
    with pytest.raises(IncompleteNightError) as info:
        stages.load(discovered, [ran], db_url=db, dag_id="nightly_detections", plan=plan)
    assert "shard 1 (infer map index 1" in str(info.value)
    assert all(name in str(info.value) for name, _ in skipped)
    assert not Path(db.removeprefix("sqlite:///")).exists() or result_rows(db)["images"] == []
    # Cleared and run, the shard completes the night; the load then takes both.
    loaded = stages.load(discovered, [ran, stages.infer(plan[1])], db_url=db,
                         dag_id="nightly_detections", plan=plan)
    assert loaded["images"] == 3 and len(result_rows(db)["images"]) == 3


def test_a_refused_bucket_load_says_where_the_copied_files_live(drop, tmp_path, s3_server,
                                                                 monkeypatch):
    """The load reads a bucket's run folder from a temporary copy; an error naming a copied
    file also names the run folder in the bucket it came from."""
    for name, value in s3_server.boto_env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.new_bucket()
    db = f"sqlite:///{tmp_path / 'results.db'}"
    params = {"drop_dir": str(drop / "{date}"), "output_dir": f"s3://{bucket}/out",
              "model_path": str(DEMO_MODEL), "devices": "cpu", "settle_seconds": 0,
              "batch_size": 2}
    discovered = stages.discover(params, run_id="manual__bucket", run_date=DAY, db_url=None)
    plan = stages.partition(discovered)
    ran = stages.infer(plan[0])
    # The staged rows lose their last image (a damaged object): the load must refuse.
    key = ran["staging"].removeprefix(f"s3://{bucket}/")
    client = s3_server.client()
    lines = client.get_object(Bucket=bucket, Key=key)["Body"].read().splitlines(keepends=True)
    client.put_object(Bucket=bucket, Key=key, Body=b"".join(lines[:-1]))
    with pytest.raises(IncompleteNightError, match="lacks them") as info:
        stages.load(discovered, [ran], db_url=db, dag_id="nightly_detections", plan=plan)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert f"the load's temporary copy of the run folder s3://{bucket}/out/_runs/" in notes
