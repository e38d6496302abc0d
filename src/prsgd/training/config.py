"""Run configuration: frozen dataclasses in sections, read from TOML, with typed ``section.key=value`` overrides.

A config file has the sections ``[data]``, ``[model]``, ``[algorithm]``, ``[training]`` and top-level keys
``engine``, ``device``, ``out``, ``progress``. Every key is checked against the dataclass field of that name: an
unknown key, a value of the wrong type or a value out of range raises :class:`ConfigError` naming the key, before
anything is trained. Leaf names are unique across sections, so ``python -m prsgd.train`` also takes them as flat
flags (``--period 8`` for ``algorithm.period``).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from prsgd.algorithm import ROUND_OPTIONS, SYNC_RULES, RoundSpec, sync_rule
from prsgd.algorithm.local import LOCAL_RULES, local_rule
from prsgd.data.datasets import DATASET_NAMES
from prsgd.models import MODEL_NAMES
from prsgd.training.config_values import ConfigError, Theory, check_at_least, check_positive, convert, option
from prsgd.training.trackers import LOGGERS, check_loggers

ENGINES = ("simulator", "distributed")
SPLITS = ("identical", "disjoint", "dirichlet", "classes")
SCHEDULES = ("constant", "step")
COMPUTE = ("auto", "vmap", "loop")


@dataclass(frozen=True)
class DataConfig:
    """Dataset and how it is split across workers (the paper's identical vs non-identical cases)."""

    dataset: str = option("digits", "the dataset", choices=DATASET_NAMES)
    path: str = option(
        "", "folder or file of the dataset; default: the dataset's usual place (fashion_mnist: Debian's)"
    )
    split: str = option("identical", "how examples are spread over workers (identical: i.i.d.)", choices=SPLITS)
    alpha: float = option(0.5, "Dirichlet concentration over labels (split = 'dirichlet'); smaller is more skewed")
    classes_per_worker: int = option(2, "split = 'classes': labels each worker holds")
    augment: bool = option(False, "random crop (padding 4) and horizontal flip, for image datasets")
    train_subset: int = option(0, "use only this many training examples (seeded choice); 0: all")
    image_size: int = option(224, "imagefolder: images are resized to this square size")

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"data.split={self.split!r} is not known; allowed: {', '.join(SPLITS)}")
        check_positive("data.alpha", self.alpha)
        check_at_least("data.classes_per_worker", self.classes_per_worker, 1)
        check_at_least("data.train_subset", self.train_subset, 0)
        check_at_least("data.image_size", self.image_size, 8)


@dataclass(frozen=True)
class ModelConfig:
    model: str = option(
        "mlp",
        "the network (resnet8-110: CIFAR ResNets; resnet50: ImageNet's)",
        choices=MODEL_NAMES,
    )
    hidden: int = option(64, "mlp width")

    def __post_init__(self) -> None:
        check_at_least("model.hidden", self.hidden, 1)


