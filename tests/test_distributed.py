"""Data-parallel estimation: 2 gloo processes on CPU give the 1-process maps, and a rank that
fails takes every rank down within seconds, with its error text.

Bit for bit with batches of one sentence. With larger batches a sentence shares its batch with
other sentences on its shard than in one process, so it is padded to another length; the
attention sums then run over other lengths and the pooled activations differ in the last bits
(≤ 1e-6 relative here), which is the only difference: the gather restores the one-process row order."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import acttransport as at
from conftest import make_llama, make_tokenizer, sentences

WORKER = Path(__file__).with_name("dist_worker.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, mode: str, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), mode], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = []
    for p in procs:
        so, se = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return results


@pytest.mark.parametrize("mode", ["causal1", "causal", "plain", "source"])
def test_two_gloo_ranks_fit_the_one_process_map(mode, tmp_path):
    res = _launch(tmp_path / "map", mode)
    assert all(r.returncode == 0 for r in res), [r.stderr[-2000:] for r in res]
    got = at.load(tmp_path / "map")
    model, tok = make_llama(layers=3), make_tokenizer()
    src, tgt = sentences(23, 2, 100, seed=1), sentences(23, 150, 300, seed=2)
    want = at.estimate(model, tok, src, tgt, modules="@all-norms", batch_size=1 if mode == "causal1" else 4, progress=False,
                       causal=mode != "plain", condition="source" if mode == "source" else "both")
    assert got.modules == want.modules and got.config.n_samples == want.config.n_samples == 23
    for spec in want.modules:
        for k, t in want.maps[spec].tensors().items():
            if mode == "causal1":
                assert torch.equal(got.maps[spec].tensors()[k], t), (spec, k)
            else:
                torch.testing.assert_close(got.maps[spec].tensors()[k], t, rtol=1e-6, atol=1e-6, msg=f"{spec} {k}")


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path):
    t0 = time.perf_counter()
    res = _launch(tmp_path / "map", "fail", timeout=90)
    assert time.perf_counter() - t0 < 60  # seconds, not the group timeout
    assert all(r.returncode != 0 for r in res)
    assert "boom on rank 1 at layer 1" in res[1].stderr
    assert "rank 1 of 2 failed: RuntimeError: boom on rank 1 at layer 1" in res[0].stderr
    assert not (tmp_path / "map").exists()


def test_torchrun_fit_writes_the_one_process_map(tmp_path):
    model, tok = make_llama(layers=3), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    src, tgt = sentences(20, 2, 100, seed=1), sentences(20, 150, 300, seed=2)
    (tmp_path / "s.txt").write_text("\n".join(src) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(tgt) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()), "-m", "acttransport", "fit",
           str(tmp_path / "m"), "--source", str(tmp_path / "s.txt"), "--target", str(tmp_path / "t.txt"), "-o", str(tmp_path / "map"),
           "--diagnose", "0", "--batch-size", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("fitted linear on 6 modules from 20 pairs") == 1 and "on 2 ranks" in res.stdout  # rank 0 alone reports
    want = at.estimate(model, tok, src, tgt, batch_size=1, progress=False)
    got = at.load(tmp_path / "map")
    assert all(torch.equal(got.maps[s].scale, want.maps[s].scale) and torch.equal(got.maps[s].shift, want.maps[s].shift) for s in want.modules)
