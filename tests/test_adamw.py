"""AdamW as the local rule: one worker equals torch.optim.AdamW step for step (bit for bit), its state loads into a
torch AdamW and back, the simulator equals N serial AdamW copies written out per worker, a mid-period checkpoint
resumes bit for bit, and every misuse gets one clear error. (Every round option with AdamW: test_round_options.py;
PostLocalSGDOptimizer(AdamW) and DDP + AdamW in gloo processes: test_user_stack.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, mlp
from reference import ReferenceWorkers

import prsgd

ADAMW = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _train(model, opt, data, rank=0, skip_grad=None):
    for t, (x, y) in enumerate(data):
        opt.zero_grad()
        F.cross_entropy(model(x[rank]), y[rank]).backward()
        if skip_grad is not None and t % 3 == 1:
            skip_grad(model).grad = None  # a parameter without a gradient this step: no update, no step counted
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_one_worker_equals_torch_adamw_step_for_step_bit_for_bit(foreach):
    """Two param groups with their own settings, a parameter that misses its gradient every third step, and a
    scheduler that changes lr: parameters, moments and step counters equal torch's exactly after every step."""
    model = mlp(batchnorm=True)
    theirs = copy.deepcopy(model)

    def groups(m):
        return [
            {"params": [m[0].weight, m[0].bias, m[1].weight, m[1].bias]},
            {"params": [m[3].weight, m[3].bias], "lr": 0.003, "betas": (0.8, 0.99), "weight_decay": 0.0},
        ]

    ours = prsgd.LocalSGD(groups(model), optimizer="adamw", model=model, **ADAMW)
    ref = torch.optim.AdamW(groups(theirs), foreach=foreach, **ADAMW)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5) for o in (ours, ref)]
    for t, (x, y) in enumerate(batches(1, 12)):
        for m, opt, sched in ((model, ours, schedulers[0]), (theirs, ref, schedulers[1])):
            opt.zero_grad()
            F.cross_entropy(m(x[0]), y[0]).backward()
            if t % 3 == 1:
                m[3].bias.grad = None
            opt.step()
            sched.step()
        for p, q in zip(model.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(p, q), f"step {t}"
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(ours.state[p][name], ref.state[q][name]), f"step {t} {name}"
    assert ours.state[model[3].bias]["step"].item() == 8  # 12 steps, 4 without a gradient
    assert ours.state[model[3].bias]["step"].dtype == torch.float32


def test_the_state_dict_loads_into_torch_adamw_and_back_and_training_continues_equal():
    data = batches(1, 12)
    a, b = mlp(), mlp()
    ours = prsgd.LocalSGD(a, optimizer="adamw", **ADAMW)
    _train(a, ours, data[:5])
    # ours -> torch
    b.load_state_dict(a.state_dict())
    ref = torch.optim.AdamW(b.parameters(), **ADAMW)
    ref.load_state_dict(ours.state_dict())
    _train(a, ours, data[5:8])
    _train(b, ref, data[5:8])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    # torch -> a fresh LocalSGD
    c = copy.deepcopy(b)
    again = prsgd.LocalSGD(c, optimizer="adamw", **ADAMW)
    again.load_state_dict(ref.state_dict())
    _train(b, ref, data[8:])
    _train(c, again, data[8:])
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), c.parameters(), strict=True))
    assert torch.equal(again.state[c[0].weight]["exp_avg_sq"], ref.state[b[0].weight]["exp_avg_sq"])


@pytest.mark.parametrize("sync", ["none", "params_and_momentum", "params_only", "params_clear_momentum", "gradients"])
def test_the_simulator_equals_n_serial_torch_adamw_copies(sync):
    model = mlp()
    sim = prsgd.Simulator(model, num_workers=3, optimizer="adamw", sync=sync, period=3, **ADAMW)
    ref = ReferenceWorkers(model, 3, optimizer="adamw", sync=sync, period=3, **ADAMW)
    for t, (x, y) in enumerate(batches(3, 8)):
        sim.step(x, y, F.cross_entropy)
        ref.step(x, y, F.cross_entropy)
        for name, p in ref.params().items():
            torch.testing.assert_close(sim.params()[name], p, rtol=1e-5, atol=1e-6, msg=f"step {t} {name}")
        state = sim.optimizer_state()
        for kind in ("exp_avg", "exp_avg_sq"):
            for name, v in ref.state()[kind].items():
                torch.testing.assert_close(state[kind][name], v, rtol=1e-5, atol=1e-8, msg=f"step {t} {kind}")
        for name, steps in ref.state()["step"].items():
            assert (steps == state["step"][name]).all(), f"step {t} {name}"
    if sync == "params_clear_momentum":  # a cleared state is a fresh optimizer: its counters restart too
        assert all(s.item() == 8 % 3 for s in sim.optimizer_state()["step"].values())


