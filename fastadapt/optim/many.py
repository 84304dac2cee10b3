"""Dense CPU steps of many parameters in one kernel call.

:meth:`Optimizer.step <fastadapt.Optimizer.step>` hands its dense CPU gradients
here (phase 3, after everything was validated).  Parameters that share a param group,
a step count and a dtype share the rule's per-step scalars, so they are updated by one
call of :func:`fastadapt.backends.cpu.dense_step_many` over a table of addresses, instead of one
kernel launch each: a launch costs ~5 us of dispatch, which for 200 small tensors is
more than torch's fused multi-tensor kernels spend in total.

The table of a set of parameters is built once and kept (per optimizer); a step only
checks that the parameter and its state buffers are still the same arrays and writes
the gradients' addresses.  The math is the rules' (:mod:`fastadapt.rules`), element by
element, so the result is bit-identical to one launch per parameter.  Parameters whose carried
scalars differ (NAdam's ``mu_product`` after a state_dict load, say) go into separate batches.
"""

import numpy as np

from ..backends.cpu import address, compiled, dense_step_many, plan_segments, work_unit

__all__ = ["apply_dense"]

_PROTOS = {}


def _proto(dtype):
    """A persistent 1-element array of ``dtype``: the loops' type, and the unused slots."""
    a = _PROTOS.get(dtype)
    if a is None:
        a = _PROTOS[dtype] = np.zeros(1, dtype)
    return a


class _Plan:
    """The kernel table of one list of parameters (one group, one dtype)."""

    __slots__ = ("table", "segments", "units", "total", "objects")

    def __init__(self, items, names, proto):
        rows, lengths, objects = [], [], []
        for _, _, p, state, _ in items:
            bufs = [state[name] if name is not None else proto for name in names]
            flat = [b.reshape(-1) for b in bufs]
            rows.append([address(p.reshape(-1)), 0] + [address(b) for b in flat]
                        + [p.size] + [b.size for b in flat])
            lengths.append(p.size)
            objects.append((p, *bufs))
        self.table = np.array(rows, dtype=np.int64).reshape(-1, 9)
        lengths = np.array(lengths, dtype=np.int64)
        self.total = int(lengths.sum())
        self.segments, self.units = plan_segments(lengths, work_unit(self.total))
        self.objects = objects          # keeps the arrays alive while the table points at them

    def check(self, items, names, step):
        """While every parameter and state buffer is still the array the table points at:
        set each item's step count to ``step`` and return the gradients' addresses.  Else
        None (the caller rebuilds the table).  One pass: it runs for every parameter."""
        addresses = []
        for item, objs in zip(items, self.objects):
            state = item[3]
            if objs[0] is not item[2]:
                return None
            for name, b in zip(names, objs[1:]):
                if name is not None and state.get(name) is not b:
                    return None
            state["step"] = step
            g = item[4]
            addresses.append(g.address or address(g.g))
        return addresses


def _batches(opt, items, carried):
    """[(step count, dtype, items)]: the items grouped by param group, step count, dtype and
    carried scalars (``carried``: their names, e.g. NAdam's ``mu_product``)."""
    batches = {}
    for item in items:
        state = item[3]
        step = state.get("step")
        if step is None:                     # first step: state created here (or below)
            opt._ensure_state(item[1], item[2], state)
            step = state["step"]
        key = (id(item[1]), step, item[2].dtype, tuple(state[n] for n in carried))
        batch = batches.get(key)
        if batch is None:
            batches[key] = batch = []
        batch.append(item)
    return [(step, dtype, batch) for (_, step, dtype, _), batch in batches.items()]


def apply_dense(opt, items):
    """Phase 3 for dense CPU gradients: advance the step counts and update the parameters.

    Parameters
    ----------
    opt : Optimizer
    items : list of (j, group, p, state, DenseGrad)
        Prepared work of :meth:`Optimizer.step` whose gradients are dense numpy arrays;
        nothing in it has been applied yet.
    """
    first = items[0]
    group, dtype, step = first[1], first[2].dtype, first[3].get("step")
    carried = tuple(name for name, _ in opt.algorithm.carry)
    uniform = step is not None               # the usual case: one group, one step count, one dtype
    if uniform:
        values = tuple(first[3][n] for n in carried)
        for item in items:
            if item[1] is not group or item[2].dtype is not dtype or item[3].get("step") != step \
                    or (carried and tuple(item[3][n] for n in carried) != values):
                uniform = False
                break
    batches = [(step, dtype, items)] if uniform else _batches(opt, items, carried)
    plans = opt.__dict__.setdefault("_many_plans", {})
    if len(plans) > 16:             # the set of parameters with gradients keeps changing
        plans.clear()
    for step, dtype, batch in batches:
        group = batch[0][1]
        step += 1
        if len(batch) == 1:
            _, _, p, state, g = batch[0]
            opt._ensure_state(group, p, state)
            state["step"] = step
            opt._advance_carry(group, state)
            g.apply(opt, group, p, state)
            continue
        used = opt._buffer_names(group)
        names = tuple(n if (n is not None and n in used) else None for n in opt.slots)
        proto = _proto(dtype)
        key = (tuple(item[0] for item in batch), names, dtype)
        plan = plans.get(key)
        addresses = None if plan is None else plan.check(batch, names, step)
        if addresses is None:
            for _, _, p, state, _ in batch:  # buffers an option switched on since the last step
                opt._ensure_state(group, p, state)
            plan = plans[key] = _Plan(batch, names, proto)
            addresses = plan.check(batch, names, step)
        plan.table[:, 1] = addresses
        if carried:                          # the same carried values in the batch: advanced once
            opt._advance_carry(group, batch[0][3])
            advanced = {n: batch[0][3][n] for n in carried}
            for item in batch[1:]:
                item[3].update(advanced)
        k = opt._scalars(group, batch[0][3], dtype)
        dense_step_many(compiled(opt.rule), proto, plan.table, plan.segments, plan.units, k, plan.total)
