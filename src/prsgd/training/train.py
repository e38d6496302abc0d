"""Train a model with Algorithm 1, Algorithm 2 or a baseline, on the simulator or under torchrun; one visible loop.

    python -m prsgd.train --workers 8 --sync params_and_momentum --period 8 --out runs/demo
    torchrun --nproc-per-node 4 -m prsgd.train --engine distributed --sync params_and_momentum --period 8

Every config key is a flag (``--dataset fashion_mnist --model cnn --split dirichlet --alpha 0.3 ...``; see
``--help``). Both engines read the same per-worker batches (:class:`prsgd.data.WorkerSampler`, same augmentation
draws) and log the same records: one JSON line per evaluation with the joint epoch, step, learning rate, training
loss/accuracy (on a fixed subset of the training set) and test loss/accuracy of the node-average model x_bar,
wall-clock seconds spent training (evaluation excluded) and the communication so far.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from prsgd.algorithm.theory import recommended_lr, recommended_period
from prsgd.data import WorkerSampler, label_distribution, load_dataset
from prsgd.engines.torchrun import Torchrun
from prsgd.errors import NonFiniteError, PrsgdError, exit_on_user_error
from prsgd.models import build_model
from prsgd.training import checkpoint, command
from prsgd.training.batches import worker_sampler
from prsgd.training.config import ConfigError, RunConfig
from prsgd.training.flags import add_flat_arguments, from_flat_arguments
from prsgd.training.outdir import OutFolder, OutFolderError, check_out
from prsgd.training.resume import Checkpoints
from prsgd.training.trackers import check_out_for, open_trackers
from prsgd.training.workers import Placement, check_memory, make_workers, place

Record = dict[str, Any]


def load_data(config: RunConfig):
    """The run's dataset, as its config names it (seeded subset, image size)."""
    return load_dataset(
        config.data.dataset,
        config.data.path,
        seed=config.training.seed,
        train_subset=config.data.train_subset,
        image_size=config.data.image_size,
    )


def resolve_schedule(config: RunConfig, train_size: int, num_workers: int) -> tuple[RunConfig, int, list[str]]:
    """(the config with ``"theory"`` values resolved, the run's steps T, what was resolved, for the log); refuses
    a period longer than the run. Needs only the training-set size: a sweep checks every run with it first."""
    t = config.training
    total_steps = max(1, math.ceil(t.epochs * train_size / (num_workers * t.batch_size)))
    notes = []
    if config.algorithm.period == "theory":
        period = recommended_period(num_workers, total_steps, identical=config.data.split == "identical")
        config = config.with_overrides({"algorithm.period": period})
        notes.append(f"algorithm.period = 'theory': I = {period} for N = {num_workers}, T = {total_steps}")
    if config.training.lr == "theory":
        lr = recommended_lr(num_workers, total_steps, lr_scale=t.lr_scale)
        config = config.with_overrides({"training.lr": lr})
        notes.append(
            f"training.lr = 'theory': gamma = {t.lr_scale:g} sqrt(N / T) = {lr:.6g} for N = {num_workers}, "
            f"T = {total_steps}"
        )
    if config.algorithm.period > total_steps and config.algorithm.sync not in ("gradients", "none"):
        raise ConfigError(
            f"algorithm.period={config.algorithm.period} is larger than the run's {total_steps} steps: "
            "no communication would ever happen; lower the period or train longer"
        )
    return config, total_steps, notes


def _check_loggers_have_out(config: RunConfig) -> None:
    """Loggers other than jsonl write files: refused without ``--out`` (the names themselves the config checks)."""
    try:
        check_out_for(config.loggers, config.out)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def preflight(config: RunConfig, num_workers: int | None = None) -> None:
    """Check ``config`` as far as can be done without training: its dataset loads (cached for the run), its
    schedule is valid, and its output folder can be used as asked. ``prsgd run`` checks every run of a sweep so
    before the first starts."""
    data = load_data(config)
    resolve_schedule(config, len(data.train), num_workers or config.training.workers)
    _check_loggers_have_out(config)
    if config.out:
        check_out(config.out, resume=config.resume, overwrite=config.overwrite)


