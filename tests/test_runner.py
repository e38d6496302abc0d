"""prsgd run / prsgd plot: every CPU config runs, logs its documented fields, and bad configs fail up front."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from helpers import LOG_FIELDS

from prsgd import cli
from prsgd.data import DataError
from prsgd.experiments.report import describe_groups, discover, figure, group_configs, plotted_metrics
from prsgd.experiments.runner import main as run_main
from prsgd.training.config import ConfigError, RunConfig, TrainingConfig, load

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIGS = sorted((ROOT / "configs" / "cpu").glob("*.toml"))
PAPER_CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.toml"))
SHORT = [
    "--set",
    "sweep=",
    "--set",
    "data.train_subset=640",
    "--set",
    "training.epochs=1.0",
    "--set",
    "training.evals=2",
    "--set",
    "training.eval_train_examples=100",
    "--set",
    "progress=false",
]


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


TWINS = {  # paper config -> its CPU twin (configs/paper/README.md)
    "resnet56_periods": "periods",
    "resnet56_linear_speedup": "linear_speedup",
    "resnet56_cleared_momentum": "cleared_momentum",
    "resnet56_nesterov": "nesterov",
    "resnet56_momentum_vs_sgd": "momentum_vs_sgd",
    "resnet50_imagenet": "resnet_periods",
}


def test_there_is_a_cpu_twin_for_every_paper_config():
    """Each paper config's twin makes the same comparison: the same swept key over overlapping values (the smaller
    list inside the larger), and the same algorithm and data split otherwise."""
    assert sorted(p.stem for p in PAPER_CONFIGS) == sorted(TWINS)
    for path in CPU_CONFIGS:
        assert load(path).sweep, f"{path.name} carries no comparison"
    for paper_name, twin_name in TWINS.items():
        paper, twin = (
            load(ROOT / "configs" / "paper" / f"{paper_name}.toml"),
            load(ROOT / "configs" / "cpu" / f"{twin_name}.toml"),
        )
        (key, _, values), (twin_key, _, twin_values) = paper.sweep.partition("="), twin.sweep.partition("=")
        assert key == twin_key, (paper_name, twin_name)
        a, b = set(values.split(",")), set(twin_values.split(","))
        assert a <= b or b <= a, (paper_name, values, twin_values)
        swept = key.rpartition(".")[2]
        for section, field in [("algorithm", f) for f in ("sync", "momentum", "nesterov", "weight_decay")] + [
            ("data", "split")
        ]:
            if field != swept:
                got = getattr(getattr(twin, section), field)
                assert got == getattr(getattr(paper, section), field), (paper_name, field, got)


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=lambda p: p.stem)
def test_a_short_run_of_each_cpu_config(path, tmp_path):
    config = load(path)
    if not (config.data.dataset != "fashion_mnist" or Path("/usr/share/datasets/fashion-mnist").is_dir()):
        pytest.skip("dataset-fashion-mnist is not installed")
    period = min(config.algorithm.period, 4)
    run_main([str(path), *SHORT, "--set", f"algorithm.period={period}", "--out", str(tmp_path)])
    records = read_log(tmp_path)
    assert len(records) == 3
    for r in records:
        assert set(r) == LOG_FIELDS
        expected_rounds = r["step"] if config.algorithm.sync == "gradients" else r["step"] // period
        assert r["comm_rounds"] == expected_rounds
    epochs = [r["joint_epoch"] for r in records]
    assert epochs == sorted(epochs) and epochs[0] == 0 and epochs[-1] >= 1.0
    split = json.loads((tmp_path / "split.json").read_text())
    assert len(split["label_counts"]) == config.training.workers
    assert (tmp_path / "summary.md").read_text().startswith("| run |")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


DIGITS = """
[data]
dataset = "digits"
[model]
model = "mlp"
hidden = 16
[training]
workers = 4
batch_size = 8
epochs = 1.0
evals = 2
"""


def test_seeds_and_sweep_fill_one_folder_and_plot_draws_them(tmp_path):
    config = write_config(tmp_path / "digits.toml", DIGITS)
    out = tmp_path / "runs"
    run_main(
        [str(config), "--seeds", "2", "--sweep", "algorithm.period=1,4", "--out", str(out), "--set", "progress=false"]
    )
    for period in (1, 4):
        for seed in (0, 1):
            records = read_log(out / f"period={period}" / f"seed{seed}")
            assert records[-1]["comm_rounds"] == records[-1]["step"] // period
            assert records[0]["consensus_distance"] is None  # no round before step 0
            assert records[-1]["consensus_distance"] > 0 and records[-1]["state_spread"] > 0
            assert (
                json.loads((out / f"period={period}" / f"seed{seed}" / "config.json").read_text())["training"]["seed"]
                == seed
            )
    groups = discover([out])
    assert set(groups) == {"runs/period=1", "runs/period=4"} and all(len(g) == 2 for g in groups.values())
    assert read_log(out / "period=1" / "seed0") != read_log(out / "period=1" / "seed1")
    cli.main(["plot", str(out), "--out", str(tmp_path / "fig"), "--x", "joint_epoch,bytes"])
    assert (tmp_path / "fig.png").stat().st_size > 10_000 and (tmp_path / "fig.pdf").is_file()
    table = (tmp_path / "fig.md").read_text()
    assert "| runs/period=4 | 2 |" in table
    # the legend names the swept value, the title what the runs share
    labels, title = describe_groups(group_configs([out]))
    assert labels == {"runs/period=1": "period=1", "runs/period=4": "period=4"}
    assert title == "dataset=digits, split=identical, model=mlp, workers=4, sync=params_and_momentum"
    with pytest.raises(SystemExit, match=r"prsgd plot: error: x axis 'rounds' is not known; allowed: joint_epoch, "):
        cli.main(["plot", str(out), "--out", str(tmp_path / "fig2"), "--x", "rounds"])
    assert not (tmp_path / "fig2.png").exists()


def test_plot_draws_the_drift_panels_when_the_runs_measured_drift():
    without = [
        [{"joint_epoch": e, "train_loss": 1.0, "test_accuracy": 0.5, "consensus_distance": None} for e in range(3)]
    ]
    assert plotted_metrics({"a": without}) == ("train_loss", "test_accuracy")  # nothing measured: no empty panel
    runs = [
        [
            {"joint_epoch": e, "train_loss": 1.0, "test_accuracy": 0.5, "consensus_distance": d, "state_spread": None}
            for e, d in enumerate([None, 0.02, 0.04])
        ]
        for _ in range(2)
    ]
    runs[1][2]["consensus_distance"] = 0.08
    metrics = plotted_metrics({"a": without, "b": runs})
    assert metrics == ("train_loss", "test_accuracy", "consensus_distance")
    fig = figure({"b": runs}, ["joint_epoch"], metrics)
    panel = fig.axes[2]
    assert panel.get_yscale() == "log" and panel.get_ylabel() == "consensus distance before a round"
    ys = panel.lines[0].get_ydata()
    assert list(ys) == pytest.approx([0.02, 0.06])  # the mean over seeds; a record without a round is left out
    assert list(panel.lines[0].get_xdata()) == [1, 2]


def test_a_narrow_log_axis_is_labelled_in_plain_numbers():
    runs = [[{"joint_epoch": e, "train_loss": 2.33 - 0.01 * e, "test_accuracy": 0.5} for e in range(4)]]
    fig = figure({"run": runs}, ["joint_epoch"], ["train_loss"])
    fig.canvas.draw()
    ax = fig.axes[0]
    shown = [t.get_text() for t in [*ax.get_yticklabels(), *ax.get_yticklabels(minor=True)] if t.get_text()]
    assert shown and all(re.fullmatch(r"[0-9.]+", text) for text in shown), shown


@pytest.mark.parametrize(
    ("text", "sets", "error", "message"),
    [
        (DIGITS + "colour = 3\n", [], ConfigError, r"unknown config key 'training\.colour'"),
        (DIGITS.replace("hidden = 16", "hidden = 'wide'"), [], ConfigError, r"model\.hidden='wide' .*type int"),
        (DIGITS, ["training.epochs=-2"], ConfigError, r"training\.epochs=-2\.0 .*> 0"),
        (DIGITS, ["algorithm.period=1000"], ConfigError, r"algorithm\.period=1000 is larger than the run's 45 steps"),
        (
            DIGITS,
            ["data.dataset=cifar10", "data.path=/no/such/cifar"],
            DataError,
            r"cifar10: '/no/such/cifar' does not exist",
        ),
        (DIGITS, ["algorithm.sync=gossip"], ConfigError, r"sync='gossip' needs topology="),
        (DIGITS, ["nonsense=1"], ConfigError, r"unknown config key 'nonsense'"),
        ("[data\n", [], ConfigError, r"is not valid TOML"),
    ],
)
def test_bad_configs_fail_before_training_naming_the_key(tmp_path, text, sets, error, message):
    config = write_config(tmp_path / "bad.toml", text)
    out = tmp_path / "out"
    args = [str(config), "--out", str(out), "--set", "progress=false"]
    for s in sets:
        args += ["--set", s]
    with pytest.raises(error, match=message):
        run_main(args)
    assert not (out / "log.jsonl").exists()


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    config = write_config(tmp_path / "bad.toml", DIGITS + "colour = 3\n")
    with pytest.raises(SystemExit, match=r"prsgd run: error: unknown config key 'training\.colour'"):
        cli.main(["run", str(config)])


def test_learning_rate_schedules():
    step = TrainingConfig(lr=0.1, lr_schedule="step", milestones=(150.0, 225.0), lr_decay=0.1)
    assert [step.lr_at(e) for e in (0, 149.9, 150, 224, 225, 300)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    warm = TrainingConfig(lr=0.4, warmup_epochs=5.0)
    assert [warm.lr_at(e) for e in (0, 2.5, 5, 10)] == pytest.approx([0.04, 0.22, 0.4, 0.4])
    with pytest.raises(ConfigError, match=r"training\.milestones=\(5\.0, 2\.0\) must be increasing"):
        TrainingConfig(milestones=(5.0, 2.0))


def test_overrides_by_leaf_or_dotted_key_are_typed():
    c = RunConfig().with_overrides({"period": "4", "training.milestones": "3,6", "nesterov": "true"})
    assert (c.algorithm.period, c.training.milestones, c.algorithm.nesterov) == (4, (3.0, 6.0), True)


def test_period_theory_is_resolved_from_the_corollary(tmp_path):
    config = write_config(tmp_path / "digits.toml", DIGITS + '\n[algorithm]\nperiod = "theory"\n')
    run_main([str(config), "--out", str(tmp_path / "out"), "--set", "progress=false", "--set", "training.epochs=8"])
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    steps = read_log(tmp_path / "out")[-1]["step"]
    from prsgd.algorithm.theory import recommended_period

    assert saved["algorithm"]["period"] == recommended_period(4, steps, identical=True) == 2
    assert read_log(tmp_path / "out")[-1]["comm_rounds"] == steps // 2


def test_lr_theory_is_the_corollarys_gamma_for_this_n_and_t(tmp_path):
    """training.lr = "theory": gamma = lr_scale sqrt(N / T), with T the run's iterations, written to the config."""
    config = write_config(tmp_path / "digits.toml", DIGITS.replace("workers = 4", 'workers = 4\nlr = "theory"'))
    run_main([str(config), "--out", str(tmp_path / "out"), "--set", "progress=false", "--set", "lr_scale=0.5"])
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    records = read_log(tmp_path / "out")
    steps = records[-1]["step"]
    assert steps == math.ceil(1438 / (4 * 8))
    assert saved["training"]["lr"] == pytest.approx(0.5 * math.sqrt(4 / steps)) == records[0]["lr"]
    with pytest.raises(ConfigError, match=r"training\.lr_scale=-1\.0 is not allowed"):
        RunConfig().with_overrides({"training.lr": "theory", "training.lr_scale": "-1"})


