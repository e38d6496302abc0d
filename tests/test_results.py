"""prsgd.experiments.results: per-run summaries and docs/results.md's tables (mean +- sd, paired differences per
seed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prsgd.experiments.results import collect, fill, main
from prsgd.training.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def fake_run(folder: Path, seed: int, accuracy: float, loss: float, period: int) -> None:
    config = RunConfig().with_overrides({"training.seed": seed, "algorithm.period": period}).to_dict()
    final = {"joint_epoch": 4.0, "step": 100, "train_loss": loss, "test_loss": loss, "test_accuracy": accuracy}
    final |= {"comm_rounds": 100 // period, "comm_bytes": 2e6}
    times = {"train": 10.0 + seed, "evaluation": 2.0, "checkpoints": 0.1, "total_this_process": 12.5}
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"config": config, "final": final, "time_s": times}))


@pytest.fixture
def runs(tmp_path):
    accuracy = {1: [0.80, 0.82, 0.81], 16: [0.78, 0.83, 0.80]}
    for period, values in accuracy.items():
        for seed, acc in enumerate(values):
            fake_run(tmp_path / "runs/periods" / f"period={period}" / f"seed{seed}", seed, acc, 1 - acc, period)
            nesterov = acc + 0.01 * (period > 1)  # Nesterov drops 0.01 less at I = 16 in every seed
            fake_run(tmp_path / "runs/nesterov" / f"period={period}" / f"seed{seed}", seed, nesterov, 0.2, period)
    return tmp_path / "runs"


def test_tables_are_mean_sd_and_paired_differences_by_seed(runs):
    rows = collect(runs)
    assert len(rows) == 12 and rows[0]["group"] == "period=1" and rows[0]["settings"]["algorithm.period"] == 1
    doc = (
        "<!-- table periods summary -->\nold\n<!-- end -->\n"
        "<!-- table periods paired period=1 -->\n<!-- end -->\n"
        "<!-- table skipping periods nesterov -->\n<!-- end -->\n"
    )
    text = fill(doc, rows)
    # period=16: accuracy 0.78, 0.83, 0.80 -> mean 0.8033, sd 0.0252; paired: -0.02, +0.01, -0.01
    assert "| period=16 | 3 | 0.1967 +- 0.0252 | 0.8033 +- 0.0252 | 6 | 2.00 | 11.0 +- 1.0 | 2.0 +- 0.0 |" in text
    assert "| period=16 | 3 | -0.0067 +- 0.0153 | 1 of 3 | +0.0067 +- 0.0153 | 1 of 3 |" in text
    assert "| 16 | -0.0067 +- 0.0153 | +0.0033 +- 0.0153 | +0.0100 +- 0.0000 | 3 of 3 |" in text
    assert "old" not in text and fill(text, rows) == text


def test_check_passes_on_the_doc_it_wrote_and_fails_after_an_edit(runs, tmp_path, capsys):
    doc, summaries = tmp_path / "results.md", tmp_path / "runs.jsonl"
    doc.write_text("# Results\n\n<!-- table periods summary -->\n<!-- end -->\n")
    main([str(runs), "--doc", str(doc), "--summaries", str(summaries)])
    assert len(summaries.read_text().splitlines()) == 12
    main(["--check", "--doc", str(doc), "--summaries", str(summaries)])
    doc.write_text(doc.read_text().replace("0.8033", "0.8133"))
    with pytest.raises(SystemExit):
        main(["--check", "--doc", str(doc), "--summaries", str(summaries)])


def test_the_committed_results_doc_matches_its_per_run_summaries(capsys):
    """Every table in docs/results.md is what docs/results/runs.jsonl gives (python -m prsgd results --check)."""
    main(["--check", "--doc", str(ROOT / "docs/results.md"), "--summaries", str(ROOT / "docs/results/runs.jsonl")])
    assert "24 tables match" in capsys.readouterr().out  # every table block of the doc was compared


def test_language_model_tables_pair_each_arm_with_the_baseline_on_the_same_data_and_keep_other_summaries(tmp_path):
    losses = {"ddp": [1.0, 1.2, 1.1], "alg1": [1.1, 1.25, 1.3]}
    for arm, values in losses.items():
        for split, shift in (("identical", 0.0), ("classes", 0.5)):
            for seed, loss in enumerate(values):
                folder = tmp_path / "runs/gpt_n4" / arm / f"split={split}" / f"seed{seed}"
                fake_run(folder, seed, 0.4, loss + shift, 8)
    doc = tmp_path / "results.md"
    doc.write_text("<!-- table gpt_n4 lm -->\n<!-- end -->\n<!-- table gpt_n4 lm_paired ddp -->\n<!-- end -->\n")
    (tmp_path / "other.jsonl").write_text(json.dumps({"experiment": "kept", "group": "g", "seed": 0}) + "\n")
    main([str(tmp_path / "runs"), "--doc", str(doc), "--summaries", str(tmp_path / "gpt.jsonl")])
    text = doc.read_text()
    # alg1 - ddp per seed: +0.1, +0.05, +0.2 (the same on both data cases: the shift cancels)
    assert "| alg1/split=identical | 3 | +0.1167 +- 0.0764 | 0 of 3 | 1.00 |" in text
    assert "| alg1/split=classes | 3 | +0.1167 +- 0.0764 | 0 of 3 | 1.00 |" in text
    assert "| ddp/split=identical | 3 | 1.1000 +- 0.1000 | 3.014 +- 0.301 | 0.4000 +- 0.0000 | 12 | 2.0 |" in text
    assert "kept" in (tmp_path / "other.jsonl").read_text()  # another set's summaries are not touched
    main(["--check", "--doc", str(doc), "--summaries", str(tmp_path / "gpt.jsonl")])