def test_algorithm_1_averages_both_moments_in_the_one_round_params_only_keeps_them():
    model = mlp()
    runs = {
        sync: prsgd.Simulator(model, num_workers=4, optimizer="adamw", sync=sync, period=2, **ADAMW)
        for sync in ("params_and_momentum", "params_only")
    }
    for x, y in batches(4, 4):
        for sim in runs.values():
            sim.step(x, y, F.cross_entropy)
    n_params = sum(p.numel() for p in model.parameters())
    alg1, params_only = runs["params_and_momentum"], runs["params_only"]
    assert alg1.comm.rounds == params_only.comm.rounds == 2  # one collective per round, state included
    assert alg1.comm.bytes == 2 * 3 * 4 * n_params and params_only.comm.bytes == 2 * 4 * n_params
    for kind in ("exp_avg", "exp_avg_sq"):
        for v in alg1.optimizer_state()[kind].values():
            assert torch.equal(v, v[:1].expand_as(v))  # equal on every worker after the round
        assert any(not torch.equal(v, v[:1].expand_as(v)) for v in params_only.optimizer_state()[kind].values())
    assert alg1.in_consensus and not params_only.in_consensus


@pytest.mark.parametrize(
    "options",
    [
        dict(sync="params_and_momentum", period=4),
        dict(sync="params_only", period=4, outer_lr=0.7, outer_momentum=0.9),  # DiLoCo
        dict(sync="params_only", period=4, compression="int8", overlap=1),
        dict(sync="gossip", topology="ring", period=2),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_a_checkpoint_taken_inside_a_period_resumes_bit_for_bit(options):
    model, data = mlp(batchnorm=True), batches(4, 11)
    straight = prsgd.Simulator(model, num_workers=4, optimizer="adamw", **ADAMW, **options)
    for x, y in data:
        straight.step(x, y, F.cross_entropy)
    first = prsgd.Simulator(model, num_workers=4, optimizer="adamw", **ADAMW, **options)
    for x, y in data[:6]:  # step 6: inside the second period
        first.step(x, y, F.cross_entropy)
    saved = copy.deepcopy(first.state_dict())
    resumed = prsgd.Simulator(model, num_workers=4, optimizer="adamw", **ADAMW, **options)
    resumed.load_state_dict(saved)
    for x, y in data[6:]:
        resumed.step(x, y, F.cross_entropy)
    for name, p in straight.params().items():
        assert torch.equal(resumed.params()[name], p), name
    for kind, by_param in straight.optimizer_state().items():
        for name, v in by_param.items():
            assert torch.equal(resumed.optimizer_state()[kind][name], v), (kind, name)
    assert resumed.comm == straight.comm


def test_an_adamw_state_does_not_load_into_an_sgd_simulator():
    adamw = prsgd.Simulator(mlp(), num_workers=2, optimizer="adamw", lr=0.01)
    sgd = prsgd.Simulator(mlp(), num_workers=2, lr=0.01, momentum=0.9)
    with pytest.raises(prsgd.CheckpointError, match=r"keeps optimizer state \['exp_avg', 'exp_avg_sq', 'step'\]"):
        sgd.load_state_dict(adamw.state_dict())


@pytest.mark.parametrize(
    ("saved", "loaded", "message"),
    [
        (
            dict(momentum=0.9),
            dict(optimizer="adamw"),
            r"\['momentum_buffer'\]; this LocalSGD \(optimizer='adamw'\) keeps",
        ),
        (dict(optimizer="adamw"), dict(momentum=0.9), r"\['exp_avg', 'exp_avg_sq', 'step'\]; this LocalSGD"),
        (
            dict(momentum=0.9),
            dict(momentum=0.0),
            r"\['momentum_buffer'\]; this LocalSGD \(optimizer='sgd'\) keeps \[\]",
        ),
    ],
)
def test_a_local_sgd_state_of_another_rule_is_refused_at_load_not_at_the_next_step(saved, loaded, message):
    """Before, an SGD state loaded into an AdamW LocalSGD failed with a KeyError at the next step, and momentum
    loaded into momentum 0 was silently dropped."""
    model = mlp()
    opt = prsgd.LocalSGD(model, lr=0.01, period=2, **saved)
    x, y = batches(1, 1)[0]
    F.cross_entropy(model(x[0]), y[0]).backward()
    opt.step()
    other = prsgd.LocalSGD(mlp(), lr=0.01, period=2, **loaded)
    with pytest.raises(prsgd.CheckpointError, match=message):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(optimizer="adam"), r"optimizer='adam' is not known; allowed: sgd, adamw"),
        (dict(optimizer="adamw", betas=(0.9, 1.0)), r"betas=\(0.9, 1.0\) is not allowed; each must be in \[0, 1\)"),
        (dict(optimizer="adamw", betas=(-0.1, 0.9)), r"each must be in \[0, 1\)"),
        (dict(optimizer="adamw", betas=(0.9,)), r"betas=\(0.9,\) is not allowed; it must be two numbers"),
        (dict(optimizer="adamw", eps=-1e-8), r"eps=-1e-08 is not allowed; it must be a finite number >= 0"),
        (dict(optimizer="adamw", weight_decay=-0.1), r"weight_decay=-0.1 is not allowed"),
        (dict(optimizer="adamw", momentum=0.9), r"momentum=0.9 is not a setting of optimizer='adamw'; it takes lr"),
        (dict(optimizer="adamw", nesterov=True), r"nesterov=True is not a setting of optimizer='adamw'"),
        (dict(betas=(0.9, 0.95)), r"betas=\(0.9, 0.95\) is not a setting of optimizer='sgd'; it takes lr, momentum"),
        (dict(eps=1e-6), r"eps=1e-06 is not a setting of optimizer='sgd'"),
        (
            dict(optimizer="adamw", sync_state=("momentum_buffer",)),
            r"sync_state names 'momentum_buffer', which optimizer='adamw' does not keep; it keeps exp_avg, exp_avg_sq",
        ),
        (
            dict(optimizer="adamw", sync="params_and_momentum", period=4, compression="int8"),
            r"compression='int8' with optimizer='adamw' and sync='params_and_momentum' is not supported",
        ),
        (
            dict(optimizer="adamw", sync="params_and_momentum", period=4, overlap=1),
            r"overlap=1 with optimizer='adamw' and sync='params_and_momentum' is not supported",
        ),
    ],
)
@pytest.mark.parametrize("engine", ["local_sgd", "simulator"])
def test_bad_local_rule_settings_get_one_clear_error_on_both_engines(engine, kwargs, message):
    kwargs = {"lr": 0.01, **kwargs}
    with pytest.raises(prsgd.InvalidArgument, match=message):
        if engine == "local_sgd":
            prsgd.LocalSGD(mlp(), **kwargs)
        else:
            prsgd.Simulator(mlp(), num_workers=2, **kwargs)