def run(
    config: RunConfig,
    on_record: Callable[[Record], None] | None = None,
    torchrun: Torchrun | None = None,
    times: dict[str, float] | None = None,
) -> list[Record]:
    """Train as ``config`` says; return (and, with ``config.out``, write) the evaluation records.

    ``on_record(record)`` is called with each record as it is made: the hook for any tracker (W&B, MLflow, ...;
    ``--logger`` covers CSV and TensorBoard). ``times``, if given, is filled with the seconds this process spent
    training (``train``, what the records' ``wall_clock`` counts), warming up (``warm_up_untimed``), evaluating
    and checkpointing.

    Everything that can be wrong with the config or the data is checked before the first step. With
    ``engine="distributed"`` the run joins the process group torchrun describes and leaves it at the end, unless
    the caller passes its own ``torchrun`` membership (``prsgd run`` joins once for all its runs)."""
    _check_loggers_have_out(config)
    data = load_data(config)
    placement = place(config, torchrun)
    config = replica_group_out(config, placement.group)
    folder = None
    try:
        folder = _open_out(config, placement)
        return _train(config, data, placement, on_record, {} if times is None else times)
    finally:
        if folder is not None:
            folder.close()
        if torchrun is None and placement.torchrun is not None:
            placement.torchrun.close()


def replica_group_out(config: RunConfig, group: int | None) -> RunConfig:
    """``config`` writing into ``OUT/group-<g>`` for replica group ``g`` of a fault-tolerant run (each group logs,
    and a group that starts again continues, its own folder); unchanged otherwise."""
    if group is None or not config.out:
        return config
    return config.with_overrides({"out": str(Path(config.out) / f"group-{group}")})


def _open_out(config: RunConfig, placement: Placement) -> OutFolder | None:
    """The main process's :class:`prsgd.training.outdir.OutFolder` (checked and locked); every process stops if it
    fails."""
    folder, problem = None, None
    if config.out and placement.is_main:
        try:
            # a replica group that starts again continues its own folder (its state comes from a live peer)
            again = config.resume or placement.restarted or placement.group is not None
            folder = OutFolder(config.out, resume=again, overwrite=config.overwrite)
        except OutFolderError as error:
            problem = str(error)
        if folder is not None and folder.moved_aside is not None:
            tqdm.write(f"overwrite: the earlier run's checkpoints were moved to {folder.moved_aside}")
    problem = placement.broadcast(problem)
    if problem:
        raise OutFolderError(problem)
    return folder