@dataclass(frozen=True)
class _LocalAndRule:
    """The sync rule and local update (see :class:`prsgd.LocalSGD`)."""

    sync: str = option(
        "params_and_momentum",
        "params_and_momentum is Algorithm 1, gossip Algorithm 2; the others are the paper's baselines",
        choices=tuple(SYNC_RULES),
    )
    period: int | Theory = option(8, "I, local steps between rounds; 'theory': the corollary's I for this N, T, data")
    optimizer: str = option(
        "sgd",
        "the local rule: sgd (momentum SGD, the paper's) or adamw (torch.optim.AdamW's step)",
        choices=tuple(LOCAL_RULES),
    )
    momentum: float = option(0.9, "sgd: beta, in [0, 1); 0 is local SGD")
    nesterov: bool = option(False, "sgd: Nesterov momentum (option II, torch.optim.SGD's form) instead of Polyak's")
    weight_decay: float = option(0.0, "sgd: L2 penalty added to the gradient; adamw: decoupled weight decay")
    betas: tuple[float, ...] = option((0.9, 0.999), "adamw: beta1,beta2, each in [0, 1)")
    eps: float = option(1e-8, "adamw: added to the root of the second moment")

    def __post_init__(self) -> None:
        for o in ROUND_OPTIONS:
            value = getattr(self, o.name)
            if o.choices is not None and value not in (o.off, "none", *o.choices):
                allowed = ", ".join(("none", *o.choices))
                raise ConfigError(f"algorithm.{o.name}={value!r} is not known; allowed: {allowed}")
            if o.check is not None and value not in (o.off, "none"):
                try:
                    o.check(value, off="none")
                except ValueError as error:
                    raise ConfigError(f"algorithm.{error}") from None
        if self.optimizer not in LOCAL_RULES:
            raise ConfigError(f"algorithm.optimizer={self.optimizer!r} is not known; allowed: {', '.join(LOCAL_RULES)}")
        try:
            sync_rule(self.sync)
            # a 'theory' period is known once N and T are: check the options with one every option allows
            spec = self.round_spec(
                period=max(1, self.inner_period) * max(1, self.overlap) if self.period == "theory" else None
            )
            local_rule(self.optimizer, lr=1.0, **self.local_settings())
            kept = LOCAL_RULES[self.optimizer].STATE
            for name in spec.sync_state or ():
                if name not in kept:
                    raise ConfigError(
                        f"algorithm.sync_state names {name!r}, which optimizer={self.optimizer!r} does not keep; it "
                        f"keeps {', '.join(kept)}"
                    )
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(f"algorithm: {error}") from None

    def local_settings(self) -> dict[str, Any]:
        """The local rule's settings for the engines (``optimizer`` excluded): those of the rule ``optimizer`` names;
        the other rule's keys must keep their defaults (a value given there would be ignored: refused instead)."""
        sgd, adamw = {"momentum": 0.9, "nesterov": False}, {"betas": (0.9, 0.999), "eps": 1e-8}
        mine, others = (sgd, adamw) if self.optimizer == "sgd" else (adamw, sgd)
        for key, default in others.items():
            if getattr(self, key) != default:
                raise ConfigError(
                    f"algorithm.{key}={getattr(self, key)!r} is not a setting of optimizer={self.optimizer!r}; it "
                    f"takes {', '.join((*mine, 'weight_decay'))}"
                )
        return {key: getattr(self, key) for key in (*mine, "weight_decay")}

    def round_spec(self, period: int | None = None) -> RoundSpec:
        """The round's description (``period``: the resolved one, where the config says 'theory')."""
        values = {o.name: getattr(self, o.name) for o in ROUND_OPTIONS}
        return RoundSpec.from_config(self.sync, self.period if period is None else period, values)


AlgorithmConfig = dataclasses.make_dataclass(
    "AlgorithmConfig",
    [(o.name, o.kind, option(o.off, o.doc, choices=o.choices)) for o in ROUND_OPTIONS],
    bases=(_LocalAndRule,),
    frozen=True,
)
AlgorithmConfig.__module__ = __name__
AlgorithmConfig.__doc__ = (
    "The sync rule, the local update and every round option (:data:`prsgd.algorithm.round.ROUND_OPTIONS`: a config "
    "key and a flag each, off at their default)."
)


