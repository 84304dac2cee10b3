"""Compressed optimizer state (``state_dtype="bfloat16"`` / ``"int8"``), dense CPU steps.

The definition a compressed step must meet, bit for bit: decode the state to float32, run the
float32 step (the same rule), encode the new state -- int8 with the nearest code of each block's
absmax (``codec.q8_encode``), bfloat16 rounded to nearest or stochastically with the bits of
(seed, step, element index) (``codec.bf16_encode``).  Every dense optimizer, its rich and plain
configurations, several shapes (int8 block layouts), both loops, 1 and 2 threads; then the
API: refusals, ``state_dict`` round trips and float32 export/import, switching ``state_dtype``,
bytes per parameter, small parameters keeping float32 state.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import fastadapt as fa
from fastadapt import config
from fastadapt.backends import codec
from fastadapt.backends.compressed import CompressedBuffer, int8_block
from optimizers import ELEMENTWISE, ROWWISE, config_id, rich_and_plain

CODECS = [("bfloat16", "nearest"), ("bfloat16", "stochastic"), ("int8", "stochastic")]
CODEC_IDS = ["bf16-nearest", "bf16-sr", "int8"]
#: 1-D (blocks of 256, a short last one), rows of 64 (a block per row), rows of 300 (one block per
#: row, not a multiple of 256), rows of 512 (two blocks per row), rows of 3 (blocks span rows)
SHAPES = [(1000,), (12, 64), (5, 300), (3, 512), (100, 3)]


@pytest.fixture(autouse=True)
def _compress_small(monkeypatch):
    monkeypatch.setattr(config, "STATE_COMPRESS_MIN", 0)       # the tests' arrays are small


def _encode_like(buf, x, step, nearest):
    """What the loops must store for float32 state ``x`` after step ``step``: the definition."""
    x = np.ascontiguousarray(x, np.float32)
    if buf.kind == "int8":
        codes, absmax = codec.q8_encode(x.reshape(-1), signed=buf.signed, block=buf.block)
        return codes.reshape(x.shape), absmax
    return codec.bf16_encode(x, seed=buf.seed, step=step, nearest=nearest), None


def _reference_step(case, options, p, g, opt):
    """One float32 step from the compressed optimizer's decoded state: (new p, new float state)."""
    ref_p = p.copy()
    ref = case.cls([ref_p], **options)
    sd = opt.state_dict(dtype="float32")
    for group in sd["param_groups"]:
        group["state_dtype"] = None
    ref.load_state_dict(sd)
    ref.step([g])
    return ref_p, ref.state[0]


