"""`fineviti demo`: a miniature run end to end (data, stage 1, evaluation, stage 2, evaluation, report), and under
-m slow the real one with its criterion (retrieval R@1 at least 10x chance both ways)."""

import json

import pytest

from fineviti import cli
from fineviti.train import demo


def test_demo_end_to_end_in_miniature(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), "--images", "48", "--heldout", "12", "--stage1-steps", "2",
                     "--stage2-steps", "2"])
    report = json.loads((out / "report.json").read_text())
    assert code == (0 if report["passed"] else 1)
    retrieval = report["retrieval"]
    assert {"i2t_r1", "t2i_r1", "chance_r1", "n"} <= set(retrieval) and retrieval["n"] == 12
    assert retrieval["chance_r1"] == pytest.approx(1 / 12)
    assert 0 <= report["hard_negatives"]["accuracy"] <= 1
    for stage in ("after_stage1", "after_stage2"):
        assert 0 <= report["regions"][stage]["top1"] <= 1 and report["regions"][stage]["n"] > 0
    assert report["training"]["stage1"]["last"]["loss"] > 0 and report["training"]["stage2"]["last"]["loss"] > 0
    table = capsys.readouterr().out
    assert "retrieval image->text R@1" in table and "regions top-1, after stage 2" in table
    assert (out / "stage1" / "checkpoints").is_dir() and (out / "stage2" / "config.json").is_file()
    # a second run reuses the data and resumes both finished runs: nothing is trained again
    again = demo.run_demo(out, images=48, heldout=12, stage1_steps=2, stage2_steps=2, echo=lambda *a: None)
    for key in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"):
        assert again["retrieval"][key] == retrieval[key], key
    assert again["regions"]["after_stage2"]["top1"] == report["regions"]["after_stage2"]["top1"]
    assert again["timings"]["data_s"] == 0.0
    # stage 1 trained on (more steps): stage 2, grown from the old stage-1 checkpoint, is trained again from the
    # new one (it was resumed as "already done")
    said = []
    demo.run_demo(out, images=48, heldout=12, stage1_steps=3, stage2_steps=2, echo=said.append)
    assert any("is removed and trained again" in line for line in said), said
    assert not any("stage2: resuming" in line for line in said), said
    # fewer steps asked than the folder's stage 1 has: its weights (step 3) are evaluated, and the report says
    # so (it said 2 steps)
    said = []
    fewer = demo.run_demo(out, images=48, heldout=12, stage1_steps=2, stage2_steps=2, echo=said.append)
    assert any("newest checkpoint is at step 3, past the 2 asked" in line for line in said), said
    assert fewer["training"]["stage1"]["steps"] == 3 and fewer["training"]["stage2"]["steps"] == 2
    # another seed is another data set (and tokenizer): the runs start over instead of resuming on it (the
    # resumed loader refused the other seed after the data had been replaced)
    said = []
    other = demo.run_demo(out, images=48, heldout=12, stage1_steps=2, stage2_steps=2, seed=1, echo=said.append)
    assert any("trained on the old one) is removed" in line for line in said), said
    assert not any("resuming" in line for line in said), said
    assert other["training"]["stage1"]["last"]["loss"] > 0
    with pytest.raises(ValueError, match="heldout must be at least 10"):
        demo.run_demo(out, heldout=5)


@pytest.mark.slow
def test_demo_reaches_ten_times_chance(tmp_path):
    report = demo.run_demo(tmp_path / "demo")
    r = report["retrieval"]
    assert r["n"] >= 500
    assert r["i2t_r1"] >= 10 * r["chance_r1"] and r["t2i_r1"] >= 10 * r["chance_r1"], r
    h = report["hard_negatives"]  # the issue: beats chance on the hard negatives too (a model blind to edits)
    assert h["accuracy"] > h["chance"] and h["pair_accuracy"] > h["pair_chance"], h
    assert report["timings"]["total_s"] < 15 * 60
