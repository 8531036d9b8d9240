"""Tests of bench.py: both engines run and are timed in each mode, rounds alternate engines, the JSON
rows carry the fields the tables are made from. Timings are never compared (a shared machine)."""
import importlib.util
import json

import pytest
import torch

import bench
import opensir as O
from conftest import sample

ENGINES = ("generate", "continuous")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_generation_smoke_runs_both_engines():
    rows = bench.main(["--device", "cpu", "--smoke", "--threads", "1"])
    timed = [r for r in rows if "tokens" in r]
    assert {(r["engine"], r["phase"]) for r in timed} == {(e, p) for e in ENGINES for p in ("teacher", "student")}
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in timed)
    assert all(r["paper_hours_generation"] > 0 for r in rows if "paper_hours_generation" in r)


def test_step_mode_times_whole_steps_of_both_engines_on_the_tiny_model(tmp_path):
    out = tmp_path / "steps.json"
    rows = bench.main(["--mode", "step", "--device", "cpu", "--models", "tiny", "--threads", "1", "--rounds", "2",
                       "--warmup", "0", "--max_new_tokens", "6", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    per_engine = {r["engine"]: r for r in rows if "engine" in r}
    assert set(per_engine) == set(ENGINES)
    for r in per_engine.values():
        assert (r["model"], r["threads"], r["max_new_tokens"], r["completions"], r["rounds"]) == ("tiny", 1, 6, 128, 2)
        for key in ("step_s", "gen_s", "train_s", "completions_per_s", "gen_tokens_per_s"):
            assert r[key]["mean"] > 0 and r[key]["min"] <= r[key]["mean"] <= r[key]["max"] and r[key]["sd"] >= 0
        assert all(x["step_s"] >= x["gen_s"] > 0 and x["train_s"] > 0 for x in r["per_round"])
        assert 1 <= r["mean_len"] <= 6
    ratios = {r["ratio"]: r for r in rows if "ratio" in r}
    assert set(ratios) == {"generate/continuous step_s", "generate/continuous gen_s"}
    assert all(len(r["per_round"]) == 2 and r["mean"] > 0 for r in ratios.values())
    order = next(r for r in rows if "order" in r)
    assert order["order"] == ["generate", "continuous", "generate", "continuous"]  # alternating, in turn
    assert len(order["load_avg"]) == 2 and order["auto"] == "generate" and order["faster"] in ENGINES


def test_step_mode_warmup_is_untimed_and_engine_order_is_kept():
    rows = bench.main(["--mode", "step", "--device", "cpu", "--smoke", "--threads", "1", "--rounds", "1",
                       "--warmup", "1", "--engines", "continuous,generate"])
    assert next(r for r in rows if "order" in r)["order"] == ["continuous", "generate"]
    assert all(r["rounds"] == 1 for r in rows if "engine" in r)
    assert [r["ratio"] for r in rows if "ratio" in r] == ["continuous/generate step_s", "continuous/generate gen_s"]


def test_step_modes_are_cpu_only():
    with pytest.raises(SystemExit, match="CPU"):
        bench.main(["--mode", "step", "--device", "cuda", "--smoke"])


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed (pip install trl)")
def test_trl_mode_times_the_same_workload():
    rows = bench.main(["--mode", "trl", "--device", "cpu", "--smoke", "--threads", "1", "--rounds", "1",
                       "--warmup", "1"])
    (row,) = rows
    assert (row["engine"], row["completions"], row["rounds"]) == ("trl", 8, 1)
    assert row["step_s"]["mean"] >= row["gen_s"]["mean"] > 0


def test_auto_engine_takes_generate_on_cpu_and_says_why(monkeypatch):
    import engines
    small, reason = engines.auto_engine("cpu", 560_000, 48)  # the tiny model's shape
    assert small == "generate" and "0.6M parameters" in reason and "48 new tokens" in reason and "measured" in reason
    assert engines.auto_engine("cpu", 29_400_000, 256)[0] == "generate"
    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    assert engines.auto_engine("cuda", 3_000_000_000, 768)[0] == "generate"
    monkeypatch.setattr(engines, "vllm_available", lambda: True)
    assert engines.auto_engine("cuda", 3_000_000_000, 768)[0] == "vllm"


def _greedy(model, tok, prompts, n, engine):
    return sample(model, tok, prompts, n, 1.0, 50, 1.0, batch_size=64, engine=engine, greedy=True)


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


def test_calls_mode_times_two_calls_against_per_round_calls_and_kept_against_new_managers():
    rows = bench.main(["--mode", "calls", "--device", "cpu", "--smoke", "--threads", "1", "--rounds", "1"])
    variants = {r["variant"]: r for r in rows if "variant" in r}
    assert set(variants) == {"generate, two calls", "generate, a call per round", "continuous, kept manager",
                             "continuous, a manager per call"}
    assert all(r["seconds"]["mean"] > 0 and r["rounds"] == 2 for r in variants.values())
    ratios = [r for r in rows if "ratio" in r]
    assert len(ratios) == 2 and all(len(r["per_step"]) == 1 and r["mean"] > 0 for r in ratios)