def test_a_sweep_is_checked_whole_before_any_run_starts(tmp_path):
    config = write_config(tmp_path / "digits.toml", DIGITS)
    out = tmp_path / "runs"
    with pytest.raises(
        ConfigError, match=r"run 3 of 3 .*period=1000.*larger than the run's 45 steps.*; no run was started"
    ):
        run_main([str(config), "--sweep", "algorithm.period=1,4,1000", "--out", str(out), "--set", "progress=false"])
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"--seeds 0 is not allowed"):
        run_main([str(config), "--seeds", "0", "--out", str(out)])
    with pytest.raises(DataError, match=r"data\.train_subset=12000 is more than the 1438 training examples of digits"):
        run_main([str(config), "--set", "data.train_subset=12000", "--out", str(out)])
    with pytest.raises(ConfigError, match=r"--sweep 'algorithm.period=1,4,1' lists 1 more than once.*use --seeds"):
        run_main([str(config), "--sweep", "algorithm.period=1,4,1", "--out", str(out)])
    assert not out.exists()
    # the second run's folder holds an earlier run's checkpoints: refused before the first run starts
    (out / "period=4" / "checkpoints" / "step-000000010").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"run 2 of 2 .*period=4.*holds the checkpoints of an earlier run"):
        run_main([str(config), "--sweep", "algorithm.period=1,4", "--out", str(out), "--set", "progress=false"])
    assert not (out / "period=1").exists()