@pytest.mark.parametrize("kind,rounding", CODECS, ids=CODEC_IDS)
@pytest.mark.parametrize("item", rich_and_plain(ELEMENTWISE), ids=config_id)
def test_step_is_decode_rule_encode(item, kind, rounding):
    case, _, options = item
    for shape in SHAPES:
        rng = np.random.default_rng(hash(shape) % 1000)
        p = rng.standard_normal(shape).astype(np.float32)
        opt = case.cls([p], **options, state_dtype=kind, state_rounding=rounding)
        for step in range(1, 4):
            g = rng.standard_normal(shape).astype(np.float32)
            if step > 1 or case.algorithm.eager_state:
                ref_p, ref_state = _reference_step(case, options, p, g, opt)
            else:                                    # no state yet: the float32 optimizer from scratch
                ref_p = p.copy()
                ref = case.cls([ref_p], **options)
                ref.step([g])
                ref_state = ref.state[0]
            opt.step([g])
            assert np.array_equal(p, ref_p), (shape, step)
            st = opt.state[0]
            assert st["step"] == ref_state["step"]
            for name, buf in st.items():
                if not isinstance(buf, CompressedBuffer):
                    if name != "step":
                        assert buf == ref_state[name], name          # carried scalars (NAdam)
                    continue
                assert buf.kind == kind and buf.codes.shape == shape
                codes, absmax = _encode_like(buf, ref_state[name], step, rounding == "nearest")
                assert np.array_equal(buf.codes, codes), (shape, step, name)
                if absmax is not None:
                    assert buf.block == int8_block(shape)
                    assert np.array_equal(buf.absmax, absmax, equal_nan=True), (shape, step, name)


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
@pytest.mark.parametrize("loop", ["serial", "parallel"])
def test_loops_and_threads_agree(kind, loop, monkeypatch):
    """Serial and parallel loops, 1 and 2 threads: identical codes and parameters."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 1000 if loop == "parallel" else 10 ** 9)
    monkeypatch.setattr(config, "PARALLEL_MIN_CHUNK", 2048)
    results = []
    for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
        numba.set_num_threads(threads)
        try:
            rng = np.random.default_rng(0)
            p = rng.standard_normal(20_000).astype(np.float32)
            opt = fa.Adam([p], lr=1e-2, amsgrad=True, state_dtype=kind)
            for _ in range(3):
                opt.step([rng.standard_normal(p.shape).astype(np.float32)])
            results.append((p.copy(), {k: v.codes.copy() for k, v in opt.state[0].items() if k != "step"}))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    (p1, s1), (p2, s2) = results
    assert np.array_equal(p1, p2)
    for k in s1:
        assert np.array_equal(s1[k], s2[k]), k


def test_bytes_per_parameter():
    p = np.zeros(1 << 16, np.float32)
    for kind, per in (("bfloat16", 2.0), ("int8", 1 + 4 / 256)):
        opt = fa.Adam([p.copy()], state_dtype=kind)
        opt.step([np.ones_like(p)])
        total = sum(v.nbytes for k, v in opt.state[0].items() if k != "step")
        assert total / p.size == pytest.approx(2 * per)


def test_small_parameters_keep_float32_state(monkeypatch):
    monkeypatch.setattr(config, "STATE_COMPRESS_MIN", 4096)
    small, big = np.zeros(100, np.float32), np.zeros(5000, np.float32)
    opt = fa.Adam([small, big], state_dtype="int8")
    opt.step([np.ones(100, np.float32), np.ones(5000, np.float32)])
    assert type(opt.state[0]["exp_avg"]) is np.ndarray
    assert isinstance(opt.state[1]["exp_avg"], CompressedBuffer)


def test_many_small_and_one_compressed_equal_separate_optimizers():
    rng = np.random.default_rng(4)
    shapes = [(30,), (7, 5), (4000,), (50,)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    together = [q.copy() for q in params]
    alone = [q.copy() for q in params]
    opt = fa.Adam(together, lr=1e-2, state_dtype="int8")
    singles = [fa.Adam([q], lr=1e-2, state_dtype="int8") for q in alone]
    for _ in range(4):
        gs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.step(gs)
        for o, g in zip(singles, gs):
            o.step([g])
    for j, (a, b) in enumerate(zip(together, alone)):
        assert np.array_equal(a, b), j
        # (the seeds differ -- positions 0..3 against 0 -- but int8 rounding does not use them)
        assert np.array_equal(opt.state[j]["exp_avg"].codes, singles[j].state[0]["exp_avg"].codes)


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_state_dict_round_trip_is_bit_exact(kind):
    rng = np.random.default_rng(1)
    p = rng.standard_normal((40, 64)).astype(np.float32)
    gs = [rng.standard_normal(p.shape).astype(np.float32) for _ in range(6)]
    opt = fa.RMSprop([p], lr=1e-2, momentum=0.9, centered=True, state_dtype=kind)
    for g in gs[:3]:
        opt.step([g])
    sd = opt.state_dict()
    entry = sd["state"][0]["square_avg"]
    assert isinstance(entry, dict) and entry["state_dtype"] == kind and entry["codes"].dtype in (np.uint8, np.uint16)
    q = p.copy()
    again = fa.RMSprop([q], lr=1e-2, momentum=0.9, centered=True, state_dtype=kind)
    again.load_state_dict(sd)
    for g in gs[3:]:
        opt.step([g])
        again.step([g])
    assert np.array_equal(p, q)
    for name in ("square_avg", "momentum_buffer", "grad_avg"):
        assert np.array_equal(opt.state[0][name].codes, again.state[0][name].codes)
        assert np.array_equal(opt.state[0][name].absmax, again.state[0][name].absmax, equal_nan=True)


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_float32_export_and_import(kind):
    rng = np.random.default_rng(2)
    p = rng.standard_normal(5000).astype(np.float32)
    opt = fa.Adam([p], lr=1e-2, state_dtype=kind)
    for _ in range(2):
        opt.step([rng.standard_normal(p.shape).astype(np.float32)])
    sd = opt.state_dict(dtype="float32")
    for name in ("exp_avg", "exp_avg_sq"):
        arr = sd["state"][0][name]
        assert type(arr) is np.ndarray and arr.dtype == np.float32
        assert np.array_equal(arr, np.asarray(opt.state[0][name]))
    # into a float32 optimizer: the decoded values, exactly
    plain = fa.Adam([p.copy()], lr=1e-2)
    sd_plain = opt.state_dict(dtype="float32")
    sd_plain["param_groups"][0]["state_dtype"] = None
    plain.load_state_dict(sd_plain)
    assert np.array_equal(plain.state[0]["exp_avg"], sd["state"][0]["exp_avg"])
    # a float32 state_dict into a compressed optimizer: quantized (to nearest, as the codec does)
    packed = fa.Adam([p.copy()], lr=1e-2, state_dtype=kind)
    packed.load_state_dict(plain.state_dict() | {"param_groups": [dict(plain.state_dict()["param_groups"][0],
                                                                        state_dtype=kind)]})
    for name in ("exp_avg", "exp_avg_sq"):
        buf, values = packed.state[0][name], sd["state"][0][name]
        assert isinstance(buf, CompressedBuffer) and buf.kind == kind
        codes, _ = _encode_like(buf, values, 0, True)
        assert np.array_equal(buf.codes, codes)
        if kind == "bfloat16":                        # bfloat16 values survive the round trip exactly
            assert np.array_equal(np.asarray(buf), values)


def test_float32_export_loads_into_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    p = rng.standard_normal(5000).astype(np.float32)
    gs = [rng.standard_normal(p.shape).astype(np.float32) for _ in range(4)]
    opt = fa.Adam([p], lr=1e-2, state_dtype="int8")
    for g in gs[:2]:
        opt.step([g])
    sd = opt.state_dict(dtype="float32")
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    topt = torch.optim.Adam([tp], lr=1e-2)
    tsd = topt.state_dict()
    tsd["state"] = {0: {"step": torch.tensor(float(sd["state"][0]["step"])),
                        "exp_avg": torch.from_numpy(sd["state"][0]["exp_avg"]),
                        "exp_avg_sq": torch.from_numpy(sd["state"][0]["exp_avg_sq"])}}
    topt.load_state_dict(tsd)
    plain = fa.Adam([p.copy()], lr=1e-2)
    sd["param_groups"][0]["state_dtype"] = None
    plain.load_state_dict(sd)
    q = plain.param_groups[0]["params"][0]
    for g in gs[2:]:
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        plain.step([g])
    np.testing.assert_allclose(tp.detach().numpy(), q, rtol=1e-6, atol=1e-7)


def test_switching_state_dtype_keeps_the_values():
    rng = np.random.default_rng(5)
    p = rng.standard_normal(5000).astype(np.float32)
    opt = fa.Adam([p], lr=1e-2)
    opt.step([rng.standard_normal(p.shape).astype(np.float32)])
    before = opt.state[0]["exp_avg"].copy()
    opt.param_groups[0]["state_dtype"] = "bfloat16"
    opt.step([np.zeros_like(p)])                       # m <- 0.9 m, stored as bfloat16
    assert isinstance(opt.state[0]["exp_avg"], CompressedBuffer)
    # two roundings: the conversion (to nearest, 2**-9) and the step (stochastic, < 2**-7)
    np.testing.assert_allclose(np.asarray(opt.state[0]["exp_avg"]), 0.9 * before, rtol=2 ** -6)
    opt.param_groups[0]["state_dtype"] = None
    opt.step([np.zeros_like(p)])
    assert type(opt.state[0]["exp_avg"]) is np.ndarray


def test_refusals():
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        fa.Adam([np.zeros(3, np.float32)], state_dtype="float16")
    with pytest.raises(ValueError, match="state_rounding must be one of"):
        fa.Adam([np.zeros(3, np.float32)], state_rounding="up")
    with pytest.raises(ValueError, match="is for float32 parameters"):
        fa.Adam([np.zeros(3)], state_dtype="bfloat16")
    opt = fa.Adam([np.zeros(3)])
    opt.param_groups[0]["state_dtype"] = "int8"
    with pytest.raises(ValueError, match="is for float32 parameters"):
        opt.step([np.ones(3)])
    with pytest.raises(ValueError, match="dtype"):
        opt.state_dict(dtype="float16")


def test_state_dict_refuses_bad_compressed_entries():
    p = np.zeros(5000, np.float32)
    opt = fa.Adam([p], state_dtype="int8")
    opt.step([np.ones_like(p)])
    sd = opt.state_dict()
    bad = [("codes", np.zeros(4999, np.uint8), "codes must be uint8"),
           ("absmax", np.zeros(3, np.float32), "absmax must be float32"),
           ("block", 64, "block must be"),
           ("state_dtype", "int4", "state_dtype")]
    for key, value, match in bad:
        broken = opt.state_dict()
        broken["state"][0]["exp_avg"] = dict(broken["state"][0]["exp_avg"], **{key: value})
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(broken)
    assert np.array_equal(opt.state[0]["exp_avg"].codes, sd["state"][0]["exp_avg"]["codes"])


@pytest.mark.parametrize("case", ROWWISE, ids=str)
@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_row_rules_refuse_compressed_state(case, kind):
    """A row rule's state is one value per row (already 1/ncols of the table): compressing it is
    refused, at construction and when set between steps, naming the fix; nothing changes."""
    p = np.ones((64, 128), np.float32)
    with pytest.raises(ValueError, match="state_dtype=None"):
        case.cls([p], state_dtype=kind)
    opt = case.cls([p], **case.rich)
    opt.step([np.full_like(p, 0.5)])
    before, state = p.copy(), {k: np.copy(v) for k, v in opt.state[0].items()}
    opt.param_groups[0]["state_dtype"] = kind
    with pytest.raises(ValueError, match="state_dtype=None"):
        opt.step([np.full_like(p, 0.5)])
    assert np.array_equal(p, before)
    assert all(np.array_equal(opt.state[0][k], v) for k, v in state.items())
