"""Smoke test of ``benchmarks.bench_lasp_tiles`` on CPU: it compiles each chosen candidate's three
state-correction kernels for sm_90a and records their registers and stack frames in its JSON."""
from __future__ import annotations

import json
import os

import pytest

import benchmarks.bench_lasp_tiles as bench
from linear_moe.kernels.lasp import correction
from linear_moe.kernels.resources import CUOBJDUMP


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="no cuobjdump in the Triton wheel")
def test_compile_only_run_records_each_kernel(tmp_path):
    out = tmp_path / "tiles.json"
    result = bench.main(["--out", str(out), "--head-dim", "64", "--candidates", "default,tf32_t64"])
    assert json.loads(out.read_text()) == result
    assert set(result["candidates"]) == {"default", "tf32_t64"}
    for entry in result["candidates"].values():
        assert set(entry["resources_sm90"]) == set(correction.KERNELS)
        assert all(r["registers"] > 0 for r in entry["resources_sm90"].values()), entry
        assert "timings" not in entry  # timed on CUDA only
    assert result["candidates"]["tf32_t64"]["tiles"]["bwd_precision"] == "tf32"


def test_unknown_candidate_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--candidates", "default,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err
