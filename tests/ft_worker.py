"""One replica group of a fault-tolerant run for tests/test_fault_tolerance.py (or, with ``--plain``, one rank of the
same run on plain LocalSGD over gloo): a small MLP trained on batches drawn from (group, step), so that a group that
recovers at a peer's step draws what the group would have drawn. ``--kill WHERE:STEP`` SIGKILLs this process at that
point once per run (a marker file in ``--markers`` says it happened); the test restarts it."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from helpers import leave_after_success, mlp

import prsgd
from prsgd.engines import fault_tolerance, replica_groups


def batch(group: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * group + step)
    return torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--group", type=int, required=True)
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plain", type=int, default=None, help="plain gloo run: the rendezvous port")
    parser.add_argument("--kill", action="append", default=[], help="WHERE:STEP, once per run")
    parser.add_argument("--markers", default=None)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--synchronize", action="store_true", help="end with opt.synchronize()")
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep this long each step (a slower model)")
    parser.add_argument("--round", default="{}", help="RoundSpec keywords, as JSON")
    parser.add_argument("--events", default=None, help="append each committed round and recovery here (JSON lines)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kills = dict(k.split(":") for k in args.kill)

    def maybe_die(where: str, step: int | None = None) -> None:
        if where not in kills or (kills[where] != "any" and int(kills[where]) != step):
            return
        try:  # once per run, whichever process gets there first
            os.close(os.open(os.path.join(args.markers, f"{where}-{kills[where]}"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    model = mlp()
    options = dict(lr=0.05, momentum=0.9, period=4) | json.loads(args.round)
    if options.get("optimizer") == "adamw":
        options.pop("momentum")
    if args.plain is not None:
        from prsgd.engines.distributed import init_process_group

        init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{args.plain}",
            rank=args.group,
            world_size=args.groups,
            timeout=datetime.timedelta(seconds=60),
        )
        opt = prsgd.LocalSGD(model, **options)
    else:
        groups = replica_groups.ReplicaGroups
        offer, recover, reduce = groups._offer, groups._recover, groups.all_reduce_sum

        def dying_offer(self):
            maybe_die("offer")
            return offer(self)

        def dying_recover(self, offered):
            maybe_die("recover")
            return recover(self, offered)

        def dying_reduce(self, tensor):
            maybe_die("before_collective", opt.steps_done)
            done = reduce(self, tensor)
            maybe_die("after_collective", opt.steps_done)
            return done

        groups._offer, groups._recover, groups.all_reduce_sum = dying_offer, dying_recover, dying_reduce
        membership = fault_tolerance.Membership
        note_round, note_recovery = membership.round, membership.recovered

        def event(**fields) -> None:  # kept across kills: a later incarnation's file would lose them
            if args.events:
                with open(args.events, "a") as f:
                    f.write(json.dumps(fields) + "\n")

        def noted_round(self, step):
            note_round(self, step)
            event(kind="round", step=step, members=list(self.members))

        def noted_recovery(self, step, source):
            note_recovery(self, step, source)
            event(kind="copy", step=step, source=source)

        membership.round, membership.recovered = noted_round, noted_recovery
        settings = prsgd.FaultTolerance(replica_group=args.group, groups=args.groups, timeout=args.timeout)
        opt = prsgd.LocalSGD(model, fault_tolerant=settings, **options)
    while opt.steps_done < args.steps:
        maybe_die("before_step", opt.steps_done + 1)
        x, y = batch(args.group, opt.steps_done)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        time.sleep(args.step_seconds)
    if args.synchronize:
        opt.synchronize()
    result = {"values": opt.worker_state().clone(), "steps": opt.steps_done, "rounds": opt.comm.rounds}
    result["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    result["comm"] = (opt.comm.rounds, opt.comm.bytes, opt.comm.peak_step_bytes)
    if opt.fault_tolerance is not None:
        m = opt.fault_tolerance.membership
        result.update(history=m.history, record=m.record())
        opt.fault_tolerance.close()
    torch.save(result, f"{args.out}.tmp")
    os.replace(f"{args.out}.tmp", args.out)
    if args.plain is not None:  # before exit: gloo's threads must not outlive the interpreter
        torch.distributed.destroy_process_group()
    # torchft's manager is shut down without waiting (a dead peer must not hold this group); its threads and gloo's
    # then meet the interpreter's teardown, which aborted 3 successful workers in 2 loaded CI runs
    leave_after_success()


if __name__ == "__main__":
    main()
