"""A hypothesis state machine that uses the optimizers as an adversarial user would (issue #10).

Random sequences of operations on one optimizer (each class, float32 and float64, every nonfinite
policy), each checked against the numpy references of tests/reference.py after it ran:

* steps with a gradient per parameter drawn from dense / scipy CSR / RowGrad / None (SparseAdam:
  sparse or None), non-canonical on purpose (duplicates, unsorted, explicit zeros, float64 data
  for a float32 parameter);
* hyper-parameter changes through ``param_groups`` (lr, weight_decay, a flag, momentum,
  sparse_mode lazy/exact);
* ``state_dict()`` round trips into a fresh optimizer (directly and through ``pickle``);
* ``add_param_group``;
* non-finite gradients under the optimizer's policy (propagate / skip / raise);
* deliberately bad steps (wrong shape, dtype or count, out-of-range row or column id, bad
  hyper-parameter): they must raise, and then every parameter, every raw state entry (pending
  exact-mode decay included), every hyper-parameter and ``skipped_steps`` is bit-identical to a
  snapshot taken before.

After every operation the parameters (and every state buffer not waiting on a pending exact-mode
decay; those are compared after ``state_dict()`` settles them) are compared with the reference:
relative tolerance 1e-12 (float64) / 1e-5 (float32) with the array's magnitude as absolute floor,
as tests/test_dense.py's ``assert_close``; NaN and infinities must sit at the same places.

Budget: the default profile runs in well under 30 s once numba's cache is warm;
``FASTADAPT_HOSTILE=long`` selects a much longer run.
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import fastadapt as fa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

LONG = os.environ.get("FASTADAPT_HOSTILE", "").lower() == "long"
MAX_EXAMPLES = 500 if LONG else 50
STEP_COUNT = 60 if LONG else 25

RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}
CLASSES = {"adagrad": fa.Adagrad, "rmsprop": fa.RMSprop, "adam": fa.Adam, "adamw": fa.AdamW,
           "sparse_adam": fa.SparseAdam}
#: hyper-parameter choices per optimizer (small sets: the point is the sequences, not the values)
HYPER = {
    "adagrad": dict(lr=[0.01, 0.1], lr_decay=[0.0, 0.1], weight_decay=[0.0, 0.1],
                    initial_accumulator_value=[0.0, 0.5], eps=[1e-10, 1e-3], maximize=[False, True]),
    "rmsprop": dict(lr=[0.01, 0.001], alpha=[0.99, 0.5], eps=[1e-8, 1e-3], weight_decay=[0.0, 0.1],
                    momentum=[0.0, 0.9], centered=[False, True], maximize=[False, True]),
    "adam": dict(lr=[0.01, 0.1], betas=[(0.9, 0.999), (0.5, 0.9)], eps=[1e-8, 1e-3],
                 weight_decay=[0.0, 0.1], amsgrad=[False, True], maximize=[False, True],
                 decoupled_weight_decay=[False, True]),
    "adamw": dict(lr=[0.01, 0.1], betas=[(0.9, 0.999), (0.5, 0.9)], eps=[1e-8, 1e-3],
                  weight_decay=[0.01, 0.1], amsgrad=[False, True], maximize=[False, True]),
    "sparse_adam": dict(lr=[0.01, 0.1], betas=[(0.9, 0.999), (0.5, 0.9)], eps=[1e-8, 1e-3],
                        maximize=[False, True]),
}
#: what a hyper-parameter change may set (key: values), per optimizer
CHANGES = {
    "adagrad": dict(lr=[0.05, 0.2], weight_decay=[0.0, 0.05], maximize=[False, True],
                    sparse_mode=["lazy", "exact"]),
    "rmsprop": dict(lr=[0.005, 0.02], weight_decay=[0.0, 0.05], momentum=[0.0, 0.5],
                    centered=[False, True], maximize=[False, True], sparse_mode=["lazy", "exact"]),
    "adam": dict(lr=[0.05, 0.2], weight_decay=[0.0, 0.05], amsgrad=[False, True], maximize=[False, True],
                 sparse_mode=["lazy", "exact"]),
    "adamw": dict(lr=[0.05, 0.2], weight_decay=[0.0, 0.05], amsgrad=[False, True], maximize=[False, True],
                  sparse_mode=["lazy", "exact"]),
    "sparse_adam": dict(lr=[0.05, 0.2], maximize=[False, True]),
}
#: bad hyper-parameter values (key: value) that a step must refuse
BAD_HYPER = {
    "adagrad": [("lr", -1.0), ("eps", -1.0), ("weight_decay", float("nan")), ("lr_decay", -0.5)],
    "rmsprop": [("lr", -1.0), ("alpha", -0.1), ("momentum", -1.0), ("eps", float("nan"))],
    "adam": [("lr", -1.0), ("betas", (1.5, 0.9)), ("betas", (0.9,)), ("eps", -1.0)],
    "adamw": [("lr", -1.0), ("betas", (0.9, -0.1)), ("weight_decay", -1.0)],
    "sparse_adam": [("lr", 0.0), ("eps", 0.0), ("betas", (0.9, 1.0))],
}
SHAPES = [(5, 3), (6,), (4, 2), (7,)]
MAX_PARAMS = 4


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def assert_close(actual, desired, rtol, what=""):
    """test_dense's ``assert_close`` (relative error <= rtol, the array's magnitude as absolute floor),
    extended to non-finite values: NaN and +-inf must sit at the same places in both."""
    assert actual.dtype == desired.dtype, what
    assert actual.shape == desired.shape, what
    fin_a, fin_d = np.isfinite(actual), np.isfinite(desired)
    np.testing.assert_array_equal(fin_a, fin_d, err_msg=f"{what}: non-finite at other places")
    np.testing.assert_array_equal(actual[~fin_a], desired[~fin_d], err_msg=f"{what}: non-finite values")
    a, d = actual[fin_a], desired[fin_d]
    scale = float(np.max(np.abs(d))) if d.size else 0.0
    np.testing.assert_allclose(a, d, rtol=rtol, atol=rtol * scale, err_msg=what)


def deep_copy(x):
    """A bit-exact, comparable copy of raw optimizer state (arrays, lists, dicts, scalars)."""
    if isinstance(x, np.ndarray):
        return ("a", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, dict):
        return {k: deep_copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [deep_copy(v) for v in x])
    return (type(x).__name__, repr(x))


def to_csr(shape2d, rows, cols, vals, dtype):
    """A CSR holding exactly these entries in this order (duplicates and column order kept)."""
    nr = shape2d[0]
    indptr = np.zeros(nr + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=nr), out=indptr[1:])
    g = sp.csr_matrix((np.asarray(vals, dtype), np.asarray(cols, np.int64), indptr), shape=shape2d)
    assert g.nnz == len(vals)
    return g


def reference_hyper(name, group):
    """The reference rule's keyword arguments from a param group."""
    keys = {
        "adagrad": ("lr", "lr_decay", "weight_decay", "eps", "maximize", "initial_accumulator_value"),
        "rmsprop": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize"),
        "adam": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"),
        "adamw": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
        "sparse_adam": ("lr", "betas", "eps", "maximize"),
    }[name]
    return {k: group[k] for k in keys}