@dataclass(frozen=True)
class TrainingConfig:
    """Workers, batches, length, learning-rate schedule, seeds and evaluation. Epochs are joint epochs."""

    workers: int = option(8, "N; under torchrun it must equal the world size")
    batch_size: int = option(16, "examples per worker per step")
    epochs: float = option(20.0, "joint epochs: examples read by all workers together / training-set size")
    lr: float | Theory = option(
        0.05, "gamma; 'theory': lr_scale * sqrt(N / T), the corollaries' rate (prsgd.algorithm.theory)"
    )
    lr_scale: float = option(1.0, "with lr = 'theory' only")
    lr_schedule: str = option("constant", "the learning-rate schedule over joint epochs", choices=SCHEDULES)
    milestones: tuple[float, ...] = option((), "joint epochs at which the step schedule multiplies lr by lr_decay")
    lr_decay: float = option(0.1, "the step schedule's factor at each milestone")
    warmup_epochs: float = option(0.0, "linear warm-up from lr / 10 over this many joint epochs")
    evals: int = option(20, "evaluations over the run, plus one at step 0")
    eval_train_examples: int = option(2000, "training loss is measured on this many (seeded) training examples")
    seed: int = option(0, "seeds the model, the data order and the split")
    checkpoint_every: int = option(0, "steps between checkpoints (with out); 0: at every evaluation. Always at the end")
    keep_checkpoints: int = option(2, "the newest this many complete checkpoints are kept")
    check_finite: bool = option(True, "stop with an error naming the step and worker at the first NaN/inf")
    compile: bool = option(
        False, "simulator engine: torch.compile the vmapped gradient step (prsgd.Simulator(compile=True))"
    )
    compute: str = option(
        "auto",
        "simulator engine: the N gradients by one vmapped call (vmap) or per-worker autograd (loop); auto: loop for "
        "conv and recurrent nets on CPU, vmap otherwise",
        choices=COMPUTE,
    )

    def __post_init__(self) -> None:
        check_at_least("training.workers", self.workers, 1)
        check_at_least("training.batch_size", self.batch_size, 1)
        check_positive("training.epochs", self.epochs)
        if self.lr != "theory":
            check_positive("training.lr", self.lr)
            if self.lr > 1e6:
                raise ConfigError(f"training.lr={self.lr!r} is not allowed; above 1e6 every update overflows float32")
        check_positive("training.lr_scale", self.lr_scale)
        if self.compute not in COMPUTE:
            raise ConfigError(f"training.compute={self.compute!r} is not known; allowed: {', '.join(COMPUTE)}")
        if self.lr_schedule not in SCHEDULES:
            allowed = ", ".join(SCHEDULES)
            raise ConfigError(f"training.lr_schedule={self.lr_schedule!r} is not known; allowed: {allowed}")
        if list(self.milestones) != sorted(self.milestones) or not all(0 < m < math.inf for m in self.milestones):
            raise ConfigError(f"training.milestones={self.milestones!r} must be increasing joint epochs > 0")
        check_positive("training.lr_decay", self.lr_decay)
        check_at_least("training.warmup_epochs", self.warmup_epochs, 0)
        if not math.isfinite(self.warmup_epochs):
            raise ConfigError(f"training.warmup_epochs={self.warmup_epochs!r} is not allowed; it must be finite")
        check_at_least("training.evals", self.evals, 1)
        check_at_least("training.eval_train_examples", self.eval_train_examples, 1)
        check_at_least("training.checkpoint_every", self.checkpoint_every, 0)
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"training.seed={self.seed!r} is not allowed; it must be in [0, 2**63)")
        check_at_least("training.keep_checkpoints", self.keep_checkpoints, 1)

    def lr_at(self, joint_epoch: float) -> float:
        """The learning rate after ``joint_epoch`` joint epochs: warm-up, then constant or step decay."""
        lr = self.lr
        if self.lr_schedule == "step":
            lr *= self.lr_decay ** sum(joint_epoch >= m for m in self.milestones)
        if joint_epoch < self.warmup_epochs:
            lr *= 0.1 + 0.9 * joint_epoch / self.warmup_epochs
        return lr