def _train(
    config: RunConfig, data, placement, on_record: Callable[[Record], None] | None, times: dict[str, float]
) -> list[Record]:
    t = config.training
    num_workers, is_main = placement.num_workers, placement.is_main
    if placement.torchrun is None:  # N simulated workers in this process: will their state fit?
        with torch.device("meta"):
            shape_only = build_model(config.model.model, data.input_shape, data.num_classes, hidden=config.model.hidden)
        check_memory(shape_only, num_workers, placement.device)
    shards, sampler = worker_sampler(config, data, num_workers)
    config, total_steps, notes = resolve_schedule(config, len(data.train), num_workers)
    t = config.training
    examples_per_step = num_workers * t.batch_size
    if is_main:
        for note in notes:
            tqdm.write(note)
    labels = data.train.labels  # a text window's label is its module: how non-identical its shards are
    kinds = int(labels.max()) + 1 if data.is_text else data.num_classes
    heterogeneity = label_distribution(labels, shards, num_workers, kinds)

    warm_up_s = _warm_up(config, data, placement, sampler)
    torch.manual_seed(t.seed)
    model = build_model(config.model.model, data.input_shape, data.num_classes, hidden=config.model.hidden)
    workers = make_workers(placement, model, config, data)

    if t.evals >= total_steps:  # every step: no loop over a huge evals
        eval_steps = set(range(total_steps + 1))
    else:
        eval_steps = {round(k * total_steps / t.evals) for k in range(t.evals + 1)}
    g = torch.Generator().manual_seed(t.seed)
    train_eval = torch.randperm(len(data.train), generator=g)[: t.eval_train_examples].sort().values
    test_eval = torch.arange(len(data.test))

    out = Path(config.out) if config.out and is_main else None
    resolved = config.to_dict()
    resolved["training"]["workers"] = num_workers
    if out is not None:
        checkpoint.atomic_write(out / "config.json", (json.dumps(resolved, indent=2) + "\n").encode())
        split = json.dumps({"split": config.data.split, **heterogeneity}) + "\n"
        checkpoint.atomic_write(out / "split.json", split.encode())
    if is_main and config.data.split != "identical":
        tqdm.write(
            f"split={config.data.split}: mean total-variation distance of worker label distributions "
            f"from the whole set = {heterogeneity['mean_total_variation']:.3f}"
        )

    saver = Checkpoints(config, resolved, workers, placement) if config.out else None
    start, wall, records = 0, 0.0, []
    if placement.group is not None:  # a replica group that recovered from a live peer continues at its step
        start = workers.steps_done
        records = _earlier_records(out, start)
    if saver is not None and (config.resume or placement.restarted):
        try:
            start, wall, records = saver.resume(examples_per_step, len(data.train))
        except (PrsgdError, RuntimeError) as error:
            _raise_explained(placement, error, error, "resuming from a checkpoint")
    if start > total_steps:
        raise ConfigError(
            f"the checkpoint resumed is at step {start}, past this run's {total_steps} steps "
            f"(training.epochs={t.epochs:g}); resume with at least as many epochs as the run it continues"
        )
    trackers = []
    if out is not None:
        checkpoint.atomic_write(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
        trackers = open_trackers(config.loggers, out, records, start + 1 if start > 0 else None)

    lr = None
    desc = f"{config.algorithm.sync} I={config.algorithm.period}"
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc=desc,
        disable=not (config.progress and is_main),
        leave=False,
        dynamic_ncols=True,
    )
    step = start
    began, evaluating, checkpointing = time.perf_counter(), 0.0, 0.0
    try:
        for step in range(start, total_steps + 1):
            joint_epoch = step * examples_per_step / len(data.train)
            resumed_here = step == start and start > 0
            if step in eval_steps and not resumed_here:
                evaluation_started = time.perf_counter()
                train_loss, train_acc = workers.evaluate(data.train, train_eval)
                test_loss, test_acc = workers.evaluate(data.test, test_eval)
                record = {
                    "joint_epoch": joint_epoch,
                    "step": step,
                    "lr": t.lr_at(joint_epoch),
                    "train_loss": train_loss,
                    "train_accuracy": train_acc,
                    "test_loss": test_loss,
                    "test_accuracy": test_acc,
                    "wall_clock": wall,
                    "comm_rounds": workers.comm.rounds,
                    "comm_bytes": workers.comm.bytes,
                    "comm_peak_step_bytes": workers.comm.peak_step_bytes,
                    **workers.drift.take(),  # means over the rounds since the last record (None: none measured)
                    **workers.fault_record(),
                    **({"test_perplexity": math.exp(min(test_loss, 700.0))} if data.is_text else {}),
                }
                records.append(record)
                bar.set_postfix({"train loss": f"{train_loss:.4f}", "test acc": f"{test_acc:.3f}"})
                if out is not None:
                    checkpoint.append_line(out / "log.jsonl", json.dumps(record))
                for tracker in trackers:
                    tracker.record(record)
                if on_record is not None:
                    on_record(record)
                evaluating += time.perf_counter() - evaluation_started
            if saver is not None and not resumed_here and saver.due(step, eval_steps, total_steps):
                checkpoint_started = time.perf_counter()
                saver.save(step, wall, records)
                checkpointing += time.perf_counter() - checkpoint_started
            if step == total_steps:
                break
            started = time.perf_counter()
            if t.lr_at(joint_epoch) != lr:
                lr = t.lr_at(joint_epoch)
                workers.set_lr(lr)
            workers.step(sampler, step)
            wall += time.perf_counter() - started
            bar.update(1)
    except (PrsgdError, RuntimeError) as error:
        failure: BaseException = error
        if isinstance(error, NonFiniteError):
            kept = saver.last if saver is not None and saver.last else "none was written"
            failure = NonFiniteError(f"{error}; training stopped, the last good checkpoint is kept: {kept}")
        _raise_explained(placement, error, failure, f"training step {step}")
    finally:
        bar.close()
        for tracker in trackers:
            tracker.close()
    times.update(
        train=wall,
        warm_up_untimed=warm_up_s,
        evaluation=evaluating,
        checkpoints=checkpointing,
        total_this_process=time.perf_counter() - began,
    )
    if out is not None and records:
        summary = {"config": resolved, "final": records[-1], "time_s": times}
        checkpoint.atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return records