# --------------------------------------------------------------------------------------------------
# the machine
# --------------------------------------------------------------------------------------------------


class OptimizerMachine(RuleBasedStateMachine):
    """One optimizer and its numpy reference, driven by random operations."""

    # ------------------------------------------------------------------ set-up

    @initialize(name=st.sampled_from(sorted(CLASSES)), dtype=st.sampled_from([np.float64, np.float32]),
                policy=st.sampled_from(["propagate", "skip", "raise"]), nparams=st.integers(1, 2),
                mode=st.sampled_from(["lazy", "exact"]), data=st.data())
    def setup(self, name, dtype, policy, nparams, mode, data):
        self.name, self.dtype, self.policy = name, np.dtype(dtype), policy
        self.rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        hyper = {k: data.draw(st.sampled_from(v), label=k) for k, v in HYPER[name].items()}
        if name != "sparse_adam":
            hyper["sparse_mode"] = mode
        self.cls = CLASSES[name]
        params = [self._new_param(SHAPES[j]) for j in range(nparams)]
        self.opt = self.cls(params, nonfinite=policy, **hyper)
        self.params = params
        self.ref_params = [p.copy() for p in params]
        self.ref_groups = [dict(self.opt.param_groups[0])]
        self.ref_groups[0].pop("params")
        self.group_of = [0] * nparams
        self.ref_states = [self._initial_ref_state(0, p) for p in params]
        self.skipped = 0

    def _new_param(self, shape):
        return np.array(self.rng.standard_normal(shape), dtype=self.dtype)

    def _initial_ref_state(self, gi, p):
        if self.name == "adagrad":
            return ref.init_state("adagrad", p, **self.ref_groups[gi])
        return {}

    # ------------------------------------------------------------------ gradients

    def _kinds(self, data, allow_none=True):
        choices = ["csr", "rowgrad"] if self.name == "sparse_adam" else ["dense", "csr", "rowgrad"]
        if allow_none:
            choices = choices + ["none"]
        return [data.draw(st.sampled_from(choices), label=f"kind {j}") for j in range(len(self.params))]

    def _gradient(self, p, kind):
        """(fastadapt gradient, reference (kind, payload)) for parameter ``p``."""
        rng = self.rng
        scale = 10.0 ** rng.uniform(-2, 1)
        if kind == "none":
            return None, ("none", None)
        if kind == "dense":
            g = np.array(rng.standard_normal(p.shape) * scale, dtype=p.dtype)
            return g, ("dense", g.copy())
        nrows = p.shape[0]
        ncols = p.shape[1] if p.ndim == 2 else 1
        if kind == "rowgrad":
            k = int(rng.integers(0, nrows + 3))
            rows = rng.integers(0, nrows, k)
            vdtype = p.dtype if rng.random() < 0.5 else np.float64      # float64 values: cast
            values = np.array(rng.standard_normal((k, ncols)) * scale, dtype=vdtype)
            if k >= 3 and rng.random() < 0.3:
                values[1] = 0.0                                           # explicit zeros count
            if p.ndim == 1:
                values = values.reshape(k)
                coo = (np.zeros(k, np.int64), rows.astype(np.int64), values)
            else:
                coo = ref.row_grad_to_coo(rows, values)
            rows_dtype = np.int32 if rng.random() < 0.5 else np.int64
            return fa.RowGrad(rows.astype(rows_dtype), values), ("sparse", tuple(np.copy(a) for a in coo))
        # csr: COO in CSR storage order, duplicates, unsorted columns, explicit zeros, maybe empty
        shape2d = (1, p.shape[0]) if p.ndim == 1 else tuple(p.shape)
        nnz = int(rng.integers(0, shape2d[0] * shape2d[1] + 1))
        lin = rng.integers(0, shape2d[0] * shape2d[1], nnz)
        vals = rng.standard_normal(nnz) * scale
        if nnz >= 3 and rng.random() < 0.3:
            vals[0] = 0.0
        rows, cols = lin // shape2d[1], lin % shape2d[1]
        order = np.argsort(rows, kind="stable")
        rows, cols, vals = rows[order], cols[order], vals[order]
        vdtype = p.dtype if rng.random() < 0.5 else np.float64
        vals = vals.astype(vdtype)
        return to_csr(shape2d, rows, cols, vals, vdtype), ("sparse", (rows, cols, vals.copy()))

    # ------------------------------------------------------------------ reference

    def _ref_step(self, refs):
        for j, (kind, payload) in enumerate(refs):
            if kind == "none":
                continue
            group = self.ref_groups[self.group_of[j]]
            h = reference_hyper(self.name, group)
            q, state = self.ref_params[j], self.ref_states[j]
            with np.errstate(all="ignore"):
                if kind == "dense":
                    ref.DENSE_RULES[self.name](q, payload, state, **h)
                elif self.name == "sparse_adam":
                    ref.sparse_adam(q, *payload, state, **h)
                elif group.get("sparse_mode", "lazy") == "lazy":
                    ref.lazy_step(ref.DENSE_RULES[self.name], q, None, *payload, state, **h)
                else:
                    ref.exact_step(ref.DENSE_RULES[self.name], q, *payload, state, **h)

    # ------------------------------------------------------------------ snapshots

    def _snapshot(self):
        return (deep_copy(self.params), deep_copy(self.opt.state),
                deep_copy([{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]),
                self.opt.skipped_steps, [id(p) for g in self.opt.param_groups for p in g["params"]])

    def _assert_unchanged(self, before, what):
        after = self._snapshot()
        names = ("parameters", "state", "hyper-parameters", "skipped_steps", "parameter identities")
        for name, a, b in zip(names, before, after):
            assert a == b, f"{what}: refused, but the {name} changed"

    # ------------------------------------------------------------------ rules

    @rule(data=st.data())
    def step(self, data):
        """Dense / CSR / RowGrad / None per parameter, all finite."""
        kinds = self._kinds(data)
        pairs = [self._gradient(p, k) for p, k in zip(self.params, kinds)]
        assert self.opt.step([g for g, _ in pairs]) is True
        self._ref_step([r for _, r in pairs])

    @rule(data=st.data())
    def step_all_dense(self, data):
        """Every parameter dense (the many-tensor path of two or more dense gradients)."""
        if self.name == "sparse_adam":
            return
        pairs = [self._gradient(p, "dense") for p in self.params]
        assert self.opt.step([g for g, _ in pairs]) is True
        self._ref_step([r for _, r in pairs])

    @rule(data=st.data())
    def nonfinite_step(self, data):
        """One gradient holds NaN or an infinity (or a float64 value that becomes inf in float32)."""
        kinds = self._kinds(data, allow_none=False)
        j = data.draw(st.integers(0, len(self.params) - 1), label="bad param")
        bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e300]), label="bad value")
        pairs = [self._gradient(p, k) for p, k in zip(self.params, kinds)]
        g, (kind, payload) = pairs[j]
        p_dtype = self.params[j].dtype
        stored = (g if kind == "dense" else g.values if isinstance(g, fa.RowGrad) else g.data).reshape(-1)
        if stored.size == 0:
            return
        if bad == 1e300 and not (stored.dtype == np.float64 and p_dtype == np.float32):
            bad = np.inf                              # 1e300 is only non-finite once cast to float32
        at = int(self.rng.integers(0, stored.size))
        stored[at] = bad
        if kind == "dense":
            payload[...] = g
        else:
            payload[2].reshape(-1)[at] = bad          # same order: COO of RowGrad and of CSR
        grads = [gr for gr, _ in pairs]
        before = self._snapshot()
        if self.policy == "raise":
            with pytest.raises(FloatingPointError):
                self.opt.step(grads)
            self._assert_unchanged(before, "nonfinite='raise'")
        elif self.policy == "skip":
            assert self.opt.step(grads) is False
            after = self._snapshot()
            assert after[3] == before[3] + 1
            self._assert_unchanged(before[:3] + (before[3] + 1,) + before[4:], "nonfinite='skip'")
            self.skipped += 1
        else:
            assert self.opt.step(grads) is True
            self._ref_step([r for _, r in pairs])

    @rule(data=st.data())
    def change_hyper(self, data):
        gi = data.draw(st.integers(0, len(self.ref_groups) - 1), label="group")
        key = data.draw(st.sampled_from(sorted(CHANGES[self.name])), label="key")
        value = data.draw(st.sampled_from(CHANGES[self.name][key]), label="value")
        if self.name == "adamw" and key == "weight_decay" and value == 0.0:
            value = 0.02
        self.opt.param_groups[gi][key] = value
        self.ref_groups[gi][key] = value

    @rule(data=st.data())
    def bad_hyper(self, data):
        """A bad hyper-parameter set through param_groups: the step raises and changes nothing."""
        gi = data.draw(st.integers(0, len(self.ref_groups) - 1), label="group")
        key, value = data.draw(st.sampled_from(BAD_HYPER[self.name]), label="bad hyper")
        kinds = self._kinds(data)
        grads = [self._gradient(p, k)[0] for p, k in zip(self.params, kinds)]
        old = self.opt.param_groups[gi][key]
        self.opt.param_groups[gi][key] = value
        before = self._snapshot()
        with pytest.raises((ValueError, TypeError)):
            self.opt.step(grads)
        self._assert_unchanged(before, f"bad {key}={value!r}")
        self.opt.param_groups[gi][key] = old

    @rule(data=st.data())
    def bad_gradient(self, data):
        """One gradient is malformed (the others valid): the step raises and changes nothing."""
        kinds = self._kinds(data)
        grads = [self._gradient(p, k)[0] for p, k in zip(self.params, kinds)]
        j = data.draw(st.integers(0, len(self.params) - 1), label="bad param")
        p = self.params[j]
        nrows = p.shape[0]
        ncols = p.shape[1] if p.ndim == 2 else 1
        how = data.draw(st.sampled_from(["shape", "dtype", "row id", "negative row id", "column",
                                         "csr shape", "count", "type"]), label="how")
        expected = (ValueError, TypeError, IndexError)
        if how == "shape":
            grads[j] = np.ones((nrows + 1,) + p.shape[1:], p.dtype)
        elif how == "dtype":
            grads[j] = np.ones(p.shape, np.float32 if p.dtype == np.float64 else np.float64)
        elif how in ("row id", "negative row id"):
            bad = nrows if how == "row id" else -1
            vals = np.ones((2, ncols), p.dtype) if p.ndim == 2 else np.ones(2, p.dtype)
            grads[j] = fa.RowGrad([0, bad], vals)
        elif how == "column":                   # hand-built: scipy checks no bounds then
            shape2d = (1, nrows) if p.ndim == 1 else tuple(p.shape)
            g = sp.csr_matrix(shape2d, dtype=p.dtype)
            bad_col = shape2d[1] if self.rng.random() < 0.5 else -1
            g.data = np.ones(2, p.dtype)
            g.indices = np.array([0, bad_col], np.int32)
            g.indptr = np.r_[np.zeros(1, np.int32), np.full(shape2d[0], 2, np.int32)]
            grads[j] = g
        elif how == "csr shape":
            shape2d = (1, nrows) if p.ndim == 1 else tuple(p.shape)
            grads[j] = sp.csr_matrix((shape2d[0] + 1, shape2d[1]), dtype=p.dtype)
        elif how == "count":
            grads = grads + [None]
        else:
            grads[j] = [[0.0] * ncols] * nrows
        before = self._snapshot()
        with pytest.raises(expected):
            self.opt.step(grads)
        self._assert_unchanged(before, f"bad gradient ({how})")

    @rule(via_pickle=st.booleans())
    def state_dict_round_trip(self, via_pickle):
        """state_dict() into a fresh optimizer over copies of the parameters (also via pickle); the
        run continues with the new one.  The settled state is compared with the reference here."""
        sd = self.opt.state_dict()
        self._check_state_dict(sd)
        if via_pickle:
            sd = pickle.loads(pickle.dumps(sd))
        groups, params, j = [], [], 0
        for g in self.opt.param_groups:
            ps = [p.copy() for p in g["params"]]
            params += ps
            groups.append(dict({k: v for k, v in g.items() if k != "params"}, params=ps))
        fresh = self.cls(groups, nonfinite=self.policy)
        fresh.skipped_steps = self.opt.skipped_steps
        fresh.load_state_dict(sd)
        self.opt, self.params = fresh, params
        self._check_state_dict(self.opt.state_dict())

    @precondition(lambda self: len(self.params) < MAX_PARAMS)
    @rule(data=st.data())
    def add_group(self, data):
        shape = SHAPES[len(self.params)]
        p = self._new_param(shape)
        extra = {}
        if data.draw(st.booleans(), label="own lr"):
            extra["lr"] = data.draw(st.sampled_from(CHANGES[self.name]["lr"]), label="lr")
        self.opt.add_param_group(dict(extra, params=[p]))
        group = dict(self.opt.param_groups[-1])
        group.pop("params")
        assert {k: group[k] for k in extra} == extra
        self.ref_groups.append(group)
        self.params.append(p)
        self.ref_params.append(p.copy())
        self.group_of.append(len(self.ref_groups) - 1)
        self.ref_states.append(self._initial_ref_state(len(self.ref_groups) - 1, p))

    # ------------------------------------------------------------------ checks

    def _check_state_dict(self, sd):
        rtol = RTOL[self.dtype]
        for j, st_ref in enumerate(self.ref_states):
            have = sd["state"].get(j, {})
            assert have.get("step", 0) == st_ref.get("step", 0), (j, "step")
            names = {k for k, v in st_ref.items() if isinstance(v, np.ndarray)}
            assert names == {k for k in have if k != "step"}, (j, sorted(have), sorted(names))
            for k in names:
                assert_close(have[k], st_ref[k], rtol, f"state_dict: parameter {j} {k}")
        for g_have, g_ref in zip(sd["param_groups"], self.ref_groups):
            for k, v in g_ref.items():
                assert g_have[k] == v, k

    @invariant()
    def matches_reference(self):
        if not hasattr(self, "opt"):
            return
        rtol = RTOL[self.dtype]
        assert self.opt.skipped_steps == self.skipped
        live = [p for g in self.opt.param_groups for p in g["params"]]
        assert len(live) == len(self.params) and all(a is b for a, b in zip(live, self.params))
        for j, (p, q) in enumerate(zip(self.params, self.ref_params)):
            assert p.dtype == self.dtype
            assert_close(p, q, rtol, f"parameter {j}")
            state, st_ref = self.opt.state[j], self.ref_states[j]
            assert state.get("step", 0) == st_ref.get("step", 0), f"parameter {j} step"
            names = {k for k, v in st_ref.items() if isinstance(v, np.ndarray)}
            assert names == {k for k in state if k != "step" and not k.startswith("_")}, j
            if "_decay" in state:      # exact-mode decay pending: compared once state_dict() settles it
                continue
            for k in names:
                assert_close(state[k], st_ref[k], rtol, f"parameter {j} {k}")


OptimizerMachine.TestCase.settings = settings(
    max_examples=MAX_EXAMPLES, stateful_step_count=STEP_COUNT, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    derandomize=not LONG, print_blob=True,
)
TestOptimizerMachine = OptimizerMachine.TestCase
