"""Tests of parallel.py: several processes give what one process gives. Real `torchrun` launches (gloo on
the CPU) of opensir.py and eval.py on the tiny model, compared with one process; --fsdp, which shards the
training state over the ranks; and the refusals before any model loads. Small settings: two rounds a step
(one per rank), two references of four teacher samples, four student solutions."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as ev
import opensir as O
import parallel
from conftest import HERE, metrics, pool, rows, torchrun, weights

# --engine generate: each sequence samples its own seeded stream there, so rollouts do not depend on which rank
# batches them (the continuous engine seeds per call; README, torchrun)
BASE = ["--model", "tiny", "--rounds_per_step", "2", "--n_refs", "2", "--teacher_group", "4", "--student_group", "4",
        "--seed", "3", "--engine", "generate"]
ARGS = BASE + ["--init_pool_size", "2", "--init_pool_max_rounds", "1"]  # recipe code grows a starting pool


def test_dist_env_without_torchrun_is_one_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert parallel.dist_env() == (0, 1) and parallel.rank() == 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parallel.dist_env() == (1, 4)


def test_exit_process_returns_with_one_process(monkeypatch):
    """Outside torchrun exit_process is a no-op (under torchrun every launch below must still exit 0)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parallel.exit_process(3) is None


@pytest.mark.parametrize("status, code, said", [("None", 0, ""), ("130", 130, ""), ("'stop: why'", 1, "stop: why")])
def test_exit_process_under_torchrun_keeps_the_status(status, code, said):
    """Under torchrun (WORLD_SIZE > 1) it exits at once with SystemExit's meaning of the status, printed
    output flushed first."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1"}
    proc = subprocess.run([sys.executable, "-c", f"import parallel; print('done'); parallel.exit_process({status}); "
                           "raise SystemExit(99)"], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr.strip()) == (code, "done\n", said)


# ------------------------------------------------------------------------------------------------
# several processes: rounds shared out over the ranks
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    """one: 1 process, 2 steps, uninterrupted. two: 2 processes, 1 step (a checkpoint), then resumed on 2
    processes to step 2. two1: the same step-1 checkpoint resumed on 1 process. (Each torchrun launch
    costs ~10 s of start-up on a busy 2-core machine, so the tests share these runs.)"""
    d = tmp_path_factory.mktemp("dist")
    out = {k: str(d / k) for k in ("one", "two", "two1")}
    O.main(ARGS + ["--steps", "2", "--out", out["one"]])
    log_two = torchrun(2, "opensir.py", ARGS + ["--steps", "1", "--out", out["two"]])
    shutil.copytree(out["two"], out["two1"], ignore=shutil.ignore_patterns(".lock"))
    log_resume = torchrun(2, "opensir.py", ARGS + ["--steps", "2", "--resume", "--out", out["two"]])
    O.main(ARGS + ["--steps", "2", "--resume", "--out", out["two1"]])
    return out, log_two + log_resume, log_resume


def test_two_processes_give_the_rollouts_pool_and_weights_of_one(dist_runs):
    """2 processes (with a checkpoint and a resume after step 1) against 1 process, uninterrupted."""
    out, log_two, _ = dist_runs
    one, two = out["one"], out["two"]
    assert rows(os.path.join(one, "problems.jsonl")) == rows(os.path.join(two, "problems.jsonl"))
    assert len({r["round"] for r in rows(os.path.join(two, "problems.jsonl"))}) == 2  # both ranks' rounds are logged
    assert rows(os.path.join(one, "init_pool.jsonl")) == rows(os.path.join(two, "init_pool.jsonl"))
    p1, p2 = pool(os.path.join(one, "ckpt-00002")), pool(os.path.join(two, "ckpt-00002"))
    assert p1["problems"] == p2["problems"] and p1["concepts"] == p2["concepts"]
    assert torch.equal(p1["embeddings"], p2["embeddings"])
    # same loss, KL and gradient norm: the ranks' statistics are summed, the gradient is the whole step's
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m2] == [1, 2]
    for a, b in zip(m1, m2):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == (pytest.approx(b[k], rel=1e-4, abs=1e-7) if isinstance(b[k], float) else b[k]), k
    # weights: equal up to float summation order, far closer than one step moves them
    w0, w1, w2 = weights(os.path.join(one, "ckpt-00001")), weights(os.path.join(one, "ckpt-00002")), weights(os.path.join(two, "ckpt-00002"))
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved > 1e-6 and diff < 0.05 * moved, (moved, diff)
    # every checkpoint compared the ranks' pools and weights (a difference stops the run)
    assert log_two.count("identical on all 2 ranks") == 2


def test_step_scope_selection_is_the_same_on_two_processes(tmp_path):
    """Recipe paper selects over the whole step (top groups of all ranks' rounds) and normalises the loss
    over all of the step's tokens: 2 processes choose and train what 1 process does."""
    args = BASE + ["--recipe", "paper", "--steps", "1", "--seed", "5"]  # from the seed problem; both rounds train
    O.main(args + ["--out", str(tmp_path / "one")])
    torchrun(2, "opensir.py", args + ["--out", str(tmp_path / "two")])
    one, two = rows(tmp_path / "one" / "problems.jsonl"), rows(tmp_path / "two" / "problems.jsonl")
    assert one == two and {r["round"] for r in two if r["trained_as_teacher"]} == {0, 1}
    (a,), (b,) = metrics(str(tmp_path / "one")), metrics(str(tmp_path / "two"))
    for k in ("loss", "grad_norm", "train/teacher_seqs", "train/student_seqs"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k


def test_resume_on_two_processes_continues_the_run(dist_runs):
    """The 2-process run was stopped after step 1 and resumed on 2 processes; the test above finds its
    rollouts, pool and weights equal to the uninterrupted run's. Here: it resumed, and redid no step."""
    out, _, log_resume = dist_runs
    assert f"resumed from {os.path.join(out['two'], 'ckpt-00001')} at step 1" in log_resume
    assert "step 1/2" not in log_resume and "step 2/2" in log_resume
    assert [m["step"] for m in metrics(out["two"])] == [1, 2]


def test_resume_on_another_number_of_processes(dist_runs):
    """Nothing in a checkpoint depends on N (each round is seeded from (seed, step, round)), so a run
    saved by 2 processes continues on 1 exactly as the 1-process run went on."""
    out, _, _ = dist_runs
    assert rows(os.path.join(out["two1"], "problems.jsonl")) == rows(os.path.join(out["one"], "problems.jsonl"))
    p1, p2 = pool(os.path.join(out["two1"], "ckpt-00002")), pool(os.path.join(out["one"], "ckpt-00002"))
    assert p1["problems"] == p2["problems"] and torch.equal(p1["embeddings"], p2["embeddings"])


def test_rounds_not_divisible_by_the_processes_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--rounds_per_step 3 cannot be shared out over 2 processes.*--nproc_per_node"):
        O.main(["--model", "tiny", "--rounds_per_step", "3", "--out", str(out)])
    assert not out.exists()  # refused before --out, the lock or any model


def test_eval_on_two_processes_writes_the_single_process_samples(tmp_path):
    d = tmp_path / "data"
    os.makedirs(d)
    problems = ["What is 2+3?", "Tom has 3 apples and buys 4 more. How many apples?", "What is 10 minus 12?"]
    with open(d / "gsm8k.jsonl", "w") as f:
        f.writelines(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in zip(problems, [5, 7, -2]))
    base = ["--model", "tiny", "--data-dir", str(d), "--benchmarks", "gsm8k", "--samples", "3", "--batch-size", "2",
            "--max-new-tokens", "16", "--device", "cpu", "--no-download"]  # 9 samples: 5 chunks, 3 waves on 2 ranks
    one = ev.main(base + ["--out", str(tmp_path / "one")])
    torchrun(2, "eval.py", base + ["--out", str(tmp_path / "two")])
    assert rows(tmp_path / "one" / "samples.jsonl") == rows(tmp_path / "two" / "samples.jsonl")
    assert len(rows(tmp_path / "two" / "samples.jsonl")) == 9
    with open(tmp_path / "two" / "summary.json") as f:
        assert json.load(f) == json.loads(json.dumps(one))


def test_ranks_started_with_different_flags_are_refused(tmp_path):
    """Nodes started with other flags stop at once, before any model loads, saying so."""
    script = tmp_path / "launch.py"  # rank 1 gets one more flag than rank 0
    script.write_text(f"import os, sys\nsys.path.insert(0, {HERE!r})\nimport opensir\n"
                      "opensir.main(sys.argv[1:] + (['--lr', '0.5'] if os.environ['RANK'] == '1' else []))\n")
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), "--model", "tiny", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "ranks [1] were started with a config other than rank 0's" in proc.stdout + proc.stderr
    assert "parameters on" not in proc.stdout  # no model was loaded


# ------------------------------------------------------------------------------------------------
# --fsdp: FSDP2 shards the training state over the ranks. The tiny model ties its lm_head to its
# embedding, so the whole-per-rank part (embedding, norm) and the sharded decoder layers are both exercised.
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fsdp_runs(dist_runs, tmp_path_factory):
    """one: dist_runs' 1 process, 2 steps. fsdp: 2 processes with --fsdp, 1 step (a checkpoint), then
    resumed with --fsdp on 2 processes to step 2."""
    d = tmp_path_factory.mktemp("fsdp")
    one, fsdp = dist_runs[0]["one"], str(d / "fsdp")
    log = torchrun(2, "opensir.py", ARGS + ["--fsdp", "--steps", "1", "--out", fsdp])
    log += torchrun(2, "opensir.py", ARGS + ["--fsdp", "--steps", "2", "--resume", "--out", fsdp])
    return one, fsdp, log


def test_fsdp_on_two_processes_trains_what_one_process_trains(fsdp_runs):
    one, fsdp, log = fsdp_runs
    assert rows(os.path.join(one, "problems.jsonl")) == rows(os.path.join(fsdp, "problems.jsonl"))
    assert pool(os.path.join(one, "ckpt-00002"))["problems"] == pool(os.path.join(fsdp, "ckpt-00002"))["problems"]
    for a, b in zip(metrics(one), metrics(fsdp)):  # same loss, KL, and the clip saw the whole model's norm
        for k in ("loss", "kl", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k
    # the checkpoint (rank 0's gathered state dict) loads with plain transformers and equals one process's
    w0, w1, w2 = (weights(os.path.join(d, c)) for d, c in ((one, "ckpt-00001"), (one, "ckpt-00002"), (fsdp, "ckpt-00002")))
    assert w1.keys() == w2.keys()
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved > 1e-6 and diff < 0.05 * moved, (moved, diff)
    assert "resumed from" in log and log.count("identical on all 2 ranks") == 2


def test_fsdp_optimizer_state_is_whole(fsdp_runs):
    """optimizer.pt holds every parameter's AdamW moments, full size (a resume reshards it for any N)."""
    _, fsdp, _ = fsdp_runs
    opt = torch.load(os.path.join(fsdp, "ckpt-00002", "optimizer.pt"), weights_only=False)
    w = weights(os.path.join(fsdp, "ckpt-00002"))
    shapes = {k: v["exp_avg"].shape for k, v in opt["state"].items()}
    assert set(shapes) == set(w) - {"lm_head.weight"}  # every parameter (the tied lm_head is the embedding)
    assert all(w[k].shape == s for k, s in shapes.items())


def test_fsdp_without_torchrun_refused_before_loading(tmp_path, monkeypatch):
    for k in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--fsdp .*torchrun --nproc_per_node N"):
        O.main(["--model", "tiny", "--fsdp", "--out", str(out)])
    assert not out.exists()
