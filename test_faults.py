"""Faults a user meets (issue 7, D1 to D9 and the minor items): each reproduced, and each must end in a
clear sentence, before any model loads where the input allows it, with nothing lost or overwritten.
One real two-step tiny run is shared; most checks fail before a model would load."""
import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import eval as ev
import opensir as O

HERE = os.path.dirname(os.path.abspath(O.__file__))
FAST = ["--rounds_per_step", "1", "--init_pool_size", "0"]


def files(d):
    """Every file under d with its bytes (the lock file aside): what 'nothing lost or overwritten' compares."""
    out = {}
    for root, _, names in os.walk(d):
        for n in set(names) - {".lock"}:
            p = os.path.join(root, n)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def steps(path):
    return [json.loads(line)["step"] for line in open(path)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished two-step tiny run: ckpt-00001 (state, no optimizer), ckpt-00002 (complete), logs."""
    out = str(tmp_path_factory.mktemp("base") / "run")
    O.main(["--model", "tiny", "--steps", "2", "--out", out, *FAST])
    return out


@pytest.fixture
def copy(run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".lock"))
    return out


# ------------------------------------------------------------------------------------------------
# D6, D7 and the flag checks: refused before --out is touched or a model loads
# ------------------------------------------------------------------------------------------------

FLOATS = [f.name for f in dataclasses.fields(O.Config) if f.type == "float"]


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_must_be_finite(name, value):
    with pytest.raises(ValueError, match=f"--{name} must be a finite number"):
        O.Config(**{name: value}).validate()


@pytest.mark.parametrize("flags, msg", [
    (["--lr", "nan"], "--lr must be a finite"),
    (["--temperature", "nan"], "--temperature must be a finite"),
    (["--w_div", "nan"], "--w_div must be a finite"),
    (["--seed", "-1"], "--seed must be in"),
    (["--seed_problem", "  "], "--seed_problem is blank"),
])
def test_bad_flags_refused_before_out_is_created(tmp_path, flags, msg):
    out = tmp_path / "x"
    with pytest.raises(SystemExit, match=msg):
        O.main(["--model", "tiny", "--out", str(out), *flags])
    assert not out.exists()


@pytest.mark.parametrize("text, msg", [
    ('{"problem": "What is 2+2?"}\n{"problem": "What is 3+\n', "line 2: not valid JSON"),
    ('{"problem": "What is 2+2?"}\n\n["What is 3+3?"]\n', 'line 3: expected a JSON object with a non-blank "problem"'),
    ('{"problem": "   "}\n', 'line 1: expected a JSON object with a non-blank "problem"'),
    ('{"problem": "What is 2+2?", "concepts": "sums"}\n', 'line 1: "concepts" must be a list of strings'),
    ("", "holds no problems"),
    ("\n  \n", "holds no problems"),
])
def test_malformed_init_pool_refused_up_front_and_retry_works(tmp_path, text, msg):
    """D7: found before any model loads, with file and line; no config.json is left to refuse the retry."""
    pool, out = tmp_path / "pool.jsonl", tmp_path / "run"
    pool.write_text(text)
    with pytest.raises(SystemExit, match=msg) as err:
        O.main(["--model", "tiny", "--out", str(out), "--init_pool", str(pool)])
    assert str(pool) in str(err.value)
    assert not out.exists()
    pool.write_text('{"problem": "What is 2+2?", "concepts": ["addition"]}\n')  # fixed: now accepted
    assert O.read_init_pool(str(pool)) == [{"problem": "What is 2+2?", "concepts": ["addition"]}]
    O.Config(init_pool=str(pool)).validate()


def test_missing_init_pool(tmp_path):
    with pytest.raises(ValueError, match="cannot read it"):
        O.Config(init_pool=str(tmp_path / "nope.jsonl")).validate()


def test_out_that_is_a_file_or_unwritable_fails_before_loading(tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    with pytest.raises(SystemExit, match="is a file, not a directory"):
        O.main(["--model", "no-org/no-model", "--out", str(f)])
    assert f.read_text() == "keep me"
    with pytest.raises(SystemExit, match="cannot be written"):  # /proc refuses new directories, even to root
        O.main(["--model", "no-org/no-model", "--out", "/proc/opensir-test-out"])


# ------------------------------------------------------------------------------------------------
# D9: one run per --out
# ------------------------------------------------------------------------------------------------

def test_second_run_into_the_same_out_refuses_and_the_lock_ends_with_the_run(tmp_path):
    """D9, and Ctrl-C once the newest step is already saved says so."""
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-u", "opensir.py", "--model", "tiny", "--steps", "50", "--out", out,
                             *FAST], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 120
        while True:  # wait until the other run holds the lock
            assert proc.poll() is None and time.time() < deadline, "the first run never took its lock"
            if os.path.exists(os.path.join(out, ".lock")):
                with open(os.path.join(out, ".lock")) as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        fcntl.flock(f, fcntl.LOCK_UN)
                    except BlockingIOError:
                        break
            time.sleep(0.05)
        before = files(out)
        t0 = time.time()
        with pytest.raises(SystemExit, match="another run is writing to"):
            O.main(["--model", "tiny", "--steps", "50", "--out", out, *FAST])
        assert time.time() - t0 < 5 and files(out) == before
        while not os.path.exists(os.path.join(out, "ckpt-00001", "state.pt")):  # step 1 saved (save_every 1)
            assert proc.poll() is None and time.time() < deadline, "step 1 was never saved"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # in step 2's rollouts: nothing new to save
        printed = proc.communicate(timeout=120)[0]
        assert proc.returncode == 130, printed
        assert f"interrupted: step 1 is already saved in {os.path.join(out, 'ckpt-00001')}" in printed
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    O.lock_out(out)  # the lock went with the process: none is left stale


# ------------------------------------------------------------------------------------------------
# D1, D2 and damaged files: resume refuses or repairs, never starts over
# ------------------------------------------------------------------------------------------------

def test_torn_last_log_lines_are_dropped_on_resume(copy, capsys):
    """D1: a kill or full disk during an append leaves half a line; --resume drops it with a warning."""
    metrics, problems = os.path.join(copy, "metrics.jsonl"), os.path.join(copy, "problems.jsonl")
    good_m, good_p = open(metrics).read(), open(problems).read()
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 0.1')
    with open(problems, "a") as f:
        f.write('{"step": 3, "rou')
    O.main(["--model", "tiny", "--steps", "2", "--resume", "--out", copy, *FAST])  # nothing left to run
    out = capsys.readouterr().out
    assert "metrics.jsonl, line 3: torn last line" in out and "problems.jsonl" in out
    assert open(metrics).read() == good_m and open(problems).read() == good_p


@pytest.mark.parametrize("text, kept", [
    ('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st', '{"step": 1}\n{"step": 2}\n'),  # torn, and a later step
    ('{"step": 1}\n{"step": 2}', '{"step": 1}\n{"step": 2}\n'),  # cut just before the newline
    ('', ''),
])
def test_log_cut_on_resume(tmp_path, text, kept):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    O._scan_log(str(path), keep_to=2)
    assert path.read_text() == kept


def test_torn_line_in_the_middle_is_an_error_naming_file_and_line(copy):
    metrics = os.path.join(copy, "metrics.jsonl")
    lines = open(metrics).readlines()
    lines[0] = lines[0][:40] + "\n"
    open(metrics, "w").writelines(lines)
    before = files(copy)
    with pytest.raises(SystemExit, match=r"metrics.jsonl, line 1: not a valid log line"):
        O.main(["--model", "tiny", "--steps", "3", "--resume", "--out", copy, *FAST])
    assert files(copy) == before


@pytest.mark.parametrize("damage", ["delete state.pt", "delete the checkpoint"])
def test_resume_with_the_newest_checkpoint_damaged_refuses(copy, damage):
    """D2: no silent start from step 0; what was found and the explicit way on are in the message."""
    if damage == "delete state.pt":
        os.remove(os.path.join(copy, "ckpt-00002", "state.pt"))
    else:
        shutil.rmtree(os.path.join(copy, "ckpt-00002"))
    before = files(copy)
    with pytest.raises(SystemExit) as err:
        O.main(["--model", "tiny", "--steps", "3", "--resume", "--out", copy, *FAST])
    msg = str(err.value)
    assert "steps logged up to 2" in msg and f"--resume_from {os.path.join(copy, 'ckpt-00001')}" in msg
    assert ("no state.pt" if damage == "delete state.pt" else "no optimizer.pt") in msg
    assert files(copy) == before  # logs and checkpoints untouched


def test_resume_from_an_older_checkpoint_when_asked(copy, capsys):
    os.remove(os.path.join(copy, "ckpt-00002", "state.pt"))
    O.main(["--model", "tiny", "--steps", "2", "--resume_from", os.path.join(copy, "ckpt-00001"), "--out", copy, *FAST])
    out = capsys.readouterr().out
    assert "resumed from" in out and "AdamW restarts from zero moments" in out
    aside = os.path.join(copy, "ckpt-00002.before-resume-from-00001")
    assert os.path.exists(os.path.join(aside, "model.safetensors"))  # moved aside, not overwritten
    assert steps(os.path.join(copy, "metrics.jsonl")) == [1, 2]
    assert O.latest_checkpoint(copy) == os.path.join(copy, "ckpt-00002")


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_logs_without_any_checkpoint_are_never_truncated(copy, resume):
    """Steps logged (and a grown pool) but every checkpoint gone: no silent start from step 0."""
    for d in O.checkpoints(copy):
        shutil.rmtree(d)
    with open(os.path.join(copy, "init_pool.jsonl"), "w") as f:
        f.write(json.dumps({"problem": "What is 2+2?", "concepts": []}) + "\n")
    before = files(copy)
    with pytest.raises(SystemExit, match="no checkpoint to resume from.*choose another --out.*--init_pool"):
        O.main(["--model", "tiny", "--steps", "2", "--out", copy, *FAST, *resume])
    assert files(copy) == before


def test_fresh_start_into_a_run_without_config_json_refuses(copy):
    os.remove(os.path.join(copy, "config.json"))
    before = files(copy)
    with pytest.raises(SystemExit, match="already holds a run"):
        O.main(["--model", "tiny", "--steps", "2", "--out", copy, *FAST])
    assert files(copy) == before


@pytest.mark.parametrize("name", ["state.pt", "optimizer.pt"])
def test_damaged_checkpoint_file_names_its_path(copy, name):
    path = os.path.join(copy, "ckpt-00002", name)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(SystemExit, match="is damaged or unreadable") as err:
        O.main(["--model", "tiny", "--steps", "2", "--resume", "--out", copy, *FAST])
    assert path in str(err.value) and "--resume_from" in str(err.value)


def test_damaged_weights_name_the_checkpoint(copy):
    ckpt = os.path.join(copy, "ckpt-00002")
    with open(os.path.join(ckpt, "model.safetensors"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(OSError, match="(?s)could not load .*ckpt-00002.*damaged"):
        O.load_model(ckpt, device="cpu")


def test_disk_full_during_a_save_removes_the_half_checkpoint(run, tmp_path):
    """A real ENOSPC: the optimizer file is /dev/full. The error says so; no half checkpoint stays."""
    import torch
    model, tok = O.load_model(os.path.join(run, "ckpt-00002"), device="cpu")
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "ckpt-00003"))
    os.symlink("/dev/full", os.path.join(out, "ckpt-00003", "optimizer.pt"))
    with pytest.raises(OSError, match="could not save checkpoint .*ckpt-00003 .disk full") as err:
        O.save_checkpoint(out, 3, model, tok, opt, sched, O.Pool(["p"], [[]]), O.rng_state(), O.Config())
    assert err.value.errno == errno.ENOSPC
    assert not os.path.exists(os.path.join(out, "ckpt-00003"))


def test_disk_full_during_a_run_says_so_in_one_sentence(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.symlink("/dev/full", out / "problems.jsonl")  # the first step's append hits a real ENOSPC
    with pytest.raises(SystemExit, match=r"disk full while writing .*No space left on device.*--resume"):
        O.main(["--model", "tiny", "--steps", "1", "--out", str(out), *FAST])


def test_fresh_start_after_an_interrupted_start_is_not_blocked(tmp_path, capsys):
    """A run stopped before its first step (config.json written, nothing else) blocks nothing."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": "other"}))
    assert O.prepare_out(O.Config(out=str(out))) is None
    assert "stopped before its first step" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# eval.py: D5, D8 and the minor items
