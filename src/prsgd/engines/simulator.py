"""``prsgd.Simulator``: N workers in one process, as a leading tensor dimension, on one device.

Every parameter, model buffer and momentum buffer is stacked to shape ``(N, ...)``. All workers' gradients come
from one call (:mod:`prsgd.engines.gradients`); the update and the rounds are the same
:class:`prsgd.algorithm.PeriodicSync` :class:`prsgd.LocalSGD` uses, over the stacked communicator of
:mod:`prsgd.engines.stacked`. No Python loop runs over workers (unless ``compute="loop"`` asks for one).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from prsgd.algorithm import FollowsAlgorithm, PeriodicSync, RoundSpec, UpdateGroup
from prsgd.algorithm.functional import all_finite
from prsgd.algorithm.local import local_rule
from prsgd.algorithm.topology import make_topology
from prsgd.engines.gradients import (
    Inputs,
    LossFn,
    WorkerGradients,
    call_model,
    choose_compute,
    choose_threads,
    map_inputs,
    worker_inputs,
)
from prsgd.engines.stacked import StackedCommunicator
from prsgd.errors import (
    CheckpointError,
    InvalidArgument,
    NonFiniteError,
    PrsgdError,
    check_bool,
    check_device,
    check_int,
)


class Simulator(FollowsAlgorithm, torch.optim.Optimizer):
    """N simulated workers running Algorithm 1 (or a baseline) with per-worker batches.

    Args:
        model: the network every worker starts from (x^0); it is copied, not modified.
        num_workers: N >= 1.
        lr, optimizer, momentum, nesterov, weight_decay, betas, eps: the local rule and its settings, as in
            :class:`prsgd.LocalSGD` (``optimizer="sgd"`` or ``"adamw"``; an optimizer instance is LocalSGD's only).
        device: where the stacked workers live.
        compute: how the N gradients are computed: ``"vmap"`` (one vectorized call), ``"loop"`` (plain autograd
            per worker on views of the stacked tensors) or ``"auto"`` (loop for models with convolutions or
            recurrent layers on CPU, vmap otherwise; :func:`prsgd.engines.gradients.choose_compute` says why).
            Update and sync are vectorized either way.
        threads: with ``compute="loop"``, how many workers compute their gradients at once, each in its own thread
            with 1/threads of torch's intra-op threads. Default: for conv nets on CPU, ``min(num_workers,
            torch.get_num_threads())``; 1 for models with dropout modules and elsewhere
            (:func:`prsgd.engines.gradients.choose_threads`). With
            threads > 1, random ops inside the model draw from torch's global generator in an order that varies
            between runs: use 1 for bit-reproducible runs then.
        compile: ``torch.compile`` the vmapped gradient step: one compilation (seconds to a minute) per input shape
            and per loss function object, so pass the same one every step (speed-ups in benchmarks/README.md).
            Needs ``compute="vmap"`` (``"auto"`` then picks it) and a C++ compiler on CPU.
        check_finite: after computing the gradients and after the update, check every worker's loss, gradients,
            parameters, buffers and momentum and raise :class:`prsgd.NonFiniteError` naming the step and the
            first worker with a NaN or infinity (the gradients are checked before they are averaged or applied,
            so the worker named is the one where it arose). Costs two fused passes (one sync each) per step.
        round: the round's description, a :class:`prsgd.RoundSpec`; or its fields as keywords, as in
            :class:`prsgd.LocalSGD` (``sync``, ``period``, ``topology``, ``compression``, ``overlap``,
            ``inner_period``, ``nodes``, ``outer_lr``, ``outer_momentum``). Here an overlapped round's exchange takes
            no time, and hierarchical rounds need ``nodes``: worker i is on node i // (N / nodes).

    BatchNorm running statistics (floating-point model buffers) are per worker and averaged at every sync, as in
    :class:`prsgd.LocalSGD`. ``comm`` counts what a real run would send per worker.

    The simulator is a ``torch.optim.Optimizer`` with one param group (the stacked parameters and ``lr``,
    ``momentum``, ``nesterov``, ``weight_decay``), read at every step, so that any ``torch.optim.lr_scheduler``
    drives it: ``sched = StepLR(sim, step_size=100)``, then ``sched.step()`` after ``sim.step(...)``. A model
    with shared parameters (an embedding tied to the output layer) keeps them shared: the shared tensor is stacked
    once and gets the sum of its uses' gradients, as autograd gives it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_workers: int,
        lr: float,
        optimizer: str = "sgd",
        momentum: float | None = None,
        nesterov: bool | None = None,
        weight_decay: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        device: str | torch.device = "cpu",
        compute: str = "auto",
        threads: int | None = None,
        compile: bool = False,
        check_finite: bool = False,
        round: RoundSpec | None = None,
        **round_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidArgument(f"model={type(model).__name__} is not allowed; it must be a torch.nn.Module")
        check_int("num_workers", num_workers, 1)
        if isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidArgument(
                "the Simulator runs its own stacked local rules: optimizer='sgd' or 'adamw' (with their settings as "
                "keywords); an optimizer instance is wrapped by prsgd.LocalSGD only"
            )
        rule, hyper = local_rule(
            optimizer, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas, eps=eps
        )
        spec = RoundSpec.of(round, **round_options)
        if spec.inner_period is not None and spec.nodes is None:
            raise InvalidArgument("inner_period= needs nodes= (how many nodes the workers form)")
        spec.check_workers(num_workers)
        has_state = rule.keeps_state([hyper.as_kwargs()])
        self.algorithm = PeriodicSync(spec, has_state=has_state, local_rule=rule)
        self.nodes = spec.nodes
        self.num_workers = num_workers
        self.check_finite = check_bool("check_finite", check_finite)
        self.device = check_device("device", device)
        self.compute = choose_compute(compute, model, self.device, compile)
        self.compile = compile
        self.threads = choose_threads(threads, self.compute, model, self.device, num_workers)
        self.topology = make_topology(spec.topology, num_workers) if spec.topology is not None else None

        self._template = copy.deepcopy(model).to(self.device)
        self._gradients = WorkerGradients(model, num_workers, self.compute, self.threads, self.compile)

        def stack(t: Tensor) -> Tensor:
            return t.detach().to(self.device).unsqueeze(0).repeat(num_workers, *([1] * t.dim())).contiguous()

        self._params = {name: stack(p) for name, p in model.named_parameters()}
        self._buffers = {name: stack(b) for name, b in model.named_buffers()}
        synced, kept = self.algorithm.state_layout(rule.state_names(has_state))
        self._state = {n: {name: torch.zeros_like(p) for name, p in self._params.items()} for n in (*synced, *kept)}
        # one counter per parameter for all workers: the stacked workers update in lockstep
        self._counters = {n: {name: rule.counter() for name in self._params} for n in rule.COUNTERS}
        self.engine = StackedCommunicator(
            num_workers,
            params=list(self._params.values()),
            buffers=[b for b in self._buffers.values() if b.is_floating_point()],
            state=[t for n in synced for t in self._state[n].values()],
            local_state=[t for n in kept for t in self._state[n].values()],
            counters=[t for by_param in self._counters.values() for t in by_param.values()],
            topology=self.topology,
            device=self.device,
            nodes=self.nodes or 1,
        )
        self.algorithm.attach(self.engine)
        torch.optim.Optimizer.__init__(self, list(self._params.values()), hyper.as_kwargs())

    @property
    def hyper(self) -> Any:
        """The hyperparameters of the next step (what the param group holds now)."""
        return self._group_hyperparameters(0, self.param_groups[0])

    def add_param_group(self, param_group: dict) -> None:
        if self.__dict__.get("param_groups"):
            raise InvalidArgument("a Simulator has one param group (every stacked parameter); it cannot add another")
        super().add_param_group(param_group)

    def __getstate__(self) -> dict:
        return self.__dict__  # all of it (Optimizer's keeps only its own fields)

    def step(self, inputs: Inputs, targets: Tensor, loss_fn: LossFn) -> Tensor:  # type: ignore[override]
        """One step of every worker on its own batch ``inputs[i], targets[i]``; returns the losses, shape (N,).

        ``inputs`` is a tensor (the model is called as ``model(x)``), a tuple of tensors (``model(*xs)``) or a dict
        of tensors (``model(**xs)``, keyword arguments), each with the leading worker dimension N; values in a tuple
        or dict that are not tensors go to every worker as they are. ``loss_fn(outputs, targets)`` is the loss of
        one worker's batch (e.g. ``F.cross_entropy``).
        """
        inputs = map_inputs(
            _checked_inputs(inputs, self.num_workers),
            lambda value: value.to(self.device) if isinstance(value, Tensor) else value,
        )
        _check_leading("targets", targets, self.num_workers)
        targets = targets.to(self.device)
        try:
            grads, losses = self._gradients(self._params, self._buffers, inputs, targets, loss_fn)
        except PrsgdError:
            raise
        except (RuntimeError, ValueError, IndexError) as error:
            raise self._explained(error, inputs, targets, loss_fn) from error
        if self.check_finite:  # before the update and the averaging, so the worker named is where it arose
            self._raise_if_nonfinite([("loss", [losses.detach()]), ("gradient", list(grads.values()))], self.steps_done)
        group = UpdateGroup(
            params=list(self._params.values()),
            grads=self.engine.set_grads([grads[name] for name in self._params]),
            state={n: list(by_param.values()) for n, by_param in (*self._state.items(), *self._counters.items())},
            hyper=self.hyper,
        )
        self.algorithm.step([group])
        if self.check_finite:
            e = self.engine
            state = "momentum buffer" if self.algorithm.local_rule.name == "sgd" else "optimizer state"
            state_tensors = [*e.tensors("state"), *e.tensors("local_state")]
            kinds = [("parameter", e.tensors("params")), ("buffer", e.tensors("buffers")), (state, state_tensors)]
            self._raise_if_nonfinite(kinds, self.steps_done - 1)
        return losses.detach()

    def _explained(self, error: Exception, inputs: Inputs, targets: Tensor, loss_fn: LossFn) -> Exception:
        """:class:`InvalidArgument` naming the batch's shapes and what the model's first layer takes when the model
        (or the loss) fails on one worker's batch run plainly, which is then what is wrong (vmap's own message
        names its internal shapes); else ``error`` itself."""
        one = worker_inputs(inputs, 0)
        try:
            with torch.no_grad():
                loss_fn(call_model(copy.deepcopy(self._template), {}, {}, one), targets[0])
        except Exception as plain:
            shapes = _shapes(one)
            message = str(plain).strip().splitlines()[0][:300] if str(plain).strip() else type(plain).__name__
            target_shape = tuple(targets.shape[1:])
            return InvalidArgument(
                f"the model or the loss fails on one worker's batch (inputs {shapes}, targets {target_shape})"
                f"{_first_layer_takes(self._template)}: {message}"
            )
        return error

    def _raise_if_nonfinite(self, kinds: list[tuple[str, list[Tensor]]], step: int) -> None:
        """One fused check (one device sync) of all ``kinds`` (what, stacked tensors); only after a failure are the
        tensors looked at per worker, to name the first bad kind and worker."""
        if all_finite([t for _, ts in kinds for t in ts]):
            return
        n = self.num_workers
        finite = [
            (what, torch.stack([torch.isfinite(t.reshape(n, -1)).all(1) for t in ts]).all(0))
            for what, ts in kinds
            if ts
        ]
        what, ok = next((what, ok) for what, ok in finite if not bool(ok.all()))
        bad = torch.nonzero(~ok).flatten().tolist()
        raise NonFiniteError(
            f"non-finite {what} (NaN or inf) at step {step} on worker {bad[0]} of {n}"
            + (f" (also workers {', '.join(map(str, bad[1:]))})" if len(bad) > 1 else "")
        )

    def synchronize(self) -> None:
        """One round now, outside the schedule, as :meth:`prsgd.LocalSGD.synchronize` (see
        :meth:`prsgd.algorithm.PeriodicSync.synchronize`); counted in ``comm``. Later rounds keep their schedule."""
        self.algorithm.synchronize()

    def state_dict(self) -> dict[str, object]:  # type: ignore[override]
        """Everything needed to continue bit-identically: every worker's parameters, model buffers and optimizer
        state by name (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq`` and the counter ``step``), the learning
        rate, and the algorithm's state (step counter, hence the position within the period, and communication)
        under ``"prsgd"``, in the format :class:`prsgd.LocalSGD` saves too."""
        return {
            "num_workers": self.num_workers,
            "params": self.params(),
            "buffers": self.buffers(),
            "state": self.optimizer_state(),
            "lr": self.param_groups[0]["lr"],
            "hyperparameters": self.hyper.as_kwargs(),  # what a scheduler may have changed: momentum too
            "prsgd": self.algorithm.state_dict(),
        }

    def load_state_dict(self, state: dict, *, from_consensus: bool = False) -> None:  # type: ignore[override]
        """Restore :meth:`state_dict` output of a simulator of the same model and number of workers.

        ``from_consensus=True`` takes a state of any number of workers that was saved in consensus
        (:attr:`in_consensus`): every worker starts from its worker 0, and the step counter is rescaled so that the
        run continues at the same joint epoch (see :meth:`prsgd.algorithm.PeriodicSync.load_state_dict`)."""
        saved_workers = state.get("num_workers")
        if not from_consensus and saved_workers != self.num_workers:
            raise CheckpointError(f"the state holds {saved_workers} workers; this simulator has {self.num_workers}")
        saved_state = state["state"] if "state" in state else _older_optimizer_state(state)
        ours = {**self._state, **self._counters}
        if set(saved_state) != set(ours):
            raise CheckpointError(
                f"the state keeps optimizer state {sorted(saved_state)}; this simulator keeps {sorted(ours)}"
            )
        parts = [("params", state["params"], self._params), ("buffers", state["buffers"], self._buffers)]
        parts += [(name, saved_state[name], ours) for name, ours in self._state.items()]
        for kind, theirs, ours in parts:
            skip = 1 if from_consensus else 0  # the worker dimension may differ
            if set(theirs) != set(ours) or any(theirs[n].shape[skip:] != t.shape[skip:] for n, t in ours.items()):
                raise CheckpointError(f"the state's {kind} do not match this model's (names or shapes differ)")
            for name, t in ours.items():
                t.copy_(theirs[name][:1].expand_as(t) if from_consensus else theirs[name])
        for kind, counters in self._counters.items():  # one per parameter, for every worker
            if set(saved_state[kind]) != set(counters):
                raise CheckpointError(f"the state's {kind} counters do not match this model's parameters")
            for name, t in counters.items():
                t.copy_(saved_state[kind][name])
        algorithm = state["prsgd"] if "prsgd" in state else _older_algorithm_state(state)
        self.algorithm.load_state_dict(algorithm, from_consensus=from_consensus)
        self.algorithm.take_x0()  # every tensor is loaded
        hyper = state.get("hyperparameters", {"lr": float(state["lr"])})  # older states: the learning rate only
        self._set_hyperparameters(**hyper)

    def set_lr(self, lr: float) -> None:
        """Change the learning rate gamma for the following steps (what a ``torch.optim.lr_scheduler`` does through
        ``param_groups``)."""
        self._set_hyperparameters(lr=lr)

    def _set_hyperparameters(self, **changes: Any) -> None:
        dataclasses.replace(self.hyper, **changes)  # checked now
        self.param_groups[0].update(changes)

    def params(self) -> dict[str, Tensor]:
        """Every worker's parameters: name -> ``(N, ...)`` tensor (a copy)."""
        return {name: p.clone() for name, p in self._params.items()}

    def momentum(self) -> dict[str, Tensor]:
        """Every worker's momentum buffer: name -> ``(N, ...)`` (a copy); empty when momentum is 0."""
        return {name: m.clone() for name, m in self._state.get("momentum_buffer", {}).items()}

    def optimizer_state(self) -> dict[str, dict[str, Tensor]]:
        """Every worker's optimizer state: state name -> parameter name -> ``(N, ...)`` (copies); counters (AdamW's
        ``step``) are one 0-d tensor per parameter, common to all workers."""
        kept = (*self._state.items(), *self._counters.items())
        return {n: {name: t.clone() for name, t in by_param.items()} for n, by_param in kept}

    def buffers(self) -> dict[str, Tensor]:
        """Every worker's model buffers (e.g. BatchNorm running statistics): name -> ``(N, ...)`` (a copy)."""
        return {name: b.clone() for name, b in self._buffers.items()}

    def averaged_model(self) -> nn.Module:
        """A new module holding the node averages x_bar (and averaged float buffers), in eval mode."""
        model = copy.deepcopy(self._template)
        averages = {name: p.mean(dim=0) for name, p in self._params.items()}
        for name, b in self._buffers.items():
            averages[name] = b.mean(dim=0) if b.is_floating_point() else b[0]
        # a shared (tied) tensor is stacked once, under its first name; the state dict lists it under every name
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        first_name = {id(t): name for name, t in reversed(named)}
        state = model.state_dict(keep_vars=True)
        model.load_state_dict({name: averages[first_name[id(t)]] for name, t in state.items()})
        return model.eval()


