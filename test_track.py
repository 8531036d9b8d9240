"""Tests of what a run leaves for reading it later: the configs/ files (each parses and starts), the student's
solutions in solutions.jsonl.gz (written one gzip member a step, traceable to each reward, cut on resume),
--report_to tensorboard and wandb (offline; skipped where the package is missing), and the step line's
elapsed time and estimate. One real two-step tiny run, started from a configs/ file, is shared."""
import contextlib
import glob
import gzip
import io
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

import opensir as O
import runs
from conftest import HERE

CONFIGS = sorted(glob.glob(os.path.join(HERE, "configs", "*.json")))
SMALL = ["--model", "tiny", "--steps", "2", "--rounds_per_step", "1", "--teacher_max_new_tokens", "48",
         "--student_max_new_tokens", "32"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A real two-step tiny run from the no-diversity ablation's file, tracked to TensorBoard: (out, stdout)."""
    pytest.importorskip("tensorboard")
    out = str(tmp_path_factory.mktemp("track") / "run")
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        O.main(["--config", os.path.join(HERE, "configs", "paper-llama-3.2-3b-instruct-no-diversity.json"),
                *SMALL, "--out", out, "--report_to", "tensorboard"])
    return out, text.getvalue()


# ------------------------------------------------------------------------------------------------
# configs/: the paper's runs and ablations as files
# ------------------------------------------------------------------------------------------------

def test_the_shipped_configs_are_the_papers_runs():
    names = {os.path.basename(p)[:-5]: json.load(open(p)) for p in CONFIGS}
    llama = "paper-llama-3.2-3b-instruct"
    assert names["code-gemma-2-2b-it"]["model"] == "gemma-2-2b-it"
    assert {k: names[f"{llama}-{a}"][k] for a, k in [("no-diversity", "w_div"), ("frozen-teacher", "train_teacher"),
                                                      ("no-length", "w_len")]} == {"w_div": 0.0, "train_teacher": False,
                                                                                   "w_len": 0.0}
    assert (names[f"{llama}-band-lo-0.3"]["band_lo"], names[f"{llama}-band-lo-0.1"]["band_lo"]) == (0.3, 0.1)
    assert all(d["recipe"] == "paper" and d["model"] == "llama-3.2-3b-instruct" for n, d in names.items()
               if n.startswith("paper"))
    assert len({d["out"] for d in names.values()}) == len(names) == 8  # no two write into the same --out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_each_config_parses_and_starts_on_the_tiny_model(path):
    """Each file gives the Config it names, and with the model swapped for tiny the run's settings validate;
    one of them (the shared `tracked` run) trains for real."""
    values = json.load(open(path))
    cfg = O.config_from_args(["--config", path])
    assert all(getattr(cfg, k) == v for k, v in values.items())
    assert cfg.select_scope == O.RECIPES[cfg.recipe]["select_scope"]  # the recipe applies under the file
    small = O.config_from_args(["--config", path, *SMALL, "--out", "x"])
    assert (small.model, small.steps, small.out) == ("tiny", 2, "x")  # typed flags win over the file
    assert all(getattr(small, k) == v for k, v in values.items() if k not in ("model", "out"))


def test_a_config_file_starts_a_real_run(tracked):
    out, _ = tracked
    saved = json.load(open(os.path.join(out, "config.json")))
    assert (saved["recipe"], saved["w_div"], saved["model"], saved["steps"]) == ("paper", 0.0, "tiny", 2)
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]
    assert all(json.loads(line)["teacher/diversity"] == 0.0 for line in open(os.path.join(out, "metrics.jsonl")))


# ------------------------------------------------------------------------------------------------
# solutions.jsonl.gz
# ------------------------------------------------------------------------------------------------

def test_solutions_hold_every_legal_problem_and_trace_each_reward(tracked):
    out, _ = tracked
    cfg = O.Config(**json.load(open(os.path.join(out, "config.json"))))
    rows = runs.read_solutions(os.path.join(out, runs.SOLUTIONS))
    problems = [json.loads(line) for line in open(os.path.join(out, "problems.jsonl"))]
    legal = [(p["step"], p["round"], p["problem"], p["majority"], p["answers"]) for p in problems if p["legal"]]
    assert legal and [(r["step"], r["round"], r["problem"], r["majority"], r["answers"]) for r in rows] == legal
    for r in rows:
        assert len(r["solutions"]) == len(r["student_rewards"]) == cfg.student_group
        assert all(isinstance(t, str) for t in r["solutions"])
        for text, answer, reward in zip(r["solutions"], r["answers"], r["student_rewards"]):  # R_S, by hand
            fmt = O.student_format_reward(text, cfg.student_format)
            assert reward == pytest.approx(cfg.w_correct * (answer is not None and answer == r["majority"])
                                           + cfg.w_student_format * fmt)
    # one gzip member a step
    members = list(runs.solution_members(os.path.join(out, runs.SOLUTIONS)))
    assert [{row["step"] for row in m} for _, m in members] == [{1}, {2}]
    assert gzip.decompress(open(os.path.join(out, runs.SOLUTIONS), "rb").read()).count(b"\n") == len(rows)


def row(step, text="x"):
    return {"step": step, "round": 0, "problem": f"p{step}", "majority": "1", "answers": ["1", None],
            "solutions": [text, "y"], "student_rewards": [1.1, 0.0]}


