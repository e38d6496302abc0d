"""One table of round options drives one test: every combination of the values in ``ROUND_OPTIONS`` (and every sync
rule) is either refused with the message of the first exclusion it breaks, or trains on the simulator exactly as the
per-worker reference of tests/reference.py, and (slow) on LocalSGD in 4 gloo processes as on the simulator. A new
round option is tested by its row in the table and its lines in the reference."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import batches, mlp
from reference import RoundReference
from test_distributed import ATOLS, assert_ranks_match_the_simulator, spawn

import prsgd
from prsgd.algorithm import EXCLUSIONS, ROUND_OPTIONS, SYNC_RULES, RoundSpec

N, PERIOD, STEPS = 4, 4, 10
RING = np.array([[1 / 3 if (i - j) % N in (0, 1, N - 1) else 0.0 for j in range(N)] for i in range(N)])
"""The ring's mixing matrix for 4 workers, written out: each worker averages itself and its two neighbours."""


def combinations() -> list[dict]:
    """Every sync rule with every combination of each option's examples and its off value."""
    values = [[None, *option.examples] for option in ROUND_OPTIONS]
    names = [option.name for option in ROUND_OPTIONS]
    return [
        {"sync": sync, "period": PERIOD, **{n: v for n, v in zip(names, chosen, strict=True) if v is not None}}
        for sync in SYNC_RULES
        for chosen in itertools.product(*values)
    ]


def first_exclusion(options: dict) -> str | None:
    """The message of the first exclusion ``options`` break, judged on the options as given (the outer step's
    missing half filled in as a RoundSpec does), without building a RoundSpec."""
    unchecked = object.__new__(RoundSpec)
    for f in dataclasses.fields(RoundSpec):
        object.__setattr__(unchecked, f.name, options.get(f.name, f.default))
    if unchecked.outer_lr is not None or unchecked.outer_momentum is not None:
        object.__setattr__(unchecked, "outer_lr", 1.0 if unchecked.outer_lr is None else unchecked.outer_lr)
        object.__setattr__(unchecked, "outer_momentum", unchecked.outer_momentum or 0.0)
    return next((e.message(unchecked) for e in EXCLUSIONS if e.applies(unchecked)), None)


def allowed() -> list[dict]:
    """The combinations a RoundSpec takes and both engines run (the simulator needs nodes with inner_period)."""
    return [o for o in combinations() if first_exclusion(o) is None and ("inner_period" not in o or "nodes" in o)]


ALLOWED = allowed()


def test_the_table_walks_every_option_and_most_combinations_are_refused_by_an_exclusion():
    assert {o.name for o in ROUND_OPTIONS} | {"sync", "period"} == {f.name for f in dataclasses.fields(RoundSpec)}
    walked = combinations()
    assert len(walked) == len(SYNC_RULES) * np.prod([len(o.examples) + 1 for o in ROUND_OPTIONS])
    assert 100 < len(ALLOWED) < len(walked) / 4


@pytest.mark.parametrize("sync", SYNC_RULES)
def test_a_combination_is_refused_exactly_by_the_first_exclusion_it_breaks(sync):
    """One test per rule walks its combinations (thousands: a parametrized test each would cost more in pytest's
    bookkeeping than in the checks)."""
    for options in (o for o in combinations() if o["sync"] == sync):
        expected = first_exclusion(options)
        if expected is None:
            spec = RoundSpec(**options)
            assert RoundSpec.of(None, **options) == spec, options
            continue
        with pytest.raises(prsgd.InvalidArgument) as refused:
            RoundSpec(**options)
        assert str(refused.value) == expected, options
        with pytest.raises(
            prsgd.InvalidArgument, match=r"inner_period|nodes|overlap|outer|compression|topology|sync|state"
        ):
            prsgd.Simulator(mlp(), num_workers=N, lr=0.1, **options)


def test_the_simulator_refuses_inner_rounds_without_nodes():
    with pytest.raises(prsgd.InvalidArgument, match="inner_period= needs nodes="):
        prsgd.Simulator(mlp(), num_workers=N, lr=0.1, period=PERIOD, inner_period=2)


LOCAL = {
    "sgd": dict(lr=0.1, momentum=0.9),
    "adamw": dict(optimizer="adamw", lr=0.01, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1),
}
LOCAL_STATE = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}
"""Each local rule with the settings the combinations train with, and the state tensors it keeps. AdamW's first
steps move each parameter by about lr * sign(gradient): for a bias before BatchNorm, whose gradient is zero but for
float noise (vmap vs a loop), eps keeps that noise from deciding a step of lr."""


def reference_for(options: dict, model, local: dict = LOCAL["sgd"]) -> RoundReference:
    return RoundReference(
        model,
        N,
        mixing_matrix=(lambda step: RING) if "topology" in options else None,
        **local,
        **{k: v for k, v in options.items() if k != "topology"},
    )