@pytest.mark.slow
def test_every_run_of_a_sweep_warms_up_before_its_timed_steps(tmp_path):
    """One-time start-up is taken by an untimed warm-up before each run's timed steps, the first run of a sweep
    included, and is reported apart from the training time. (Whether the first run is then timed like the others
    is a wall-clock question, measured with the CLI, not asserted here: on a loaded 2-core machine two identical
    runs differ by more than any bound a test could hold.)"""
    config = write_config(tmp_path / "digits.toml", DIGITS)
    out = tmp_path / "runs"
    run_main([str(config), "--sweep", "algorithm.period=1,4", "--out", str(out), "--set", "progress=false"])
    for period in (1, 4):
        times = json.loads((out / f"period={period}" / "summary.json").read_text())["time_s"]
        assert times["warm_up_untimed"] > 0 and times["train"] > 0, times
        assert times["total_this_process"] >= times["train"] + times["evaluation"], times


def test_prsgd_help_and_version(capsys):
    cli.main(["--help"])
    printed = capsys.readouterr().out
    assert printed.startswith("usage: prsgd COMMAND") and all(f"  {c}" in printed for c in cli.COMMANDS)
    cli.main(["--version"])
    assert capsys.readouterr().out.startswith("prsgd 0.")
    with pytest.raises(SystemExit, match=r"prsgd: error: 'bogus' is not a command; allowed: run, plot"):
        cli.main(["bogus"])