def test_torch_adamw_options_the_rule_does_not_have_are_refused_at_the_step():
    model = mlp()
    opt = prsgd.LocalSGD(model, optimizer="adamw", lr=0.01)
    opt.param_groups[0]["amsgrad"] = True  # what loading a torch AdamW(amsgrad=True) state would bring
    F.cross_entropy(model(batches(1, 1)[0][0][0]), batches(1, 1)[0][1][0]).backward()
    with pytest.raises(prsgd.InvalidArgument, match="amsgrad=True is not supported by optimizer='adamw'"):
        opt.step()


def test_the_simulator_refuses_an_optimizer_instance_naming_what_it_runs():
    model = mlp()
    with pytest.raises(prsgd.InvalidArgument, match=r"optimizer='sgd' or 'adamw'.*LocalSGD only"):
        prsgd.Simulator(model, num_workers=2, lr=0.01, optimizer=torch.optim.Adam(model.parameters()))


def test_a_wrapped_torch_optimizer_steps_as_itself_and_shares_its_param_groups_with_schedulers():
    model, theirs = mlp(), mlp()
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = prsgd.LocalSGD(model, optimizer=inner, period=4)
    ref = torch.optim.Adam(theirs.parameters(), lr=0.01)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    for x, y in batches(1, 6):
        for m, o, sched in ((model, opt, schedulers[0]), (theirs, ref, schedulers[1])):
            o.zero_grad()
            F.cross_entropy(m(x[0]), y[0]).backward()
            o.step()
            sched.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theirs.parameters(), strict=True))
    assert inner.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.01 * 0.5**3  # one group, both see it
    assert opt.state is inner.state and opt.steps_done == 6


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda m: prsgd.LocalSGD(m, optimizer=torch.optim.Adam(list(m.parameters())[:2])),
            r"do not cover the model: 2 of its 4 trainable parameters are missing and 0",
        ),
        (
            lambda m: prsgd.LocalSGD(
                m, optimizer=torch.optim.Adam([*m.parameters(), torch.nn.Parameter(torch.ones(2))])
            ),
            r"0 of its 4 trainable parameters are missing and 1 parameters are not the model's",
        ),
        (
            lambda m: prsgd.LocalSGD(m, 0.1, optimizer=torch.optim.Adam(m.parameters())),
            r"lr= was given with an optimizer instance \(Adam\); its settings are its own",
        ),
        (
            lambda m: prsgd.LocalSGD(m.parameters(), optimizer=torch.optim.Adam(m.parameters())),
            r"with an optimizer instance, LocalSGD takes the model \(an nn.Module\)",
        ),
        (
            lambda m: prsgd.LocalSGD(m, optimizer=torch.optim.Adam(m.parameters()), period=4, compression="int8"),
            r"compression='int8' with optimizer=Adam\(...\) and sync='params_and_momentum' is not supported",
        ),
        (
            lambda m: prsgd.LocalSGD(m, optimizer=prsgd.LocalSGD(mlp(), 0.1)),
            r"optimizer= is a LocalSGD; wrap the inner torch optimizer once",
        ),
        (lambda m: prsgd.LocalSGD(m), r"lr=None is not allowed"),
    ],
)
def test_a_wrapped_optimizer_that_cannot_work_is_refused_with_one_clear_error(build, message):
    with pytest.raises(prsgd.InvalidArgument, match=message):
        build(mlp())