WARM_UP_STEPS = 2


def _warm_up(config: RunConfig, data, placement: Placement, sampler: WorkerSampler) -> float:
    """Take :data:`WARM_UP_STEPS` steps on throwaway workers before the run's own, so that one-time start-up
    (kernel and library initialization, thread pools, first calls) is not counted in the run's wall-clock: the
    first run of a sweep would otherwise look slower than the same run later in it. Returns the seconds spent (not
    counted). The run itself is unaffected: it builds its model after reseeding."""
    if placement.group is not None:  # throwaway workers would join the replica groups' quorum
        return 0.0
    started = time.perf_counter()
    model = build_model(config.model.model, data.input_shape, data.num_classes, hidden=config.model.hidden)
    workers = make_workers(placement, model, config, data)
    for step in range(WARM_UP_STEPS):
        workers.step(sampler, step)
    del workers
    gc.collect()  # its memory is free before the run's own workers are built
    return time.perf_counter() - started


def _earlier_records(out: Path | None, start: int) -> list[Record]:
    """The records an earlier process of this replica group wrote before ``start`` (it died; this one recovered
    from a live peer at ``start``): kept in the log, not rewritten away."""
    log = out / "log.jsonl" if out is not None else None
    if log is None or not log.exists():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] < start]


def _raise_explained(placement: Placement, error: BaseException, failure: BaseException, doing: str) -> None:
    """Raise ``failure`` (``error`` or a clearer error about it) as the run's placement explains it while
    ``doing``: under torchrun, naming the rank that died, hung or stopped."""
    explained = placement.explain_failure(failure, doing)
    if explained is error:
        raise error
    raise explained from error


def summary_line(final: Record, config: RunConfig, evaluation_s: float) -> str:
    """One human line for the end of a run (every record stays in ``OUT/log.jsonl``)."""
    where = f"; log: {Path(config.out) / 'log.jsonl'}" if config.out else ""
    return (
        f"done: {final['step']} steps ({final['joint_epoch']:.2f} joint epochs, {final['wall_clock']:.1f} s training, "
        f"{evaluation_s:.1f} s evaluating); "
        f"train loss {final['train_loss']:.4f}, test accuracy {final['test_accuracy']:.4f}"
        + (f", test perplexity {final['test_perplexity']:.3f}; " if "test_perplexity" in final else "; ")
        + f"{final['comm_rounds']} rounds, {final['comm_bytes'] / 2**20:.2f} MiB sent per worker (at most "
        f"{final.get('comm_peak_step_bytes', 0) / 2**20:.2f} MiB in one step)"
        + (
            f"; fault tolerance: {final['participants']} groups in the last round, {final['rounds_short']} rounds "
            f"over fewer groups, {final['groups_lost']} lost, {final['groups_joined']} joined, "
            f"{final['recoveries']} recoveries of this group, {final.get('rounds_retried', 0)} rounds it ran again"
            if "participants" in final
            else ""
        )
        + where
    )


def main(argv: list[str] | None = None) -> None:
    parser = command.parser("prsgd train", __doc__)
    add_flat_arguments(parser)
    args = parser.parse_args(argv)
    if args.fault_tolerant and args.workers is None:
        parser.error("--fault-tolerant needs --workers: how many replica groups the run has (each its data shard)")
    if args.engine == "distributed" and args.workers is None and "WORLD_SIZE" in os.environ:
        args.workers = os.environ["WORLD_SIZE"]

    def train() -> None:
        config = from_flat_arguments(args)
        times: dict[str, float] = {}
        records = run(config, times=times)
        if int(os.environ.get("RANK", "0")) == 0 or config.engine != "distributed":
            group = int(os.environ["REPLICA_GROUP_ID"]) if config.fault_tolerant else None  # checked by run()
            print(summary_line(records[-1], replica_group_out(config, group), times["evaluation"]))

    exit_on_user_error("prsgd train", train)


if __name__ == "__main__":
    main()
