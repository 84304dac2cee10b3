"""fastadapt.torch: fastadapt's optimizers as torch.optim.Optimizer subclasses, against torch.optim 2.13.

Parity over every case with a torch counterpart (``case.torch``) and its small grid, dense gradients and
(SparseAdam, Adagrad) sparse ones from nn.Embedding(sparse=True); checkpoints interchangeable both ways;
lr_scheduler, closure, zero_grad, a small model with an EmbeddingBag; refused inputs change nothing;
``import fastadapt`` does not import torch.  Skipped when torch is not importable.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import DTYPES, DTYPE_IDS, RTOL, assert_close
import reference as ref
from optimizers import OPTIMIZERS, config_id

torch = pytest.importorskip("torch")
import fastadapt.torch as fat  # noqa: E402

N_STEPS = 30
TORCH_CASES = [c for c in OPTIMIZERS if c.torch]
DENSE_GRID = [(c, o) for c in TORCH_CASES if c.dense for o in c.small_grid() if c.valid(o)]
SPARSE_GRID = [(c, o) for c in TORCH_CASES if c.name in ("SparseAdam", "Adagrad") for o in c.small_grid()
               if c.valid(o) and not o.get("weight_decay")]        # torch: no weight decay with sparse grads
TDTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def _pair(shapes, dtype, seed=0):
    """Two lists of leaf tensors with the same values."""
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=g, dtype=TDTYPE[dtype]) for s in shapes]
    return ([torch.nn.Parameter(b.clone()) for b in base], [torch.nn.Parameter(b.clone()) for b in base])


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _assert_same(ps, tps, dtype, what=""):
    for j, (p, t) in enumerate(zip(ps, tps)):
        assert_close(p.detach().numpy(), t.detach().numpy(), RTOL[np.dtype(dtype)], f"{what} param {j}")


def _assert_same_state(sd, tsd, dtype):
    assert set(sd["state"]) == set(tsd["state"])
    for j, st in tsd["state"].items():
        mine = sd["state"][j]
        assert set(mine) == set(st), (mine.keys(), st.keys())
        for k, v in st.items():
            if k == "step":
                assert type(mine[k]) is type(v) and float(mine[k]) == float(v)
                if isinstance(v, torch.Tensor):
                    assert mine[k].dtype == v.dtype and mine[k].shape == v.shape
            else:
                assert_close(mine[k].numpy(), v.to(mine[k].dtype).numpy(), RTOL[np.dtype(dtype)], k)
    assert sd["param_groups"] == tsd["param_groups"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,options", DENSE_GRID, ids=map(config_id, DENSE_GRID))
def test_dense_steps_match_torch_optim(case, options, dtype):
    shapes = [(7, 5), (3,)]
    ps, tps = _pair(shapes, dtype)
    with ref.torch_default_dtype(dtype):
        opt = getattr(fat, case.name)(ps, **options)
        topt = getattr(torch.optim, case.name)(tps, **options)
        gen = torch.Generator().manual_seed(1)
        for i in range(N_STEPS):
            grads = [torch.randn(s, generator=gen, dtype=TDTYPE[dtype]) + 0.5 for s in shapes]
            if i % 7 == 3:
                grads[1] = None
            _set_grads(ps, grads)
            _set_grads(tps, grads)
            opt.step()
            topt.step()
        _assert_same(ps, tps, dtype)
        _assert_same_state(opt.state_dict(), topt.state_dict(), dtype)


def _embedding_pair(dtype, seed=0):
    torch.manual_seed(seed)
    a = torch.nn.Embedding(40, 6, sparse=True).to(TDTYPE[dtype])
    b = torch.nn.Embedding(40, 6, sparse=True).to(TDTYPE[dtype])
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,options", SPARSE_GRID, ids=map(config_id, SPARSE_GRID))
def test_sparse_embedding_steps_match_torch_optim(case, options, dtype):
    a, b = _embedding_pair(dtype)
    with ref.torch_default_dtype(dtype):
        opt = getattr(fat, case.name)(a.parameters(), **options)
        topt = getattr(torch.optim, case.name)(b.parameters(), **options)
        gen = torch.Generator().manual_seed(2)
        for i in range(N_STEPS):
            ids = torch.randint(0, 40, (12,), generator=gen)          # with repeats: duplicates summed
            target = torch.randn(12, 6, generator=gen, dtype=TDTYPE[dtype])
            for m, o in ((a, opt), (b, topt)):
                o.zero_grad()
                ((m(ids) - target) ** 2).sum().backward()
                assert m.weight.grad.is_sparse
                o.step()
        _assert_same([a.weight], [b.weight], dtype)
        _assert_same_state(opt.state_dict(), topt.state_dict(), dtype)


def test_uncoalesced_and_elementwise_sparse_grads():
    p = torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))
    q = torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))
    opt, topt = fat.Adagrad([p], lr=0.1), torch.optim.Adagrad([q], lr=0.1)
    rows = torch.tensor([[1, 3, 1]])
    vals = torch.ones(3, 3, dtype=torch.float64)
    p.grad = torch.sparse_coo_tensor(rows, vals, (5, 3))
    assert not p.grad.is_coalesced()
    q.grad = p.grad.clone()
    opt.step()
    topt.step()
    idx = torch.tensor([[0, 0, 4], [1, 1, 2]])                        # element-wise COO (sparse_dim 2)
    p.grad = torch.sparse_coo_tensor(idx, torch.ones(3, dtype=torch.float64), (5, 3))
    q.grad = p.grad.clone()
    opt.step()
    topt.step()
    assert_close(p.detach().numpy(), q.detach().numpy(), 1e-12)


@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_checkpoints_interchange_with_torch_optim(case):
    """fastadapt.torch -> torch.optim and torch.optim -> fastadapt.torch mid-run; both continue as an
    uninterrupted torch.optim run."""
    dtype = np.float32
    options = dict(case.rich)
    sparse = not case.dense
    shapes = [(6, 4), (4,)] if not sparse else [(6, 4)]

    def grads_at(i):
        gen = torch.Generator().manual_seed(100 + i)
        out = []
        for s in shapes:
            g = torch.randn(s, generator=gen)
            out.append(g.to_sparse(1) if sparse else g)
        return out

    base = _pair(shapes, dtype)[0]
    runs = {}
    for label, first, second in (("torch", torch.optim, torch.optim), ("fa->torch", fat, torch.optim),
                                 ("torch->fa", torch.optim, fat), ("fa->fa", fat, fat)):
        ps = [torch.nn.Parameter(b.detach().clone()) for b in base]
        opt = getattr(first, case.name)(ps, **options)
        for i in range(10):
            _set_grads(ps, grads_at(i))
            opt.step()
        sd = opt.state_dict()
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        opt2 = getattr(second, case.name)(qs, **options)
        opt2.load_state_dict(sd)
        for i in range(10, 20):
            _set_grads(qs, grads_at(i))
            opt2.step()
        runs[label] = (qs, opt2.state_dict())
    tq, tsd = runs["torch"]
    for label, (qs, sd) in runs.items():
        _assert_same(qs, tq, dtype, label)
        _assert_same_state(sd, tsd, dtype)


def test_state_dict_layout_is_torch_s():
    ps, tps = _pair([(3, 2)], np.float32)
    for cls_name in ("Adam", "NAdam", "SparseAdam", "SGD", "Adagrad"):
        kw = {"momentum": 0.9} if cls_name == "SGD" else {}
        opt = getattr(fat, cls_name)(ps, **kw)
        topt = getattr(torch.optim, cls_name)(tps, **kw)
        sd, tsd = opt.state_dict(), topt.state_dict()
        assert sd["param_groups"] == tsd["param_groups"]
        assert sd["state"].keys() == tsd["state"].keys()                  # Adagrad: eager state
    opt = fat.Adam(ps, sparse_mode="exact")
    assert opt.state_dict()["param_groups"][0]["sparse_mode"] == "exact"  # extras kept when not default


def test_lr_scheduler_step_lr_matches_torch():
    ps, tps = _pair([(8,)], np.float64)
    opt, topt = fat.Adam(ps, lr=0.1), torch.optim.Adam(tps, lr=0.1)
    s1 = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.3)
    s2 = torch.optim.lr_scheduler.StepLR(topt, step_size=5, gamma=0.3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        g = torch.randn(8, generator=gen, dtype=torch.float64)
        _set_grads(ps, [g])
        _set_grads(tps, [g])
        opt.step()
        topt.step()
        s1.step()
        s2.step()
    assert opt.param_groups[0]["lr"] == topt.param_groups[0]["lr"]
    _assert_same(ps, tps, np.float64)
    assert opt.state_dict()["param_groups"] == topt.state_dict()["param_groups"]     # initial_lr too


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(100, 8, sparse=True, mode="sum")
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def forward(self, ids, offsets):
        return self.mlp(self.bag(ids, offsets))


def test_model_training_loop_matches_torch():
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    mine = [fat.SparseAdam(a.bag.parameters(), lr=1e-2), fat.Adam(a.mlp.parameters(), lr=1e-3, weight_decay=0.01)]
    theirs = [torch.optim.SparseAdam(b.bag.parameters(), lr=1e-2),
              torch.optim.Adam(b.mlp.parameters(), lr=1e-3, weight_decay=0.01)]
    gen = torch.Generator().manual_seed(4)
    for _ in range(25):
        ids = torch.randint(0, 100, (64,), generator=gen)
        offsets = torch.arange(0, 64, 4)
        y = torch.randn(16, 1, generator=gen)
        for model, opts in ((a, mine), (b, theirs)):
            for o in opts:
                o.zero_grad()
            torch.nn.functional.mse_loss(model(ids, offsets), y).backward()
            torch.nn.utils.clip_grad_norm_(model.mlp.parameters(), 1.0)
            for o in opts:
                o.step()
    _assert_same(list(a.parameters()), list(b.parameters()), np.float32)


def test_closure_and_zero_grad():
    p = torch.nn.Parameter(torch.ones(4))
    opt = fat.SGD([p], lr=0.1)
    calls = []

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        calls.append(torch.is_grad_enabled())
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True] and float(loss.detach()) == 4.0
    np.testing.assert_allclose(p.detach().numpy(), 0.8)
    opt.zero_grad()
    assert p.grad is None
    assert opt.step() is None                       # no gradient: nothing happens
    np.testing.assert_allclose(p.detach().numpy(), 0.8)


def test_frozen_params_none_grads_and_add_param_group():
    ps, tps = _pair([(3,), (2,), (4,)], np.float64)
    ps[1].requires_grad_(False)
    tps[1].requires_grad_(False)
    opt, topt = fat.RMSprop(ps[:2], lr=1e-2), torch.optim.RMSprop(tps[:2], lr=1e-2)
    opt.add_param_group({"params": [ps[2]], "lr": 0.1, "momentum": 0.5})
    topt.add_param_group({"params": [tps[2]], "lr": 0.1, "momentum": 0.5})
    for i in range(5):
        g = [torch.full((3,), 1.0 + i, dtype=torch.float64), None, torch.full((4,), -1.0, dtype=torch.float64)]
        _set_grads(ps, g)
        _set_grads(tps, g)
        opt.step()
        topt.step()
    _assert_same(ps, tps, np.float64)
    _assert_same_state(opt.state_dict(), topt.state_dict(), np.float64)
    assert opt.state[ps[0]]["step"] == 5 and len(opt.state) == 2 and ps[1] not in opt.state


def _snapshot(ps, opt):
    sd = opt.state_dict()
    return [p.detach().clone() for p in ps], {j: {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                                  for k, v in st.items()} for j, st in sd["state"].items()}


def _unchanged(ps, opt, snap):
    before_p, before_s = snap
    for p, q in zip(ps, before_p):
        assert torch.equal(p.detach(), q)
    after = opt.state_dict()["state"]
    assert after.keys() == before_s.keys()
    for j, st in before_s.items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(after[j][k]), torch.as_tensor(v))


@pytest.mark.parametrize("bad", ["float16", "bfloat16", "noncontiguous", "foreach", "capturable",
                                 "differentiable", "int"])
def test_refused_parameters_and_options(bad):
    p = torch.nn.Parameter(torch.zeros(4, 3))
    kw = {}
    if bad in ("float16", "bfloat16"):
        p = torch.nn.Parameter(torch.zeros(4, 3, dtype=getattr(torch, bad)))
    elif bad == "noncontiguous":
        p = torch.nn.Parameter(torch.zeros(3, 4).t())
    elif bad == "int":
        p = torch.zeros(4, 3, dtype=torch.int64)
    else:
        kw = {bad: True}
    with pytest.raises((TypeError, ValueError), match=bad if bad in ("float16", "bfloat16", "foreach", "capturable",
                                                                     "differentiable") else "contiguous|int64"):
        fat.Adam([p], **kw)
    opt = fat.Adam([torch.nn.Parameter(torch.zeros(2))])
    n = len(opt.param_groups)
    with pytest.raises((TypeError, ValueError)):
        opt.add_param_group({"params": [p], **kw})
    assert len(opt.param_groups) == n and len(opt.inner.param_groups) == n


def test_fused_true_is_accepted():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fat.Adam([p], fused=True)
    p.grad = torch.ones(3)
    opt.step()
    assert opt.state_dict()["param_groups"][0]["fused"] is True
    with pytest.raises(TypeError):
        fat.RMSprop([p], fused=True)                # torch's RMSprop has no fused option either


@pytest.mark.parametrize("bad", ["dtype", "noncontiguous", "bad_lr", "replaced_storage"])
def test_refused_steps_change_nothing(bad):
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = fat.Adam(ps, lr=0.1)
    for _ in range(2):
        _set_grads(ps, [torch.ones(4, 3), torch.ones(5)])
        opt.step()
    snap = _snapshot(ps, opt)
    ps[0].grad = torch.ones(4, 3)
    ps[1].grad = torch.ones(5)
    if bad == "dtype":
        ps[1].grad_dtype = None                      # torch 2.13 refuses the assignment otherwise
        ps[1].grad = torch.ones(5, dtype=torch.float64)
    elif bad == "noncontiguous":
        ps[0].grad = torch.ones(3, 4).t()
    elif bad == "bad_lr":
        opt.param_groups[0]["lr"] = -1.0
    elif bad == "replaced_storage":
        ps[1].data = ps[1].data.clone()
    with pytest.raises((TypeError, ValueError)):
        opt.step()
    _unchanged(ps, opt, snap)


def test_refused_load_state_dict_changes_nothing():
    ps = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = fat.Adam(ps, lr=0.1)
    ps[0].grad = torch.ones(4, 3)
    opt.step()
    snap = _snapshot(ps, opt)
    other = torch.optim.RMSprop([torch.nn.Parameter(torch.randn(4, 3))])
    other.param_groups[0]["params"][0].grad = torch.ones(4, 3)
    other.step()
    with pytest.raises(ValueError):
        opt.load_state_dict(other.state_dict())
    wrong_shape = torch.optim.Adam([torch.nn.Parameter(torch.randn(3, 4))])
    wrong_shape.param_groups[0]["params"][0].grad = torch.ones(3, 4)
    wrong_shape.step()
    with pytest.raises(ValueError):
        opt.load_state_dict(wrong_shape.state_dict())
    _unchanged(ps, opt, snap)
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("name", ["RowwiseAdagrad", "Ftrl"])
def test_fastadapt_only_optimizers_match_the_numpy_class(name):
    import fastadapt as fa
    p = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    w = p.detach().numpy().copy()
    opt, ref_opt = getattr(fat, name)([p], lr=0.05), getattr(fa, name)([w], lr=0.05)
    for i in range(5):
        g = np.random.default_rng(i).standard_normal((6, 4))
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        ref_opt.step([g])
    np.testing.assert_array_equal(p.detach().numpy(), w)
    sd = opt.state_dict()
    fresh = getattr(fat, name)([torch.nn.Parameter(p.detach().clone())], lr=0.05)
    fresh.load_state_dict(sd)


def test_import_fastadapt_does_not_import_torch():
    code = ("import sys, numpy as np, fastadapt as fa\n"
            "w = np.zeros(4); fa.Adam([w]).step([np.ones(4)])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "import fastadapt.torch\n"
            "assert 'torch' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# =========================================================================== the benchmark

def test_torch_dlrm_bench_quick(capsys):
    """bench/torch_dlrm.py --quick runs and prints both sections and the four targets (its output, not
    its speed)."""
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    try:
        import torch_dlrm
    finally:
        sys.path.pop(0)
    assert torch_dlrm.main(["--quick"]) == 0
    text = capsys.readouterr().out
    assert "optimizer part" in text and "whole step" in text and "RMSprop (torch foreach=True)" in text
    assert sum(line.endswith(("MET", "MISSED")) for line in text.splitlines()) == len(torch_dlrm.TARGETS) == 4
    r = torch_dlrm.measure(rows=500, batch=8, bag_size=3, width=16, depth=1, rounds=1)
    assert set(r["dlrm_ms"]) == {"torch_opt", "fastadapt_opt", "torch_step", "fastadapt_step"}
    assert all(v > 0 for v in r["dlrm_ms"].values()) and r["x_dlrm_step"] > 0 and r["mlp_params"] == 272
    assert [t[0] for t in torch_dlrm.targets(r)] == [t[0] for t in torch_dlrm.TARGETS]


def test_tensor_lr_changed_in_place_and_state_dict_hooks():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    lr = torch.tensor(0.1, dtype=torch.float64)
    opt = fat.SGD([p], lr=lr)
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    lr.fill_(0.5)                                   # the same tensor object, a new value
    opt.step()
    np.testing.assert_allclose(p.detach().numpy(), -0.6)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("post"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load"))
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", "post", "load"]