# ------------------------------------------------------------------------------------------------

GSM = [{"question": "What is 1+1?", "answer": "#### 2"}, {"question": "What is 2+2?", "answer": "#### 4"}]


def data_dir(tmp_path, rows=GSM):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    (d / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def eval_exit(argv):
    with pytest.raises(SystemExit) as err:
        ev.main(argv)
    return str(err.value.code)


def test_eval_of_a_run_directory_uses_its_newest_checkpoint_and_the_runs_budget(run, tmp_path):
    """D5, and: an eval killed before its first sample (settings.json, empty samples.jsonl) does not
    block a rerun with other settings; a tiny run's checkpoint gets the tiny run's token budget."""
    out = tmp_path / "ev"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"model": "x", "temperature": 1.0}))
    (out / "samples.jsonl").write_text("")
    summary = ev.main(["--model", run, "--data-dir", data_dir(tmp_path), "--benchmarks", "gsm8k", "--n", "1",
                       "--limit", "1", "--out", str(out), "--device", "cpu", "--no-download"])
    assert summary["settings"]["model"] == os.path.join(run, "ckpt-00002")
    assert summary["settings"]["max_new_tokens"] == json.load(open(os.path.join(run, "config.json")))["student_max_new_tokens"]
    assert summary["benchmarks"]["gsm8k"]["samples"] == 1


