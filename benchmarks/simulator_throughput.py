"""Train-step throughput of prsgd.Simulator against its limit and a hand-written loop (issue 6).

    .venv/bin/python benchmarks/simulator_throughput.py [--models mlp,resnet20] [--workers 4,8,16] [--repeats 5]

For each model and N, in one run, samples per second of one training step (forward, backward, momentum update;
Algorithm 1 with period 8, so most steps do not sync) for:
  limit   ONE model stepping on a batch of N*b (same arithmetic; torch.optim.SGD);
  loop    what a user writes without prsgd: N model copies, N torch.optim.SGD, a Python loop;
  vmap    prsgd.Simulator(compute="vmap");  loop  prsgd.Simulator(compute="loop"), workers in threads (default)
          and with threads=1 (one worker after another, all intra-op threads each);
  auto    the simulator's default choice;
  vmap compiled  prsgd.Simulator(compute="vmap", compile=True) (not ResNet-20; compiled during the warm-up steps).
Models: the digits MLP (64-64-10, b = 64, random inputs), the CIFAR ResNet-20 (BatchNorm, b = 32, random 32x32),
and two sequence classifiers on random tokens (vocabulary 100, length 16, b = 32): a tiny transformer (embedding 32,
one encoder layer with 2 heads and dropout 0.1, mean pooling) and an LSTM (embedding 32, hidden 64, last state).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import prsgd
from prsgd.models import build_model

SHAPES = {"mlp": ((64,), 64), "resnet20": ((3, 32, 32), 32), "transformer": ((16,), 32), "lstm": ((16,), 32)}
VOCAB = 100


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 32, heads: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.enc = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.1, batch_first=True)
        self.out = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.out(self.enc(self.emb(tokens)).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.rnn = nn.LSTM(d, hidden, batch_first=True)
        self.out = nn.Linear(hidden, classes)

    def forward(self, tokens):
        return self.out(self.rnn(self.emb(tokens))[0][:, -1])


def model_for(name: str):
    torch.manual_seed(0)
    if name == "transformer":
        return TinyTransformer()
    if name == "lstm":
        return LSTMClassifier()
    shape, _ = SHAPES[name]
    return build_model(name, shape, 10)


def inputs_for(name: str, n: int) -> torch.Tensor:
    shape, b = SHAPES[name]
    return torch.randint(0, VOCAB, (n, b, *shape)) if name in ("transformer", "lstm") else torch.randn(n, b, *shape)


def interleaved_seconds(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds per step of each function, timed in interleaved rounds (A B C A B C ...) after two warm-up
    steps each, so that drifts of this shared machine's speed hit every method alike."""
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(name: str, n: int, repeats: int) -> tuple[dict[str, float], str]:
    """Samples per second of each method, and the compute mode "auto" picked."""
    shape, b = SHAPES[name]
    x = inputs_for(name, n)
    y = torch.randint(0, 10, (n, b))
    kw = dict(lr=0.01, momentum=0.9)

    model = model_for(name)
    opt = torch.optim.SGD(model.parameters(), **kw)
    xs, ys = x.reshape(n * b, *shape), y.reshape(n * b)

    def limit():
        opt.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        opt.step()

    models = [copy.deepcopy(model_for(name)) for _ in range(n)]
    opts = [torch.optim.SGD(m.parameters(), **kw) for m in models]

    def loop():
        for i, (m, o) in enumerate(zip(models, opts, strict=True)):
            o.zero_grad()
            F.cross_entropy(m(x[i]), y[i]).backward()
            o.step()

    steps = {"limit": limit, "loop": loop}
    variants = {"vmap": ("vmap", None, False), "loop 1 thread": ("loop", 1, False), "loop": ("loop", None, False)}
    if name != "resnet20":
        variants["vmap compiled"] = ("vmap", None, True)  # compiled in the warm-up steps (seconds)
    for label, (compute, threads, compile_) in variants.items():
        sim = prsgd.Simulator(
            model_for(name), num_workers=n, period=8, compute=compute, threads=threads, compile=compile_, **kw
        )
        steps[f"prsgd {label}"] = lambda s=sim: s.step(x, y, F.cross_entropy)
    auto = prsgd.Simulator(model_for(name), num_workers=n, lr=0.01, compute="auto").compute
    seconds = interleaved_seconds(steps, repeats)
    return {k: n * b / v for k, v in seconds.items()}, auto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,resnet20")
    parser.add_argument("--workers", default="4,8,16,64")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print(
        "| model | N | b | limit (samples/s) | loop | prsgd vmap | prsgd loop 1 thread | prsgd loop | prsgd auto "
        "| auto/limit | auto/loop | prsgd vmap compiled | compiled/limit | compiled/loop |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for n in map(int, args.workers.split(",")):
            if name == "resnet20" and n > 16:
                continue  # minutes per step on 2 cores; the targets stop at N = 16 for ResNet-20
            r, mode = measure(name, n, args.repeats)
            auto = r[f"prsgd {mode}"]
            c = r.get("prsgd vmap compiled")
            compiled = f"{c:.0f} | {c / r['limit']:.2f}x | {c / r['loop']:.2f}x" if c else "- | - | -"
            print(
                f"| {name} | {n} | {SHAPES[name][1]} | {r['limit']:.0f} | {r['loop']:.0f} | {r['prsgd vmap']:.0f} "
                f"| {r['prsgd loop 1 thread']:.0f} | {r['prsgd loop']:.0f} | {auto:.0f} ({mode}) "
                f"| {auto / r['limit']:.2f}x | {auto / r['loop']:.2f}x | {compiled} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