def test_solutions_cut_drops_later_steps_and_a_torn_member(tmp_path):
    path = str(tmp_path / runs.SOLUTIONS)
    runs.append_solutions(path, [row(1), row(1, "z")])
    runs.append_solutions(path, [])  # a step without a legal problem writes nothing
    runs.append_solutions(path, [row(2)])
    size2 = os.path.getsize(path)
    runs.append_solutions(path, [row(3)])
    with open(path, "ab") as f:  # a run killed while writing step 4
        f.write(gzip.compress(json.dumps(row(4)).encode(), mtime=0)[:25])
    assert [r["step"] for r in runs.read_solutions(path)] == [1, 1, 2, 3]  # the torn member is left out
    runs.cut_solutions(path, 2)
    assert os.path.getsize(path) == size2 and runs.read_solutions(path) == [row(1), row(1, "z"), row(2)]
    runs.cut_solutions(path, 5)
    assert os.path.getsize(path) == size2  # nothing later: untouched
    with open(path, "r+b") as f:  # bytes that are not gzip: refused, nothing cut
        f.seek(size2 // 2)
        f.write(b"not gzip at all")
    with pytest.raises(SystemExit, match="is damaged"):
        runs.cut_solutions(path, 1)


def test_resume_cuts_the_solutions_after_the_checkpoint(tracked, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(tracked[0], out, ignore=shutil.ignore_patterns(".lock"))
    path = os.path.join(out, runs.SOLUTIONS)
    shutil.rmtree(os.path.join(out, "ckpt-00002"))
    kept = [r for r in runs.read_solutions(path) if r["step"] == 1]
    cfg = O.config_from_args(["--config", os.path.join(out, "config.json"), "--resume_from", "ckpt-00001",
                              "--out", out, "--report_to", "none"])  # a run's own config.json, fed back
    assert runs.prepare_out(cfg) == os.path.join(out, "ckpt-00001")
    assert kept and runs.read_solutions(path) == kept


# ------------------------------------------------------------------------------------------------
# --report_to
# ------------------------------------------------------------------------------------------------

def test_tensorboard_events_read_back(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = tracked
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    acc = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"tensors": 0, "histograms": 0})
    acc.Reload()
    for key in ("loss", "teacher/reward", "student/reward", "pool"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([m[key] for m in metrics], rel=1e-6)
    assert "recipe" not in acc.Tags()["scalars"] and "solve_rate/hist10" not in acc.Tags()["scalars"]
    samples = acc.Tensors("samples/text_summary")
    assert [e.step for e in samples] == [1, 2]
    table = samples[0].tensor_proto.string_val[0].decode()
    first = runs.read_solutions(os.path.join(out, runs.SOLUTIONS))[0]
    assert table.startswith("| round | problem |") and first["problem"].replace("\n", "<br>") in table
    hists = [m["solve_rate/hist10"] for m in metrics]
    if any(sum(h) for h in hists):
        assert [e.histogram_value.num for e in acc.Histograms("solve_rate")] == [sum(h) for h in hists if sum(h)]


def test_wandb_offline_writes_its_run_and_leaves_the_generators_alone(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())
    tracker = runs.Tracker("wandb", str(tmp_path), 0, {"lr": 1e-5})
    tracker.log(1, {"step": 1, "loss": 0.5, "recipe": "code", "solve_rate/hist10": [0] * 5 + [2] + [0] * 4},
                [row(1), row(1, "z")])
    tracker.close()
    assert (random.getstate(), np.random.get_state()[1].tolist()) == before[:2]
    assert torch.equal(torch.get_rng_state(), before[2])
    runs_dirs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs_dirs) == 1 and glob.glob(os.path.join(runs_dirs[0], "run-*.wandb"))


def test_report_to_without_its_package_is_refused_before_anything_loads(tmp_path, monkeypatch):
    import cli
    monkeypatch.setitem(cli.TRACKER_PACKAGES, "wandb", "no_such_tracking_package")
    with pytest.raises(SystemExit, match="--report_to wandb needs the no_such_tracking_package package.*"
                                         "pip install -r requirements-track.txt"):
        O.main(["--model", "tiny", "--report_to", "wandb", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit, match="--report_to must be one of none, tensorboard, wandb, got 'mlflow'"):
        O.config_from_args(["--report_to", "mlflow"])


# ------------------------------------------------------------------------------------------------
# the step line: elapsed time and the estimate for the whole run
# ------------------------------------------------------------------------------------------------

def test_eta_is_the_mean_step_time_times_the_steps_left():
    assert runs.eta(65.4, [10.0, 20.0], 3) == "0:01:05 elapsed, ~0:00:45 left"
    assert runs.eta(3725, [1800.0], 2) == "1:02:05 elapsed, ~1:00:00 left"
    assert runs.eta(0, [], 5) == "0:00:00 elapsed, ~0:00:00 left"


def test_the_step_line_shows_elapsed_and_left(tracked):
    lines = [line for line in tracked[1].replace("\r", "\n").splitlines() if line.startswith("step ")]
    assert len(lines) == 2
    assert all(" elapsed, ~" in line and line.endswith(" left") for line in lines)
    assert lines[1].endswith("~0:00:00 left")  # the last step: nothing left
