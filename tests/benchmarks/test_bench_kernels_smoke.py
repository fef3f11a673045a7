"""Smoke tests of ``benchmarks.bench_kernels`` on tiny CPU shapes: both modes run every CPU case at
every length and write consistent JSON, and ``--mode train`` really times a backward pass. No
timing assertions (shared CPUs)."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

import benchmarks.bench_kernels as bench

TINY = ["--ops", "gla,delta_rule", "--seq-lens", "32,64", "--batch", "2", "--heads", "2", "--head-dim", "8",
        "--repeats", "2", "--threads", "1"]
CPU_ROLES = {"chunk", "naive", "quadratic"}


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_every_cpu_case_is_measured_at_every_length(tmp_path, mode):
    out = tmp_path / "kernels.json"
    payload = bench.main([*TINY, "--mode", mode, "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    assert payload["complete"] is True and not payload["errors"]
    assert payload["config"]["B"] == 2 and payload["config"]["mode"].startswith(
        "forward + backward" if mode == "train" else "forward only")
    rows = payload["results"]
    assert {r["role"] for r in rows} == CPU_ROLES  # the CUDA-only cases (fla, SDPA) are not run on CPU
    for row in rows:
        assert "skipped" not in row, row
        assert len(row["times_s"]) == 2 and row["median_s"] == statistics.median(row["times_s"]) > 0
    assert set(payload["summary"]) == {"gla/scalar", "gla/diagonal", "delta_rule/plain", "delta_rule/gated"}
    scalar = payload["summary"]["gla/scalar"]
    chunk = {r["T"]: r["median_s"] for r in rows if r["case"] == "chunk_scalar"}
    assert scalar["chunk_T64_over_T32"] == pytest.approx(chunk[64] / chunk[32])


@pytest.mark.parametrize("op", ["gla", "delta_rule"])
def test_train_mode_thunk_computes_every_input_gradient(op):
    """The timed thunk is forward + backward: after two calls each input holds the gradient of one
    explicit backward of the same output gradient (reset between calls, not accumulated)."""
    args = bench.parse_args([*TINY, "--mode", "train", "--out", "unused.json"])
    spec = bench.OPS[op]()
    case = next(c for c in spec.cases if c.role == "chunk" and c.variant != "plain")
    inputs = spec.make_inputs(16, case.variant, args)
    leaves = {name: t for name, t in inputs.items() if torch.is_tensor(t)}
    assert set(leaves) >= {"q", "k", "v", "g"} and all(t.requires_grad for t in leaves.values())
    thunk = bench._timed(case.build(inputs), inputs, args)
    torch.manual_seed(7)
    thunk()
    thunk()
    timed = {name: t.grad for name, t in leaves.items()}

    torch.manual_seed(7)
    out = case.build(inputs)()[0]
    expected = torch.autograd.grad(out, list(leaves.values()), torch.randn_like(out))
    for (name, grad), reference in zip(timed.items(), expected):
        assert grad is not None and reference.abs().sum() > 0, name
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6, msg=name)


def test_roles_select_the_cases_that_run(tmp_path):
    payload = bench.main([*TINY, "--roles", "chunk", "--out", str(tmp_path / "kernels.json")])
    assert {r["case"] for r in payload["results"]} == {"chunk_scalar", "chunk_diagonal", "chunk_plain", "chunk_gated"}
    with pytest.raises(SystemExit):
        bench.parse_args([*TINY, "--roles", "chunk,flash", "--out", str(tmp_path / "unused.json")])


def test_paired_rounds_alternate_and_feed_the_overhead_criterion(tmp_path, monkeypatch):
    """run_paired on two CPU cases (the pairing is role-agnostic; on CUDA it pairs fla with fla_direct):
    every round times both, in alternating order, and the summary's criterion reads the paired ratios."""
    args = bench.parse_args([*TINY, "--paired-repeats", "3", "--out", "unused.json"])
    spec = bench.OPS["gla"]()
    chunk, naive = (next(c for c in spec.cases if c.name == name) for name in ("chunk_scalar", "naive_scalar"))
    order = []
    monkeypatch.setattr(bench, "_timed", lambda build, inputs, a: build)
    monkeypatch.setattr(bench, "time_call",
                        lambda thunk, a: (order.append(thunk.tag) or (2.0 if thunk.tag == "c" else 1.0), None, None))

    def tagged(case, tag):
        def build(inputs):
            thunk = lambda: None  # noqa: E731
            thunk.tag = tag
            return thunk
        return bench.Case(case.name, case.role, case.variant, build)

    rows = bench.run_paired("gla", spec, tagged(chunk, "c"), tagged(naive, "n"), args)
    assert [r["T"] for r in rows] == [32, 64]
    assert order[:8] == ["c", "n", "c", "n", "n", "c", "c", "n"]  # warm-ups, then rounds with the order swapped
    for row in rows:
        assert len(row["first_times_s"]) == len(row["second_times_s"]) == 3
        assert row["ratio_of_medians"] == row["median_of_round_ratios"] == 2.0
    # the summary on CUDA: the overhead criterion holds only if every paired length is within 5%
    args.device = "cuda"
    separate = [{"op": "gla", "role": role, "variant": "scalar", "T": T, "median_s": 1.0}
                for role in ("fla", "fla_direct") for T in (32, 64)]
    for ratio, meets in ((2.0, False), (1.01, True)):
        pairs = [dict(r, ratio_of_medians=ratio) for r in rows]
        summary = bench.summarise(separate, args, pairs)["gla/scalar"]
        assert summary["fla_dispatch_over_direct_paired"] == {32: ratio, 64: ratio}
        assert summary["meets_dispatch_overhead_le_5pct"] is meets
