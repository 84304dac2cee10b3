"""``python -m fastadapt bench`` (fastadapt.apps.benchmark) on tiny sizes: its output, not its speed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastadapt.apps import benchmark as B
from fastadapt.apps import cli


@pytest.fixture(autouse=True)
def _restore_environment(monkeypatch):
    """`bench` sets OMP_WAIT_POLICY for its own process; keep the test process's as it was."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "unchanged")
    monkeypatch.delenv("OMP_WAIT_POLICY")


def test_bench_json_has_every_figure(capsys):
    assert cli.main(["bench", "--size", "2000", "--rounds", "2", "--optimizers", "adam", "rmsprop",
                     "--json", "--no-progress", "--no-torch"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 2000 and out["dtype"] == "float32" and out["rounds"] == 2
    assert out["numba_threads"] >= 1 and out["ceiling"]["bytes_per_element"] == 12
    assert [r["optimizer"] for r in out["optimizers"]] == ["adam", "rmsprop"]
    adam = out["optimizers"][0]
    assert adam["bytes_per_element"] == 28 and adam["fastadapt_ms"] > 0
    assert adam["gbps"] == pytest.approx(28 * 2000 / (adam["fastadapt_ms"] / 1e3) / 1e9)
    assert adam["fraction_of_ceiling"] > 0 and adam["ceiling_gbps"] > 0
    assert adam["torch_fused_ms"] is None and adam["speedup_vs_torch_fused"] is None


def test_bench_table_with_torch(capsys):
    pytest.importorskip("torch")
    assert cli.main(["bench", "--size", "3000", "--rounds", "2", "--optimizers", "adagrad", "rmsprop",
                     "--dtype", "float64", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "streaming ceiling" in text and "3,000 float64 elements" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("adagrad", "rmsprop"))}
    assert rows["adagrad"][1] == "40"                  # 5 arrays x 8 bytes
    assert rows["adagrad"][5] != "-"                   # torch has a fused Adagrad ...
    assert rows["rmsprop"][5] == "-" and rows["rmsprop"][7] != "-"     # ... and no fused RMSprop


def test_bench_rejects_bad_sizes(capsys):
    assert cli.main(["bench", "--size", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "positive" in err and err.startswith("fastadapt bench: error: ") and len(err.splitlines()) == 1


def test_interleaved_rotates_and_counts():
    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = B.interleaved(cases, rounds=3, warmup=1, block=2, settle=1)
    assert calls[:3] == ["a", "b", "c"]                           # warm-up
    rounds = [calls[3:12], calls[12:21], calls[21:]]              # each case: 1 settling + 2 timed
    assert rounds == [["a"] * 3 + ["b"] * 3 + ["c"] * 3, ["b"] * 3 + ["c"] * 3 + ["a"] * 3,
                      ["c"] * 3 + ["a"] * 3 + ["b"] * 3]
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6, "c": 6}


def test_ratio_pairs_calls_of_the_same_round():
    # rounds of 2 calls: a is twice b in round 0, three times b in round 1 and 2
    times = {"a": [2, 2, 6, 6, 30, 30], "b": [1, 1, 2, 2, 10, 10]}
    assert B.ratio(times, "a", "b", block=2) == 3.0
    assert B.ratio(times, "b", "a", block=2) == pytest.approx(1 / 3)


def test_cases_step_what_they_say():
    step = B.dense_case("adagrad", 10, np.float64)
    assert step() is True
    sizes = B.log_uniform_sizes(50, 100, 200_000, seed=1)
    assert len(sizes) == 50 and 100 <= min(sizes) and max(sizes) <= 200_000
    assert B.many_case("adam", [3, 4])() is True
    assert B.bytes_per_element("adam", np.float64) == 56 and B.bytes_per_element("stream") == 12


def test_per_optimizer_facts_are_derived_from_the_name():
    """Class, torch counterpart and bytes per element all come from the canonical name."""
    import fastadapt as fa

    assert set(B.OPTIMIZERS) >= {"adagrad", "rmsprop", "adam", "adamw"}
    for name, cls in B.OPTIMIZERS.items():
        canonical = B.canonical_name(name)
        assert canonical.lower() == name and cls is getattr(fa, canonical) is B.optimizer_class(name.upper())
        assert B.arrays_touched(name) == 3 + 2 * len(B.state_buffers(name))
    assert B.state_buffers("adam") == ("exp_avg", "exp_avg_sq") and B.state_buffers("Adagrad") == ("sum",)
    assert B.bytes_per_element("rmsprop") == 20 and B.bytes_per_element("adamw", np.float64) == 56
    torch = pytest.importorskip("torch")
    assert B.torch_class(torch, "rmsprop") is torch.optim.RMSprop
    with pytest.raises(KeyError):
        B.canonical_name("sparseadam")                    # sparse gradients only: not benchmarked


def test_a_new_optimizer_needs_only_its_name(monkeypatch):
    """An optimizer fastadapt gains under a name of NAMES (here a stand-in for SGD, keeping no
    state buffer) is measured with no other change."""
    import fastadapt as fa

    class SGD(fa.Adagrad):                                # keeps "sum"; stands in for any class
        pass

    monkeypatch.setattr(fa, "SGD", SGD, raising=False)
    assert "SGD" in B.NAMES and B.optimizer_class("sgd") is SGD
    assert B.bytes_per_element("sgd") == 20
    assert B.dense_case("sgd", 10)() is True
    result = B.measure_dense(["sgd"], n=500, rounds=1, use_torch=False)
    assert result["optimizers"][0]["optimizer"] == "sgd"
    torch = pytest.importorskip("torch")
    assert B.torch_class(torch, "sgd") is torch.optim.SGD


def test_bench_progress_counts_agree_with_the_header(capsys):
    """Off a terminal: no progress while running, one final line whose counts are the header's."""
    assert cli.main(["bench", "--size", "1000", "--rounds", "2", "--optimizers", "adam", "adagrad",
                     "--no-torch"]) == 0
    out, err = capsys.readouterr()
    assert "medians of 2 interleaved rounds" in out
    assert "\r" not in err and err.endswith("\n") and len(err.splitlines()) == 1, repr(err)
    assert err.startswith("fastadapt bench: 2/2 optimizers x 2 interleaved rounds"), err


def test_bench_progress_on_a_terminal(monkeypatch, capsys):
    """On a terminal the line is redrawn in place and counts each optimizer's rounds."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert cli.main(["bench", "--size", "1000", "--rounds", "3", "--optimizers", "adam", "--no-torch"]) == 0
    text = term.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    assert "adam round 3/3 (optimizer 1/1)" in text and "round 4/" not in text
    assert "medians of 3 interleaved rounds" in capsys.readouterr().out


def test_bench_header_names_what_is_unset():
    info = {"numba_threads": 2, "threading_layer": None, "omp_wait_policy": None, "torch_threads": None,
            "torch_version": None}
    text = B.describe_threads(info)
    assert text == "numba 2 threads, OMP_WAIT_POLICY unset, torch not installed"
    assert "None" not in text
    info.update(threading_layer="omp", omp_wait_policy="PASSIVE", torch_threads=4, torch_version="2.13.0")
    assert B.describe_threads(info) == ("numba 2 threads (omp layer), OMP_WAIT_POLICY=PASSIVE, "
                                        "torch 2.13.0 with 4 threads")
