"""``LocalSGDStrategy``: PyTorch Lightning training with :class:`prsgd.LocalSGD` (``pip install prsgd[lightning]``).

Lightning's ``"ddp"`` strategy wraps the model in ``DistributedDataParallel``, which all-reduces gradients every
step and broadcasts rank 0's buffers every forward: with LocalSGD that is double communication, or training that
only works by accident (LocalSGD refuses it). This strategy launches and sets up the process group exactly like
``"ddp"`` (popen/spawn launchers, torchrun, SLURM, any cluster environment Lightning knows) but leaves the model
unwrapped, so LocalSGD's rounds are the only communication. Use it with ``configure_optimizers`` returning
``prsgd.LocalSGD(self, lr, ...)``::

    trainer = Trainer(strategy=LocalSGDStrategy(), accelerator="cpu", devices=2, precision="bf16-mixed",
                      gradient_clip_val=1.0)

Mixed precision: Lightning refuses gradient clipping for an optimizer that unscales gradients itself (LocalSGD
does, so that a step GradScaler skips still counts towards the period on every rank); this strategy's precision
plugin always calls ``scaler.unscale_`` before clipping and ``scaler.step``, which LocalSGD accepts.

Checkpoints: between rounds every rank holds different parameters, buffers, momentum and round state (compressed
rounds' residuals, an overlapped round in flight), while Lightning writes rank 0's model and optimizer only.
``save_checkpoint`` gathers every rank's flat storage (parameters, float buffers, momentum: one ``gather`` per
optimizer), every rank's round state and every rank's GradScaler state into the file rank 0 writes; on resume each
rank restores its own, so a run resumed from the middle of a period continues bit-identically, whatever the round
options. The file is about N times the model's size. Resuming with another number of ranks is refused unless all
ranks were equal when it was saved (right after a full round). Saving needs every rank (Lightning's contract for
``trainer.save_checkpoint``): a call on one rank alone (under ``if trainer.is_global_zero``) fails after
``checkpoint_wait`` seconds with an error that says so, instead of hanging until the process group's timeout.

Validation and testing run on each rank's own model; call ``optimizer.synchronize()`` first (e.g. in
``on_validation_epoch_start``) to evaluate the average, at the cost of one round. At the end of ``fit`` the
strategy synchronizes every LocalSGD once (``synchronize_at_end=True``), so the model that is saved or exported is
the average of the workers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.optim import Optimizer

from prsgd.engines.distributed import (
    all_gather_objects,
    all_ranks_arrive,
    gather_objects_to_first,
    gather_to_first,
    gloo_side_group,
    group_rank,
    group_size,
)
from prsgd.engines.guards import check_not_wrapped
from prsgd.engines.local_sgd import LocalSGD
from prsgd.errors import CheckpointError, InvalidArgument, check_bool, check_number

_DDP_LAUNCH_OPTIONS = {
    "accelerator",
    "parallel_devices",
    "cluster_environment",
    "checkpoint_io",
    "precision_plugin",
    "process_group_backend",
    "timeout",
    "start_method",
}

WORKERS_KEY = "prsgd_workers"
"""Checkpoint key: for each LocalSGD optimizer, ``{"flat": every rank's worker_state() as an (N, numel) tensor,
"rounds": every rank's round_state()}``."""


class LocalSGDStrategy(DDPStrategy):
    """Lightning's DDP launch and process group, without the DDP wrapper: LocalSGD communicates.

    Args:
        synchronize_at_end: one round of every LocalSGD when ``fit`` ends, so that all ranks hold the average.
        checkpoint_wait: seconds a checkpoint waits for every rank to save too before it fails (see above).
        **kwargs: passed to :class:`lightning.pytorch.strategies.DDPStrategy` (``process_group_backend``,
            ``timeout``, ``start_method``, ...); DDP-only options (comm hooks, model averaging, DDP kwargs) are
            refused.
    """

    strategy_name = "prsgd_local_sgd"

    def __init__(self, synchronize_at_end: bool = True, checkpoint_wait: float = 30.0, **kwargs: Any) -> None:
        refused = sorted(set(kwargs) - _DDP_LAUNCH_OPTIONS)
        if refused:
            raise InvalidArgument(
                f"LocalSGDStrategy does not wrap the model in DDP, so {', '.join(refused)} would be ignored; "
                f"it takes {', '.join(sorted(_DDP_LAUNCH_OPTIONS))}; set the algorithm on prsgd.LocalSGD in "
                "configure_optimizers"
            )
        super().__init__(**kwargs)
        self.synchronize_at_end = check_bool("synchronize_at_end", synchronize_at_end)
        self.checkpoint_wait = check_number("checkpoint_wait", checkpoint_wait, positive=True)
        self._checkpoint_group: Any = None

    def setup_distributed(self) -> None:
        import torch._dynamo  # noqa: F401  before the group exists: see prsgd.engines.distributed.init_process_group

        super().setup_distributed()
        # a gloo group of its own for the checkpoint's "is every rank saving?" barrier, apart from training's
        self._checkpoint_group = gloo_side_group()

    def setup(self, trainer: Any) -> None:
        if self._layer_sync is not None:
            raise InvalidArgument(
                "sync_batchnorm=True all-reduces BatchNorm statistics in every forward, which local SGD avoids; "
                "LocalSGD averages them at each round instead: drop sync_batchnorm"
            )
        if type(self.precision_plugin) is MixedPrecision:
            plugin = self.precision_plugin
            self.precision_plugin = LocalSGDMixedPrecision(plugin.precision, plugin.device, plugin.scaler)
        super().setup(trainer)
        if trainer.state.fn == "fit":
            others = [type(opt).__name__ for opt in self.optimizers if not isinstance(opt, LocalSGD)]
            if others:
                raise InvalidArgument(
                    f"LocalSGDStrategy trains with prsgd.LocalSGD, but configure_optimizers returned "
                    f"{', '.join(others)}; return prsgd.LocalSGD(self, lr, momentum=..., period=...) instead"
                )

    def configure_ddp(self) -> None:
        """No DDP wrapper: the LightningModule is trained as it is."""
        check_not_wrapped(self.model, "in LocalSGDStrategy")

    def _local_sgd(self) -> list[LocalSGD]:
        return [opt for opt in self.optimizers if isinstance(opt, LocalSGD)]

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The first part of a checkpoint Lightning asks for: every rank must be saving (see the class docstring)."""
        try:
            all_ranks_arrive(self._checkpoint_group, self.checkpoint_wait)
        except TimeoutError as error:
            raise CheckpointError(
                f"trainer.save_checkpoint on rank {group_rank()}: {error}; with LocalSGDStrategy every rank must call "
                "it (Lightning's contract; not under `if trainer.is_global_zero`): each rank's state goes into the file"
            ) from None
        return super().lightning_module_state_dict()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Every rank calls this (Lightning's contract): gather every rank's state, then rank 0 writes."""
        workers = [
            {"flat": gather_to_first(opt.worker_state()), "rounds": gather_objects_to_first(opt.round_state())}
            for opt in self._local_sgd()
        ]
        if self.is_global_zero and workers:
            checkpoint = {**checkpoint, WORKERS_KEY: workers}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)
        saved = checkpoint.get(WORKERS_KEY)
        if saved is None:
            return
        optimizers = self._local_sgd()
        if len(saved) != len(optimizers):
            raise CheckpointError(f"the checkpoint holds {len(saved)} LocalSGD states; this run has {len(optimizers)}")
        rank, world = group_rank(), group_size()
        for opt, entry in zip(optimizers, saved, strict=True):
            # (checkpoints written before the round state was saved per rank hold the rows alone)
            rows, rounds = (entry["flat"], entry["rounds"]) if isinstance(entry, dict) else (entry, None)
            if rows.shape[1] != opt.worker_state().numel():
                raise CheckpointError(
                    f"the checkpoint's LocalSGD state has {rows.shape[1]} values per worker; this model has "
                    f"{opt.worker_state().numel()}"
                )
            if rows.shape[0] != world and not bool((rows == rows[:1]).all()):
                raise CheckpointError(
                    f"the checkpoint was saved by {rows.shape[0]} ranks whose states differ (mid-period); it can "
                    f"only be resumed with {rows.shape[0]} ranks, not {world}"
                )
            mine = rank if rows.shape[0] == world else 0
            opt.load_worker_state(
                rows[mine], rounds[mine] if rounds is not None else None, from_consensus=rows.shape[0] != world
            )

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.synchronize_at_end:
            for opt in self._local_sgd():
                opt.synchronize()


class LocalSGDMixedPrecision(MixedPrecision):
    """Lightning's mixed precision for LocalSGD: ``scaler.unscale_`` before clipping and ``scaler.step`` (LocalSGD
    accepts unscaled gradients and still counts a skipped step), and every rank's GradScaler state checkpointed."""

    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.scaler is None:
            return Precision.optimizer_step(self, optimizer, model=model, closure=closure, **kwargs)
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            raise InvalidArgument(
                "training_step returned None (a skipped step) on this rank: with LocalSGD every rank must step "
                "every time, or the ranks stop agreeing on when to average"
            )
        self.scaler.unscale_(optimizer)
        self._after_closure(model, optimizer)
        step_output = self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        return step_output

    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)

    def state_dict(self) -> dict[str, Any]:
        if self.scaler is None:
            return {}
        return {"per_rank": all_gather_objects(self.scaler.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None and "per_rank" in state_dict:
            states = state_dict["per_rank"]
            self.scaler.load_state_dict(states[group_rank()] if len(states) == group_size() else states[0])