def test_eval_of_a_run_without_a_complete_checkpoint(copy, tmp_path):
    for d in O.checkpoints(copy):
        os.remove(os.path.join(d, "state.pt"))
    assert "no complete checkpoint" in eval_exit(["--model", copy, "--data-dir", data_dir(tmp_path)])


def test_empty_benchmark_file_is_an_error_before_loading(tmp_path):
    """D8: not a 0 averaged into the headline."""
    d = data_dir(tmp_path, rows=[])
    msg = eval_exit(["--model", "tiny", "--data-dir", d, "--benchmarks", "gsm8k", "--out", str(tmp_path / "o")])
    assert "gsm8k.jsonl holds no problems" in msg and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, msg", [(["--limit", "0"], "--limit must be >= 1"),
                                        (["--temperature", "nan"], "finite --temperature")])
def test_eval_flag_checks(tmp_path, flags, msg):
    assert msg in eval_exit(["--model", "tiny", "--data-dir", data_dir(tmp_path), "--benchmarks", "gsm8k", *flags])


def test_compare_warns_when_benchmarks_or_settings_differ(tmp_path, capsys):
    def summary(scores, problems, temperature):
        return {"settings": {"model": "m", "temperature": temperature, "n": 16},
                "benchmarks": {b: {"score": s, "se": 1.0, "problems": problems} for b, s in scores.items()},
                "average": {"score": sum(scores.values()) / len(scores), "se": 0.5}}
    (tmp_path / "a.json").write_text(json.dumps(summary({"gsm8k": 40.0, "math500": 20.0}, 50, 0.6)))
    (tmp_path / "b.json").write_text(json.dumps(summary({"gsm8k": 45.0}, 10, 1.0)))
    (tmp_path / "c.json").write_text(json.dumps(summary({"gsm8k": 41.0, "math500": 21.0}, 50, 0.6)))
    ev.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert "only in A: ['math500']" in err and "gsm8k (50 vs 10)" in err and "temperature 0.6 vs 1.0" in err
    ev.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    assert "warning" not in capsys.readouterr().err


def test_offline_hub_id_fails_fast_in_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.time()
    msg = eval_exit(["--model", "no-org/no-such-model", "--data-dir", data_dir(tmp_path), "--benchmarks", "gsm8k",
                     "--out", str(tmp_path / "o")])
    assert "nor in the local hub cache, and HF_HUB_OFFLINE is set" in msg and "\n" not in msg
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        O.load_model("no-org/no-such-model", device="cpu")
    assert time.time() - t0 < 5
