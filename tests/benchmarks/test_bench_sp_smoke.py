"""Smoke test of ``benchmarks.bench_sp`` on CPU (gloo, SP=2, tiny shapes): the JSON it writes holds
one row per (length, kind), every measured byte count equals its analytic size, and the LASP-2
volume stays flat in the sequence length while the K/V exchanges grow with it."""
from __future__ import annotations

import json

import benchmarks.bench_sp as bench

SEQ_LENS = (32, 64)


def test_comm_rows_match_analytic_sizes(tmp_path):
    out = tmp_path / "sp.json"
    result = bench.main(["--out", str(out), "--world", "2", "--seq-lens", ",".join(map(str, SEQ_LENS)),
                         "--heads", "2", "--head-dim", "8"])
    assert json.loads(out.read_text()) == result and result["complete"] is True
    rows = {(r["seq_len"], r["kind"]): r for r in result["comm"]}
    kinds = ("lasp2_gla", "lasp2_delta_rule", "lasp2_attention", "ring_kv")
    assert set(rows) == {(T, kind) for T in SEQ_LENS for kind in kinds}
    assert all(r["measured_equals_analytic"] and r["measured"] for r in rows.values())
    short, long = SEQ_LENS
    for kind in ("lasp2_gla", "lasp2_delta_rule"):
        assert rows[short, kind]["measured"] == rows[long, kind]["measured"], kind
    for kind in ("lasp2_attention", "ring_kv"):
        assert rows[long, kind]["measured"]["fwd_sent_per_rank"] == 2 * rows[short, kind]["measured"]["fwd_sent_per_rank"]
