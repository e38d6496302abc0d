"""An independent reference for the tests: a plain Python loop over N models, each with its own
``torch.optim.SGD``, and averaging written out by hand. It shares no code with prsgd."""

from __future__ import annotations

import copy

import torch

PERIODIC = {"params_and_momentum", "params_clear_momentum", "params_only"}


def call(model, inputs, i):
    """model on worker i's inputs: a tensor, a tuple (positional) or a dict (keyword) of stacked tensors."""
    if isinstance(inputs, dict):
        return model(**{k: v[i] if torch.is_tensor(v) else v for k, v in inputs.items()})
    if isinstance(inputs, tuple):
        return model(*(v[i] if torch.is_tensor(v) else v for v in inputs))
    return model(inputs[i])


def round_tensors(model, opt, sync):
    """What an averaging round of ``sync`` communicates for one worker: its parameters, float buffers and, for
    Algorithm 1, momentum buffers (once they exist)."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    if sync == "params_and_momentum" and opt.state:
        tensors += [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    return tensors


class ReferenceWorkers:
    def __init__(
        self,
        model,
        num_workers,
        *,
        lr,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        period=1,
        sync="params_and_momentum",
        mixing_matrix=None,
    ):
        self.models = [copy.deepcopy(model) for _ in range(num_workers)]
        self.opts = [
            torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
            for m in self.models
        ]
        self.period, self.sync, self.t = period, sync, 0
        self.mixing_matrix = mixing_matrix  # a function step -> N x N numpy array, for the gossip rules

    def _mean_into(self, tensors):
        with torch.no_grad():
            mean = sum(t.clone() for t in tensors) / len(tensors)
            for t in tensors:
                t.copy_(mean)

    def _mix_into(self, tensors, w):
        with torch.no_grad():
            old = [t.clone() for t in tensors]
            for i, t in enumerate(tensors):
                t.copy_(sum(float(w[i][j]) * old[j] for j in range(len(old))))

    def step(self, inputs, targets, loss_fn):
        losses = []
        for i, (model, opt) in enumerate(zip(self.models, self.opts, strict=True)):
            model.train()
            opt.zero_grad()
            loss = loss_fn(call(model, inputs, i), targets[i])
            loss.backward()
            losses.append(loss.item())
        if self.sync == "gradients":  # and BatchNorm statistics, so that all workers stay identical
            for params in zip(*(m.parameters() for m in self.models), strict=True):
                self._mean_into([p.grad for p in params])
            for bufs in zip(*(m.buffers() for m in self.models), strict=True):
                if bufs[0].is_floating_point():
                    self._mean_into(list(bufs))
        for opt in self.opts:
            opt.step()
        self.t += 1
        if self.sync in PERIODIC and self.t % self.period == 0:
            for params in zip(*(m.parameters() for m in self.models), strict=True):
                self._mean_into(list(params))
                buffers = [opt.state[p].get("momentum_buffer") for opt, p in zip(self.opts, params, strict=True)]
                if buffers[0] is None:
                    continue
                if self.sync == "params_and_momentum":
                    self._mean_into(buffers)
                elif self.sync == "params_clear_momentum":
                    for b in buffers:
                        b.zero_()
            for bufs in zip(*(m.buffers() for m in self.models), strict=True):
                if bufs[0].is_floating_point():
                    self._mean_into(list(bufs))
        if self.sync in ("gossip", "gossip_params_only") and self.t % self.period == 0:
            w = self.mixing_matrix(self.t - 1)
            for params in zip(*(m.parameters() for m in self.models), strict=True):
                self._mix_into(list(params), w)
                if self.sync == "gossip" and self.opts[0].state[params[0]].get("momentum_buffer") is not None:
                    self._mix_into(
                        [opt.state[p]["momentum_buffer"] for opt, p in zip(self.opts, params, strict=True)], w
                    )
            for bufs in zip(*(m.buffers() for m in self.models), strict=True):
                if bufs[0].is_floating_point():
                    self._mix_into(list(bufs), w)
        return torch.tensor(losses)

    def params(self):
        names = [n for n, _ in self.models[0].named_parameters()]
        return {n: torch.stack([dict(m.named_parameters())[n].detach() for m in self.models]) for n in names}

    def momentum(self):
        out = {}
        for n, _ in self.models[0].named_parameters():
            out[n] = torch.stack(
                [
                    opt.state[dict(m.named_parameters())[n]]["momentum_buffer"]
                    for m, opt in zip(self.models, self.opts, strict=True)
                ]
            )
        return out

    def buffers(self):
        names = [n for n, _ in self.models[0].named_buffers()]
        return {n: torch.stack([dict(m.named_buffers())[n] for m in self.models]) for n in names}
