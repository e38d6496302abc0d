"""An independent reference for the tests: a plain Python loop over N models, each with its own
``torch.optim.SGD`` (or ``torch.optim.AdamW``), and averaging written out by hand. It shares no code with prsgd."""

from __future__ import annotations

import copy
import math

import torch

PERIODIC = {"params_and_momentum", "params_clear_momentum", "params_only"}


def call(model, inputs, i):
    """model on worker i's inputs: a tensor, a tuple (positional) or a dict (keyword) of stacked tensors."""
    if isinstance(inputs, dict):
        return model(**{k: v[i] if torch.is_tensor(v) else v for k, v in inputs.items()})
    if isinstance(inputs, tuple):
        return model(*(v[i] if torch.is_tensor(v) else v for v in inputs))
    return model(inputs[i])


STATE = {torch.optim.SGD: ("momentum_buffer",), torch.optim.AdamW: ("exp_avg", "exp_avg_sq")}
"""The tensors shaped like a parameter that each torch optimizer keeps, in the order they are laid out."""


def state_names(opt):
    return (
        STATE[type(opt)] if opt.state and opt.state[next(iter(opt.state))].get(STATE[type(opt)][0]) is not None else ()
    )


def round_tensors(model, opt, sync, names=None):
    """What an averaging round of ``sync`` communicates for one worker: its parameters, float buffers and, for
    Algorithm 1, the optimizer's state tensors (once they exist; ``names`` of them if given), name by name."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    if sync == "params_and_momentum":
        sent = [n for n in state_names(opt) if names is None or n in names]
        tensors += [opt.state[p][name] for name in sent for p in model.parameters()]
    return tensors


def make_optimizer(
    params, optimizer="sgd", *, lr, momentum=0.0, nesterov=False, weight_decay=0.0, betas=None, eps=1e-8
):
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas or (0.9, 0.999), eps=eps, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def clear_state(opt):
    """A fresh optimizer's state: every tensor it keeps, step counters included, at zero."""
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()


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
        optimizer="sgd",
        betas=None,
        eps=1e-8,
        state_period=None,
        sync_state=None,
    ):
        self.state_period, self.sync_state = state_period, sync_state
        self.models = [copy.deepcopy(model) for _ in range(num_workers)]
        hyper = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, betas=betas, eps=eps)
        self.opts = [make_optimizer(m.parameters(), optimizer, **hyper) for m in self.models]
        self.period, self.sync, self.t = period, sync, 0
        self.mixing_matrix = mixing_matrix  # a function step -> N x N numpy array, for the gossip rules

    def sent_state(self):
        """The state tensors this round averages (or mixes): those ``sync_state`` names (all by default), at every
        ``state_period``-th round only (rounds counted from 1)."""
        if self.state_period is not None and (self.t // self.period) % self.state_period:
            return ()
        return tuple(n for n in state_names(self.opts[0]) if self.sync_state is None or n in self.sync_state)

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
                for name in self.sent_state() if self.sync == "params_and_momentum" else ():
                    self._mean_into([opt.state[p][name] for opt, p in zip(self.opts, params, strict=True)])
            if self.sync == "params_clear_momentum":
                for opt in self.opts:
                    clear_state(opt)
            for bufs in zip(*(m.buffers() for m in self.models), strict=True):
                if bufs[0].is_floating_point():
                    self._mean_into(list(bufs))
        if self.sync in ("gossip", "gossip_params_only") and self.t % self.period == 0:
            w = self.mixing_matrix(self.t - 1)
            for params in zip(*(m.parameters() for m in self.models), strict=True):
                self._mix_into(list(params), w)
                for name in self.sent_state() if self.sync == "gossip" else ():
                    self._mix_into([opt.state[p][name] for opt, p in zip(self.opts, params, strict=True)], w)
            for bufs in zip(*(m.buffers() for m in self.models), strict=True):
                if bufs[0].is_floating_point():
                    self._mix_into(list(bufs), w)
        return torch.tensor(losses)

    def params(self):
        names = [n for n, _ in self.models[0].named_parameters()]
        return {n: torch.stack([dict(m.named_parameters())[n].detach() for m in self.models]) for n in names}

    def momentum(self):
        return self.state().get("momentum_buffer", {})

    def state(self):
        """Every worker's optimizer state: name -> parameter name -> (N, ...), and ``step`` -> parameter name ->
        (N,) (AdamW's counters)."""
        out = {}
        names = [*state_names(self.opts[0]), *(("step",) if isinstance(self.opts[0], torch.optim.AdamW) else ())]
        for name in names if self.opts[0].state else ():
            out[name] = {
                n: torch.stack(
                    [
                        opt.state[dict(m.named_parameters())[n]][name]
                        for m, opt in zip(self.models, self.opts, strict=True)
                    ]
                )
                for n, _ in self.models[0].named_parameters()
            }
        return out

    def buffers(self):
        names = [n for n, _ in self.models[0].named_buffers()]
        return {n: torch.stack([dict(m.named_buffers())[n] for m in self.models]) for n in names}


def low(codec, v):
    """What one 1-D fp32 vector ``v`` becomes when sent: rounded to bf16 / fp16 (clipped to its range); for int8 /
    int4 each group of 256 / 128 (zero-padded) scaled by its largest magnitude / 127 / 7 and rounded to the nearest
    integer; for topk:f, cut into the fewest chunks of at most 4096 values, all of ceil(len(v) / chunks) values but
    the last (zero-padded), in each the ceil(f x chunk) largest in magnitude kept, the others zero."""
    if codec == "bf16":
        return v.to(torch.bfloat16).float()
    if codec == "fp16":
        return v.clamp(-65504, 65504).to(torch.float16).float()
    if codec.startswith("topk:"):
        chunk = -(-v.numel() // -(-v.numel() // 4096))
        keep = math.ceil(float(codec[5:]) * chunk)
        out = []
        for c in padded(v, chunk).split(chunk):
            kept = torch.zeros_like(c)
            largest = torch.argsort(c.abs(), descending=True, stable=True)[:keep]
            kept[largest] = c[largest]
            out.append(kept)
        return torch.cat(out)[: v.numel()]
    group, top = {"int8": (256, 127), "int4": (128, 7)}[codec]
    out = []
    for c in padded(v, group).split(group):
        scale = c.abs().max() / top
        scale = scale if scale > 0 else torch.tensor(1.0)
        out.append((c / scale).round().clamp(-top, top) * scale)
    return torch.cat(out)[: v.numel()]


def padded(v, size):
    """``v`` zero-padded to a whole number of ``size``."""
    out = torch.zeros(-(-v.numel() // size) * size)
    out[: v.numel()] = v
    return out


class RoundReference(ReferenceWorkers):
    """Every round option at once, written out per worker: :class:`ReferenceWorkers` plus

    - ``inner_period`` / ``nodes``: after every ``inner_period``-th step that is not a global round, each node's
      consecutive workers take the plain mean of what the round communicates (momentum cleared for the rule that
      clears it);
    - ``fragments`` F: what a global round communicates is, for each worker, its parameters, float buffers and each
      sent state tensor name, each of these groups flattened into one vector; fragment f is the f-th of F
      contiguous near-equal ranges of each group's vector, joined. After every step t with t % (period / F) == 0,
      fragment f = (t % period) // (period / F) takes the round below (its own anchor, residuals, outer step), or
      with the gossip rules is mixed through W of step t - 1; without fragments (F = 1) a round takes everything;
    - ``compression``: a round lays each worker's fragment out as one vector, sends low(x_i - anchor + r_i), keeps
      what rounding left out in r_i, and all set x = anchor = anchor + low(mean + e), e keeping what rounding the
      mean left out (topk: every worker's selection summed exactly, no e);
    - ``overlap`` (a delay d > 0): a global round takes each worker's snapshot s_i, averages the snapshots (exactly or
      compressed as above) and, d steps later, every worker adds avg - s_i to what it holds then;
    - ``outer_lr`` / ``outer_momentum``: after a global round the parameters take a ``torch.optim.SGD`` step with
      Nesterov momentum from the previous round's parameters along (previous - average), DiLoCo's outer step (one
      optimizer per fragment, whose values outside the fragment are never read).
    """

    def __init__(
        self,
        model,
        num_workers,
        *,
        lr,
        momentum=0.0,
        period=1,
        sync="params_and_momentum",
        mixing_matrix=None,
        compression=None,
        overlap=0,
        inner_period=None,
        nodes=None,
        outer_lr=None,
        outer_momentum=None,
        fragments=None,
        **local,
    ):
        super().__init__(model, num_workers, lr=lr, momentum=momentum, period=period, sync=sync, **local)
        self.mixing_matrix = mixing_matrix
        self.n, self.compression, self.delay = num_workers, compression, int(overlap)
        self.inner_period, self.nodes = inner_period, nodes
        self.fragments = fragments or 1
        self.pending = None  # an overlapped round: (due step, fragment, every worker's snapshot, their average)
        kept = STATE[type(self.opts[0])] if momentum > 0 or isinstance(self.opts[0], torch.optim.AdamW) else ()
        x0 = self._groups(0)
        if sync == "params_and_momentum":  # the state starts at zero
            sent = [n for n in kept if self.sync_state is None or n in self.sync_state]
            x0 += [[torch.zeros_like(p) for p in self.models[0].parameters()] for _ in sent]
        self.anchor = [self._cut(x0, f) for f in range(self.fragments)]
        self.residual = [[torch.zeros_like(a) for _ in range(num_workers)] for a in self.anchor]
        group = {"int8": 256, "int4": 128}.get(compression, 1)
        self.mean_residual = [torch.zeros(-(-a.numel() // group) * group) for a in self.anchor]
        self.outer = None
        if outer_lr is not None or outer_momentum is not None:
            self.outer = [copy.deepcopy(self.models[0]) for _ in range(self.fragments)]  # what outer steps move
            outer_momentum = 0.0 if outer_momentum is None else outer_momentum
            self.outer_opt = [
                torch.optim.SGD(
                    outer.parameters(),
                    lr=1.0 if outer_lr is None else outer_lr,
                    momentum=outer_momentum,
                    nesterov=outer_momentum > 0,
                )
                for outer in self.outer
            ]

    def _groups(self, i):
        """Worker i's parameters, float buffers and each sent state tensor name, as lists of tensors."""
        model = self.models[i]
        params = list(model.parameters())
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        sync = "params_and_momentum" if self.sync == "gossip" else self.sync  # gossip mixes the state too
        state = round_tensors(model, self.opts[i], sync, self.sent_state())[len(params) + len(buffers) :]
        return [params, buffers, *(state[k : k + len(params)] for k in range(0, len(state), len(params)))]

    def _range(self, length, f):
        return length * f // self.fragments, length * (f + 1) // self.fragments

    def _cut(self, groups, f):
        parts = []
        for group in groups:
            flat = torch.cat([t.detach().reshape(-1) for t in group]) if group else torch.zeros(0)
            a, b = self._range(flat.numel(), f)
            parts.append(flat[a:b])
        return torch.cat(parts)

    def _vector(self, i, f=0):
        return self._cut(self._groups(i), f)

    def _set(self, i, vector, f=0):
        offset = 0
        for group in self._groups(i):
            if not group:
                continue
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            a, b = self._range(flat.numel(), f)
            flat[a:b] = vector[offset : offset + b - a]
            offset += b - a
            for t, piece in zip(group, flat.split([t.numel() for t in group]), strict=True):
                t.copy_(piece.view_as(t))

    def _clear_momentum(self, workers, f=None):
        if self.sync != "params_clear_momentum":
            return
        for i in workers:
            if f is None or self.fragments == 1:
                clear_state(self.opts[i])
            elif state_names(self.opts[i]):  # momentum SGD (AdamW's counters refuse fragments here): the range
                buffers = [self.opts[i].state[p]["momentum_buffer"] for p in self.models[i].parameters()]
                flat = torch.cat([b.reshape(-1) for b in buffers])
                a, b = self._range(flat.numel(), f)
                flat[a:b] = 0
                for t, piece in zip(buffers, flat.split([t.numel() for t in buffers]), strict=True):
                    t.copy_(piece.view_as(t))

    def _compressed_average(self, vectors, f):
        """Fragment f's new anchor: every worker's compressed change averaged, both roundings fed back."""
        n = self.anchor[f].numel()
        exact = torch.zeros_like(self.mean_residual[f])
        for i, v in enumerate(vectors):  # summed in worker order, in fp32
            delta = v - self.anchor[f] + self.residual[f][i]
            sent = low(self.compression, delta)
            self.residual[f][i] = delta - sent
            exact[:n] += sent
        if self.compression.startswith("topk:"):  # every worker's selection gathered: the mean is exact
            self.anchor[f] = self.anchor[f] + exact[:n] / self.n
            return self.anchor[f]
        exact = exact / self.n + self.mean_residual[f]
        mean = low(self.compression, exact)
        self.mean_residual[f] = exact - mean
        self.anchor[f] = self.anchor[f] + mean[:n]
        return self.anchor[f]

    def _average(self, vectors, f=0):
        if self.compression is not None:
            return self._compressed_average(vectors, f)
        return sum(v.clone() for v in vectors) / self.n

    def _outer_step(self, f):
        """Fragment f's parameters after the round take the outer step from its global model (its last round's)."""
        outer, opt = self.outer[f], self.outer_opt[f]
        averaged = list(self.models[0].parameters())
        opt.zero_grad()
        for g, p in zip(outer.parameters(), averaged, strict=True):
            g.grad = (g.detach() - p.detach()).clone()
        opt.step()
        stepped = self._cut([list(outer.parameters())], f)
        for i in range(self.n):
            self._set_params(i, stepped, f)
        if self.compression is not None:  # the values every worker holds now
            self.anchor[f] = self._vector(0, f)

    def _set_params(self, i, vector, f):
        params = list(self.models[i].parameters())
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        a, b = self._range(flat.numel(), f)
        flat[a:b] = vector
        for t, piece in zip(params, flat.split([t.numel() for t in params]), strict=True):
            t.copy_(piece.view_as(t))

    def _global_round(self, f):
        if self.delay:
            snapshots = [self._vector(i, f) for i in range(self.n)]
            self.pending = (self.t + self.delay, f, snapshots, self._average(snapshots, f))
            return
        average = self._average([self._vector(i, f) for i in range(self.n)], f)
        for i in range(self.n):
            self._set(i, average, f)
        if self.outer is not None:
            self._outer_step(f)
        self._clear_momentum(range(self.n), f)

    def _apply_pending(self):
        _, f, snapshots, average = self.pending
        for i in range(self.n):
            self._set(i, average + (self._vector(i, f) - snapshots[i]), f)
        self._clear_momentum(range(self.n), f)
        self.pending = None

    def _node_round(self):
        size = self.n // self.nodes
        for node in range(self.nodes):
            workers = range(node * size, (node + 1) * size)
            mean = sum(self._vector(i) for i in workers) / size
            for i in workers:
                self._set(i, mean)
            self._clear_momentum(workers)

    def _mixing_round(self, f):
        """Fragment f of every worker replaced by sum_j W_ij (fragment f of worker j), W of step t - 1."""
        w = self.mixing_matrix(self.t - 1)
        vectors = [self._vector(i, f) for i in range(self.n)]
        for i in range(self.n):
            self._set(i, sum(float(w[i][j]) * vectors[j] for j in range(self.n)), f)

    def step(self, inputs, targets, loss_fn):
        gossip_fragments = self.sync in ("gossip", "gossip_params_only") and self.fragments > 1
        if self.sync not in PERIODIC and not gossip_fragments:  # gradients, gossip, none: the plain loop's rounds
            return super().step(inputs, targets, loss_fn)
        saved, self.sync = self.sync, "none"
        losses = super().step(inputs, targets, loss_fn)  # local steps only
        self.sync = saved
        every = self.period // self.fragments
        with torch.no_grad():
            if self.pending is not None and self.pending[0] == self.t:
                self._apply_pending()
            if self.t % every == 0 and gossip_fragments:
                self._mixing_round((self.t % self.period) // every)
            elif self.t % every == 0:
                self._global_round((self.t % self.period) // every)
                if self.pending is not None and self.pending[0] == self.t:
                    self._apply_pending()
            elif self.inner_period is not None and self.t % self.inner_period == 0:
                self._node_round()
        return losses


def alive_set_reference(model, batch, num_groups, steps, *, lr, momentum, rounds, copies):
    """Algorithm 1 over the replica groups alive (issue 29): one plain ``torch.optim.SGD`` per group, each step on
    ``batch(group, t)``; after step t, if ``rounds`` has t, the parameters and momentum of the groups it names are
    averaged over them; then each (group, source) of ``copies[t]`` (a group that recovered from a live peer, or at
    t = 0 took x^0 from another) takes the source's parameters and momentum. Returns each group's parameters and
    momentum, flattened in that order."""
    models = [copy.deepcopy(model) for _ in range(num_groups)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in models]

    def tensors(g):
        params = list(models[g].parameters())
        return params + [opts[g].state[p]["momentum_buffer"] for p in params if p in opts[g].state]

    def copy_in(t):
        with torch.no_grad():
            for g, source in copies.get(t, ()):
                for mine, theirs in zip(tensors(g), tensors(source), strict=True):
                    mine.copy_(theirs)

    copy_in(0)
    for t in range(steps):
        for g in range(num_groups):
            x, y = batch(g, t)
            opts[g].zero_grad()
            torch.nn.functional.cross_entropy(models[g](x), y).backward()
            opts[g].step()
        members = rounds.get(t + 1)
        if members:
            with torch.no_grad():
                for same in zip(*(tensors(g) for g in members), strict=True):
                    mean = sum(v.clone() for v in same) / len(same)
                    for v in same:
                        v.copy_(mean)
        copy_in(t + 1)
    return [torch.cat([v.detach().reshape(-1) for v in tensors(g)]) for g in range(num_groups)]