def assert_state_close(sim: prsgd.Simulator, ref: RoundReference, msg: str, **tolerances) -> None:
    """Every state tensor of the simulator's workers as the reference's; counters (one per parameter on the
    simulator, whose workers step in lockstep) as every reference worker's."""
    ours = sim.optimizer_state()
    assert set(ours) == set(ref.state()), msg
    for kind, by_param in ref.state().items():
        for name, theirs in by_param.items():
            mine = ours[kind][name].expand_as(theirs) if ours[kind][name].dim() == 0 else ours[kind][name]
            torch.testing.assert_close(mine, theirs, **tolerances, msg=f"{msg} {kind} {name}")


@pytest.mark.parametrize("optimizer", LOCAL)
@pytest.mark.parametrize("options", ALLOWED, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_allowed_combination_trains_on_the_simulator_as_the_per_worker_reference(options, optimizer):
    model = mlp(batchnorm=True)
    refused = refused_by_the_local_rule(options, optimizer)
    if refused:
        with pytest.raises(prsgd.InvalidArgument, match=refused):
            prsgd.Simulator(model, num_workers=N, **LOCAL[optimizer], round=RoundSpec(**options))
        return
    # compressed rounds compute the gradients as the reference does (one worker at a time; vmap and the loop are
    # compared by the simulator's own tests); float noise left (the outer step's arithmetic is not torch.optim.SGD's
    # to the last bit) can still move a value across a rounding boundary: a whole rounding step where everything
    # else agrees to 1e-5 (an fp16 ulp of the change, 2^-14 below 1/8; a bf16 one, relative 2^-7; an int8 step of
    # its chunk; an int4 step, up to 1/7 of a chunk's largest momentum, ~0.4 here). Top-k happens not to flip here.
    compute = "loop" if "compression" in options else "auto"
    sim = prsgd.Simulator(model, num_workers=N, **LOCAL[optimizer], round=RoundSpec(**options), compute=compute)
    ref = reference_for(options, model, LOCAL[optimizer])
    tolerances = {"fp16": (1e-3, 6.2e-5), "bf16": (8e-3, 1e-5), "int8": (1e-5, 2e-3), "int4": (1e-5, 6e-2)}
    outer = "outer_lr" in options or "outer_momentum" in options
    rtol, atol = tolerances.get(options.get("compression"), (1e-5, 1e-5)) if outer else (1e-5, 1e-5)
    for t, (x, y) in enumerate(batches(N, STEPS)):
        sim.step(x, y, F.cross_entropy)
        ref.step(x, y, F.cross_entropy)
        for name, p in ref.params().items():
            torch.testing.assert_close(sim.params()[name], p, rtol=rtol, atol=atol, msg=f"step {t} {name}")
        assert_state_close(sim, ref, f"step {t}", rtol=rtol, atol=atol)
        for name, b in ref.buffers().items():
            torch.testing.assert_close(sim.buffers()[name], b, rtol=rtol, atol=atol, msg=f"step {t} {name}")


def refused_by_the_local_rule(options: dict, optimizer: str) -> str | None:
    """What the local rule refuses, as a pattern of its message: AdamW compressed or overlapped rounds that would
    average its second moment, or fragments of a state that rounds clear (its step counters are per parameter); a
    sync_state naming a tensor the rule does not keep."""
    if "sync_state" in options and not set(options["sync_state"]) <= set(LOCAL_STATE[optimizer]):
        return rf"sync_state names '{options['sync_state'][0]}', which optimizer='{optimizer}' does not keep"
    if optimizer == "adamw" and "fragments" in options and SYNC_RULES[options["sync"]].state == "clear":
        return r"fragments=2 with optimizer='adamw' and sync='params_clear_momentum' is not supported"
    sends_second_moment = SYNC_RULES[options["sync"]].state == "average" and "sync_state" not in options
    if optimizer == "adamw" and sends_second_moment and ("compression" in options or options.get("overlap")):
        return r"with optimizer='adamw' and sync=.* is not supported"
    return None


@pytest.mark.slow
def test_every_allowed_combination_trains_on_local_sgd_in_gloo_processes_as_on_the_simulator(tmp_path):
    cases = [
        dict(options, **LOCAL[optimizer], batchnorm=True)
        for optimizer in LOCAL
        for options in ALLOWED
        if not refused_by_the_local_rule(options, optimizer)
    ]
    for case, ranks in zip(cases, spawn(N, cases, tmp_path, steps=STEPS), strict=True):
        # more rounds of more kinds than test_distributed's cases: an fp16 rounding step of changes up to 1/8
        # AdamW: a bias before BatchNorm has a gradient of float noise, which its update divides by about eps
        # int8 / int4: one rounding step of a chunk, 1 + mu of them after an outer step with Nesterov momentum mu
        adamw = {None: 1e-5} if case.get("optimizer") == "adamw" else {}
        atols = {**ATOLS, "fp16": 6.2e-5, "int8": 3e-3, "int4": 6e-2, **adamw}
        assert_ranks_match_the_simulator(case, ranks, N, steps=STEPS, atols=atols)