@dataclass(frozen=True)
class RunConfig:
    engine: str = option(
        "simulator",
        "simulator: N workers in this process; distributed: one worker per torchrun process",
        choices=ENGINES,
    )
    device: str = option("cpu", "cpu, cuda or cuda:N")
    out: str = option("", "folder for the run's config, log, summary and checkpoints; empty: write nothing")
    progress: bool = option(True, "show a progress bar")
    seeds: int = option(1, "prsgd run: seeds training.seed, +1, ... (each into OUT/seed<k>)")
    sweep: str = option("", "prsgd run: 'KEY=V1,V2,...' runs once per value (each into OUT/<key>=<value>)")
    resume: bool = option(False, "continue from the newest intact checkpoint in OUT/checkpoints (if there is one)")
    overwrite: bool = option(False, "a fresh run into an OUT holding checkpoints moves them aside (never deletes)")
    worker_timeout: float = option(
        300.0, "distributed: seconds a collective waits before the run fails naming the rank"
    )
    fault_tolerant: bool = option(
        False,
        "distributed: this torchrun job is one replica group of a fault-tolerant run (torchft: TORCHFT_LIGHTHOUSE and "
        "REPLICA_GROUP_ID from the environment, one process per group, training.workers groups; writes OUT/group-<g>)",
    )
    logger: str = option(
        "jsonl",
        "comma-separated list: jsonl (always, with out), csv (OUT/log.csv), tensorboard (OUT/tensorboard)",
        choices=LOGGERS,
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine={self.engine!r} is not known; allowed: {', '.join(ENGINES)}")
        check_at_least("seeds", self.seeds, 1)
        if self.seeds > 1000:
            raise ConfigError(f"seeds={self.seeds} is not allowed; at most 1000 runs of one config")
        check_positive("worker_timeout", self.worker_timeout)
        try:
            check_loggers(self.logger)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        device = self.device.split(":")
        if device[0] not in ("cpu", "cuda") or len(device) > 2 or (len(device) == 2 and not device[1].isdigit()):
            raise ConfigError(f"device={self.device!r} is not known; allowed: cpu, cuda, cuda:N")
        a = self.algorithm
        if a.nodes and self.training.workers % a.nodes:
            raise ConfigError(f"algorithm.nodes={a.nodes} does not divide training.workers={self.training.workers}")
        if a.inner_period and not a.nodes and self.engine == "simulator":
            raise ConfigError(
                f"algorithm.inner_period={a.inner_period} needs algorithm.nodes (how many nodes the simulated "
                "workers form); the distributed engine takes it from torchrun"
            )
        if self.engine == "distributed" and self.training.compile:
            raise ConfigError(
                "training.compile=True compiles the simulator's vmapped step; engine='distributed' has none"
            )
        if self.engine == "distributed" and self.training.compute != "auto":
            raise ConfigError(
                f"training.compute={self.training.compute!r} chooses how the simulator computes its workers' "
                "gradients; engine='distributed' computes one worker's per process"
            )
        if self.fault_tolerant and self.engine != "distributed":
            raise ConfigError(
                "fault_tolerant=True runs one replica group per torchrun job; it needs engine='distributed'"
            )
        if self.fault_tolerant and self.resume:
            raise ConfigError(
                "fault_tolerant=True recovers a group that starts again from a live peer; resume=True (from this "
                "group's checkpoint) is not allowed with it"
            )
        if self.training.compile and self.training.compute == "loop":
            raise ConfigError(
                "training.compile=True compiles the vmapped step; it needs training.compute='vmap' or 'auto'"
            )

    @property
    def loggers(self) -> tuple[str, ...]:
        """``logger`` as the tuple of tracker names it lists."""
        return check_loggers(self.logger)

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with dotted keys (``algorithm.period``) or unique leaf names (``period``) replaced."""
        return from_dict(_merge(to_dict(self), {_dotted(k): v for k, v in overrides.items()}))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "algorithm": AlgorithmConfig, "training": TrainingConfig}


def _leaf_index() -> dict[str, str]:
    index = {f.name: f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise AssertionError(f"config key {f.name} is not unique")
            index[f.name] = f"{section}.{f.name}"
    return index


LEAVES = _leaf_index()  # leaf name -> dotted key


def _dotted(key: str) -> str:
    if "." in key:
        return key
    if key not in LEAVES:
        raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(LEAVES.values()))}")
    return LEAVES[key]


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(f"{prefix}{f.name}" for f in dataclasses.fields(cls))
            raise ConfigError(f"unknown config key {name!r}; known keys here: {known}")
        if key in SECTIONS and not prefix:
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a section (a table of keys)")
            kwargs[key] = _build(SECTIONS[key], value, f"{key}.")
        else:
            kwargs[key] = convert(name, value, hints[key])
    return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, values, "")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dicts and lists (JSON- and TOML-friendly)."""
    return _lists(dataclasses.asdict(config))


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def _merge(base: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in dotted.items():
        parts = key.split(".")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] not in SECTIONS):
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(LEAVES.values()))}")
        if len(parts) == 2:
            merged[parts[0]][parts[1]] = value
        else:
            merged[parts[0]] = value
    return merged


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML config file and apply ``overrides`` (dotted or leaf keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None
    dotted = {_dotted(k): v for k, v in (overrides or {}).items()}
    return from_dict(_merge(values | {s: values.get(s, {}) for s in SECTIONS}, dotted))
