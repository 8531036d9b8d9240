"""Tests of bench.py: the generation benchmark's smoke sizes run both engines (on CPU; on a GPU with the
llama-3.2-3b shape, after checking that both engines agree there)."""
import pytest
import torch

import bench
import opensir as O
from conftest import sample

ENGINES = ("generate", "continuous")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _greedy(model, tok, prompts, n, engine):
    return sample(model, tok, prompts, n, 1.0, 50, 1.0, batch_size=64, engine=engine, greedy=True)


def test_bench_smoke_runs_both_engines():
    rows = bench.main(["--device", "cpu", "--smoke", "--threads", "1"])
    timed = [r for r in rows if "tokens" in r]
    assert {(r["engine"], r["phase"]) for r in timed} == {(e, p) for e in ENGINES for p in ("teacher", "student")}
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in timed)
    assert all(r["paper_hours_generation"] > 0 for r in rows if "paper_hours_generation" in r)


@gpu
def test_gpu_llama_engines_agree_and_bench_smoke():
    """On CUDA (fp32, so kernels' rounding cannot flip random weights' near-ties): the same greedy
    completions from both engines at the llama-3.2-3b shape; then the benchmark's smoke sizes."""
    with torch.device("cuda"):  # initialise on the GPU: 3B random weights on CPU take a minute
        model, tok = O.load_model("llama-3.2-3b-instruct", device="cuda", dtype="fp32", random_init=True)
    prompts = [O.chat(tok, " ".join(f"w{i + j}" for j in range(10 + 3 * i))) for i in range(10, 26)]
    a, b = (_greedy(model, tok, prompts, 32, e) for e in ENGINES)
    assert sum(x.ids == y.ids for x, y in zip(a, b)) >= 14
    del model
    torch.cuda.empty_cache()
    rows = bench.main(["--device", "cuda", "--smoke"])
    assert all(r["tokens_per_s"] > 0 and r["peak_gib"] > 0 for r in rows if "tokens" in r)