def _checked_inputs(inputs: Inputs, num_workers: int) -> Inputs:
    """``inputs`` if each of its tensors has the leading worker dimension, else :class:`InvalidArgument` naming it."""
    if isinstance(inputs, dict):
        named = [(f"inputs[{key!r}]", value) for key, value in inputs.items()]
    elif isinstance(inputs, (tuple, list)):
        named = [(f"inputs[{k}]", value) for k, value in enumerate(inputs)]
    else:
        named = [("inputs", inputs)]
    if not any(isinstance(value, Tensor) for _, value in named):
        raise InvalidArgument(
            f"inputs is a {type(inputs).__name__} holding no tensor; allowed: a tensor, or a tuple or dict of tensors"
        )
    for name, value in named:
        if isinstance(value, Tensor):
            _check_leading(name, value, num_workers)
    return inputs


def _check_leading(name: str, t: object, num_workers: int) -> None:
    if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[0] != num_workers:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise InvalidArgument(
            f"{name} has shape {shape}; its leading dimension must be num_workers={num_workers} "
            "(one batch per worker, shape (N, b, ...))"
        )


def _shapes(inputs: Inputs) -> str:
    return str(map_inputs(inputs, lambda value: tuple(value.shape) if isinstance(value, Tensor) else value))


def _first_layer_takes(model: nn.Module) -> str:
    """What the model's first layer (in module order) takes, when it is a common kind; else ''."""
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Linear):
            return f"; its first layer {name} ({kind}) takes inputs whose last dimension is {module.in_features}"
        if isinstance(module, nn.modules.conv._ConvNd):
            return f"; its first layer {name} ({kind}) takes {module.in_channels} input channels, shape (b, C, ...)"
        if isinstance(module, nn.Embedding):
            return f"; its first layer {name} ({kind}) takes integer indices below {module.num_embeddings}"
        if isinstance(module, nn.RNNBase):
            return f"; its first layer {name} ({kind}) takes inputs whose last dimension is {module.input_size}"
    return ""


def _older_algorithm_state(state: dict) -> dict:
    """The algorithm's state from a simulator state dict of prsgd 0.1 (``steps_done`` and ``comm: [rounds,
    bytes]`` at the top level), so that checkpoints written before the common format still resume."""
    rounds, nbytes = state["comm"]
    return {"workers": state["num_workers"], "steps_done": state["steps_done"], "rounds": rounds, "bytes": nbytes}


def _older_optimizer_state(state: dict) -> dict:
    """The optimizer state of a simulator state dict saved before state was kept by name (``"momentum"``)."""
    return {"momentum_buffer": state["momentum"]} if state.get("momentum") else {}