def _equal_on_all_workers(by_param: dict) -> bool:
    return all(torch.equal(v, v[:1].expand_as(v)) for v in by_param.values())


def test_sync_state_averages_the_first_moment_only_and_counts_only_what_it_sends():
    model = mlp()
    sim = prsgd.Simulator(model, num_workers=4, optimizer="adamw", period=2, sync_state=("exp_avg",), **ADAMW)
    for x, y in batches(4, 4):
        sim.step(x, y, F.cross_entropy)
    state = sim.optimizer_state()
    assert _equal_on_all_workers(state["exp_avg"]) and not _equal_on_all_workers(state["exp_avg_sq"])
    n_params = sum(p.numel() for p in model.parameters())
    assert sim.comm.bytes == 2 * 4 * 2 * n_params  # two rounds of parameters and exp_avg, fp32
    assert not sim.in_consensus  # exp_avg_sq differs: not a state another number of workers could resume from


def test_state_period_averages_the_state_at_every_kth_round_only():
    model = mlp()
    sim = prsgd.Simulator(model, num_workers=4, optimizer="adamw", period=2, state_period=2, **ADAMW)
    n_params = sum(p.numel() for p in model.parameters())
    seen = []
    for x, y in batches(4, 4):
        sim.step(x, y, F.cross_entropy)
        seen.append((sim.comm.bytes, sim.in_consensus, _equal_on_all_workers(sim.optimizer_state()["exp_avg"])))
    one = 4 * n_params
    assert seen == [(0, False, False), (one, False, False), (one, False, False), (one + 3 * one, True, True)]


def test_the_state_policies_are_config_keys_and_flags():
    from prsgd.training.config import RunConfig

    config = RunConfig().with_overrides({"optimizer": "adamw", "sync_state": "exp_avg", "state_period": "3"})
    spec = config.algorithm.round_spec()
    assert spec.sync_state == ("exp_avg",) and spec.state_period == 3
    with pytest.raises(prsgd.InvalidArgument, match=r"state_period=2 changes how rounds average the optimizer state"):
        RunConfig().with_overrides({"sync": "params_only", "state_period": "2"})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--optimizer", "adam"], r"algorithm.optimizer='adam' is not known; allowed: sgd, adamw"),
        (["--optimizer", "adamw", "--betas", "0.9,1"], r"algorithm: betas=\(0.9, 1.0\) is not allowed"),
        (["--optimizer", "adamw", "--eps", "-1"], r"algorithm: eps=-1.0 is not allowed"),
        (["--optimizer", "adamw", "--weight-decay", "-1"], r"algorithm: weight_decay=-1.0 is not allowed"),
        (["--optimizer", "adamw", "--nesterov"], r"algorithm.nesterov=True is not a setting of optimizer='adamw'"),
        (["--betas", "0.8,0.9"], r"algorithm.betas=\(0.8, 0.9\) is not a setting of optimizer='sgd'"),
        (["--sync-state", "exp_avg"], r"algorithm.sync_state names 'exp_avg', which optimizer='sgd' does not keep"),
    ],
)
def test_bad_local_rule_flags_are_one_error_line_before_training(flags, message, tmp_path):
    from prsgd.training.train import main

    with pytest.raises(SystemExit, match=f"prsgd train: error: {message}"):
        main(["--epochs", "1", "--out", str(tmp_path / "run"), *flags])
    assert not list(tmp_path.iterdir())
