"""``python -m fastadapt bench`` (fastadapt.benchmark) on tiny sizes: its output, not its speed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastadapt import benchmark as B
from fastadapt import cli


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
    assert "positive" in capsys.readouterr().err


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
