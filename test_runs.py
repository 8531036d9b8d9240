"""Tests of runs.py, through opensir.py's command line: the --out directory and its lock, the logs,
checkpoints, resume, Ctrl-C, and the faults a user meets (bad input files, damaged checkpoints, torn logs,
a full disk). Each must end in a clear sentence, before any model loads where the input allows it, with
nothing lost or overwritten. One real two-step tiny run (conftest's `run`) is shared."""
import copy
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval as ev
import opensir as O
import runs
from conftest import FAST_TINY, HERE, data_dir, eval_exit, files, params, rows

FAST = ["--rounds_per_step", "1", "--n_refs", "2", "--teacher_group", "4", "--student_group", "4",
        "--teacher_max_new_tokens", "24", "--student_max_new_tokens", "16", "--init_pool_size", "0",
        "--warmup_steps", "0", "--lr", "1e-3"]
TINY_FAST = ["--rounds_per_step", "2", "--init_pool_size", "2", "--init_pool_max_rounds", "2"]


def steps(path):
    return [json.loads(line)["step"] for line in open(path)]


# ------------------------------------------------------------------------------------------------
# input files and --out: refused before --out is touched or a model loads
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, msg", [
    ('{"problem": "What is 2+2?"}\n{"problem": "What is 3+\n', "line 2: not valid JSON"),
    ('{"problem": "What is 2+2?"}\n\n["What is 3+3?"]\n', 'line 3: expected a JSON object with a non-blank "problem"'),
    ('{"problem": "   "}\n', 'line 1: expected a JSON object with a non-blank "problem"'),
    ('{"problem": "What is 2+2?", "concepts": "sums"}\n', 'line 1: "concepts" must be a list of strings'),
    ("", "holds no problems"),
    ("\n  \n", "holds no problems"),
])
def test_malformed_init_pool_refused_up_front_and_retry_works(tmp_path, text, msg):
    """Found before any model loads, with file and line; no config.json is left to refuse the retry."""
    pool, out = tmp_path / "pool.jsonl", tmp_path / "run"
    pool.write_text(text)
    with pytest.raises(SystemExit, match=msg) as err:
        O.main(["--model", "tiny", "--out", str(out), "--init_pool", str(pool)])
    assert str(pool) in str(err.value)
    assert not out.exists()
    pool.write_text('{"problem": "What is 2+2?", "concepts": ["addition"]}\n')  # corrected: now accepted
    assert runs.read_init_pool(str(pool)) == [{"problem": "What is 2+2?", "concepts": ["addition"]}]
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
# a run: failed starts, config changes, resume and Ctrl-C
# ------------------------------------------------------------------------------------------------


def test_failed_start_leaves_out_reusable(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="unknown model"):
        O.main(["--model", "gemma2b", "--out", out])
    with pytest.raises(OSError, match="could not load"):  # a directory that holds no model
        os.makedirs(tmp_path / "empty")
        O.main(["--model", str(tmp_path / "empty"), "--out", out])
    assert not os.path.exists(os.path.join(out, "config.json"))


def test_out_with_a_different_config_is_refused(small_dir, tmp_path):
    out = str(tmp_path / "run")
    O.main(["--model", small_dir, "--out", out, "--steps", "1", *FAST])
    before = open(os.path.join(out, "config.json")).read()
    with pytest.raises(SystemExit, match="already holds a run"):
        O.main(["--model", small_dir, "--out", out, "--steps", "1", *FAST])
    with pytest.raises(SystemExit, match="different config"):
        O.main(["--model", small_dir, "--out", out, "--steps", "2", "--resume", *FAST, "--band_hi", "0.8"])
    assert open(os.path.join(out, "config.json")).read() == before


def test_resume_equals_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    O.main(["--model", "tiny", "--steps", "2", "--out", a, *TINY_FAST])
    O.main(["--model", "tiny", "--steps", "1", "--out", b, *TINY_FAST])
    O.main(["--model", "tiny", "--steps", "2", "--out", b, "--resume", *TINY_FAST])
    pa, pb = rows(os.path.join(a, "problems.jsonl")), rows(os.path.join(b, "problems.jsonl"))
    assert pa == pb  # every generated problem, reward and answer of both steps
    ma, mb = rows(os.path.join(a, "metrics.jsonl")), rows(os.path.join(b, "metrics.jsonl"))
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("sec/", "tok_per_sec/", "peak_mem"))}  # noqa: E731
    assert [strip(r) for r in ma] == [strip(r) for r in mb]
    wa, wb = params(os.path.join(a, "ckpt-00002")), params(os.path.join(b, "ckpt-00002"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-u", "opensir.py", "--model", "tiny", "--steps", "50", "--save_every", "100",
           "--out", out, *TINY_FAST]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait for the first step to finish, then interrupt the second
        lines.append(line)
        if line.startswith("step 1/50"):
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted: saving step 1" in rest and "saved " in rest and "continue with --resume" in rest
    assert os.path.exists(os.path.join(out, "ckpt-00001", "state.pt"))
    assert [r["step"] for r in rows(os.path.join(out, "metrics.jsonl"))] == [1]
    O.main(["--model", "tiny", "--steps", "2", "--save_every", "100", "--out", out, "--resume", *TINY_FAST])
    assert [r["step"] for r in rows(os.path.join(out, "metrics.jsonl"))] == [1, 2]


# ------------------------------------------------------------------------------------------------
# one run per --out: the lock
# ------------------------------------------------------------------------------------------------

def test_second_run_into_the_same_out_refuses_and_the_lock_ends_with_the_run(tmp_path):
    """A second run into a locked --out refuses at once; the lock ends with its run; and Ctrl-C once the
    newest step is already saved says so."""
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-u", "opensir.py", "--model", "tiny", "--steps", "50", "--out", out,
                             *FAST_TINY], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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
            O.main(["--model", "tiny", "--steps", "50", "--out", out, *FAST_TINY])
        assert time.time() - t0 < 5 and files(out) == before
        while not os.path.exists(os.path.join(out, "ckpt-00001", "state.pt")):  # step 1 saved (save_every 1)
            assert proc.poll() is None and time.time() < deadline, "step 1 was never saved"
            time.sleep(0.05)
        time.sleep(0.3)  # the save is done
        proc.send_signal(signal.SIGINT)  # in step 2's rollouts: nothing new to save
        printed = proc.communicate(timeout=120)[0]
        assert proc.returncode == 130, printed
        assert f"interrupted: step 1 is already saved in {os.path.join(out, 'ckpt-00001')}" in printed
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    runs.lock_out(out)  # the lock went with the process: none is left stale


# ------------------------------------------------------------------------------------------------
# resume: torn logs, damaged checkpoints; resume refuses or repairs, never starts over
# ------------------------------------------------------------------------------------------------

def test_torn_last_log_lines_are_dropped_on_resume(copy, capsys):
    """A kill or full disk during an append leaves half a line; --resume drops it with a warning."""
    metrics, problems = os.path.join(copy, "metrics.jsonl"), os.path.join(copy, "problems.jsonl")
    good_m, good_p = open(metrics).read(), open(problems).read()
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 0.1')
    with open(problems, "a") as f:
        f.write('{"step": 3, "rou')
    O.main(["--model", "tiny", "--steps", "2", "--resume", "--out", copy, *FAST_TINY])  # nothing left to run
    out = capsys.readouterr().out
    assert "metrics.jsonl, line 3: torn last line" in out and "problems.jsonl" in out
    assert open(metrics).read() == good_m and open(problems).read() == good_p


@pytest.mark.parametrize("text, kept", [
    ('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st', '{"step": 1}\n{"step": 2}\n'),  # torn, and a later step
    ('{"step": 1}\n{"step": 2}', '{"step": 1}\n{"step": 2}\n'),  # cut just before the newline
    ('', ''),
])
def test_log_cut_on_resume(copy, text, kept):
    """Resuming from step 2 cuts metrics.jsonl after the last line of step 2 (a torn line or a later step
    goes) and ends it with a newline, so the next append starts a line of its own."""
    path = os.path.join(copy, "metrics.jsonl")
    with open(path, "w") as f:
        f.write(text)
    cfg = O.config_from_args(["--model", "tiny", "--steps", "2", "--resume", "--out", copy, *FAST_TINY])
    assert runs.prepare_out(cfg) == os.path.join(copy, "ckpt-00002")
    assert open(path).read() == kept


def test_torn_line_in_the_middle_is_an_error_naming_file_and_line(copy):
    metrics = os.path.join(copy, "metrics.jsonl")
    lines = open(metrics).readlines()
    lines[0] = lines[0][:40] + "\n"
    open(metrics, "w").writelines(lines)
    before = files(copy)
    with pytest.raises(SystemExit, match=r"metrics.jsonl, line 1: not a valid log line"):
        O.main(["--model", "tiny", "--steps", "3", "--resume", "--out", copy, *FAST_TINY])
    assert files(copy) == before


@pytest.mark.parametrize("damage", ["delete state.pt", "delete the checkpoint"])
def test_resume_with_the_newest_checkpoint_damaged_refuses(copy, damage):
    """No silent start from step 0; what was found and the explicit way on are in the message."""
    if damage == "delete state.pt":
        os.remove(os.path.join(copy, "ckpt-00002", "state.pt"))
    else:
        shutil.rmtree(os.path.join(copy, "ckpt-00002"))
    before = files(copy)
    with pytest.raises(SystemExit) as err:
        O.main(["--model", "tiny", "--steps", "3", "--resume", "--out", copy, *FAST_TINY])
    msg = str(err.value)
    assert "steps logged up to 2" in msg and f"--resume_from {os.path.join(copy, 'ckpt-00001')}" in msg
    assert ("no state.pt" if damage == "delete state.pt" else "no optimizer.pt") in msg
    assert files(copy) == before  # logs and checkpoints untouched


def test_resume_from_an_older_checkpoint_when_asked(copy, capsys):
    os.remove(os.path.join(copy, "ckpt-00002", "state.pt"))
    O.main(["--model", "tiny", "--steps", "2", "--resume_from", os.path.join(copy, "ckpt-00001"), "--out", copy, *FAST_TINY])
    out = capsys.readouterr().out
    assert "resumed from" in out and "AdamW restarts from zero moments" in out
    aside = os.path.join(copy, "ckpt-00002.before-resume-from-00001")
    assert os.path.exists(os.path.join(aside, "model.safetensors"))  # moved aside, not overwritten
    assert steps(os.path.join(copy, "metrics.jsonl")) == [1, 2]
    assert runs.latest_checkpoint(copy) == os.path.join(copy, "ckpt-00002")


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_logs_without_any_checkpoint_are_never_truncated(copy, resume):
    """Steps logged (and a grown pool) but every checkpoint gone: no silent start from step 0."""
    for d in runs.checkpoints(copy):
        shutil.rmtree(d)
    with open(os.path.join(copy, "init_pool.jsonl"), "w") as f:
        f.write(json.dumps({"problem": "What is 2+2?", "concepts": []}) + "\n")
    before = files(copy)
    with pytest.raises(SystemExit, match="no checkpoint to resume from.*choose another --out.*--init_pool"):
        O.main(["--model", "tiny", "--steps", "2", "--out", copy, *FAST_TINY, *resume])
    assert files(copy) == before


def test_fresh_start_into_a_run_without_config_json_refuses(copy):
    os.remove(os.path.join(copy, "config.json"))
    before = files(copy)
    with pytest.raises(SystemExit, match="already holds a run"):
        O.main(["--model", "tiny", "--steps", "2", "--out", copy, *FAST_TINY])
    assert files(copy) == before


@pytest.mark.parametrize("name", ["state.pt", "optimizer.pt"])
def test_damaged_checkpoint_file_names_its_path(copy, name):
    path = os.path.join(copy, "ckpt-00002", name)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(SystemExit, match="is damaged or unreadable") as err:
        O.main(["--model", "tiny", "--steps", "2", "--resume", "--out", copy, *FAST_TINY])
    assert path in str(err.value) and "--resume_from" in str(err.value)


def _full_disk_for(monkeypatch, name):
    """runs.open_out gives /dev/full for files called `name`: a real ENOSPC when the write is flushed."""
    real = runs.open_out

    def open_out(path, mode="w"):
        return open("/dev/full", mode) if os.path.basename(path) == name else real(path, mode)
    monkeypatch.setattr(runs, "open_out", open_out)


def test_disk_full_during_a_save_removes_the_half_checkpoint(run, tmp_path, monkeypatch):
    """A real ENOSPC while optimizer.pt is written. The error says so; no half checkpoint stays."""
    model, tok = O.load_model(os.path.join(run, "ckpt-00002"), device="cpu")
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = str(tmp_path / "run")
    os.makedirs(out)
    _full_disk_for(monkeypatch, "optimizer.pt")
    with pytest.raises(OSError, match="could not save checkpoint .*ckpt-00003 .disk full") as err:
        runs.save_checkpoint(out, 3, model, tok, opt, sched, O.Pool(["p"], [[]]), runs.rng_state(), O.Config())
    assert err.value.errno == errno.ENOSPC
    assert not os.path.exists(os.path.join(out, "ckpt-00003"))


def test_a_failure_inside_the_weights_write_removes_the_half_checkpoint(run, tmp_path, monkeypatch):
    """safetensors raises its own error type, after writing part of the file: caught all the same."""
    import safetensors
    import transformers.modeling_utils
    model, tok = O.load_model(os.path.join(run, "ckpt-00002"), device="cpu")
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_written)  # what save_pretrained calls
    out = str(tmp_path / "run")
    os.makedirs(out)
    with pytest.raises(OSError, match="could not save checkpoint .*ckpt-00001"):
        runs.save_checkpoint(out, 1, model, tok, opt, sched, O.Pool(["p"], [[]]), runs.rng_state(), O.Config())
    assert not os.path.exists(os.path.join(out, "ckpt-00001"))


def test_disk_full_before_any_checkpoint_names_a_command_that_works(tmp_path, monkeypatch):
    """The first step's log append hits a real ENOSPC: no checkpoint exists, so the message does not offer
    --resume; the command it gives (move the logs aside) is run, and then the same command starts again."""
    out = tmp_path / "run"
    _full_disk_for(monkeypatch, "problems.jsonl")
    args = ["--model", "tiny", "--steps", "1", "--out", str(out), *FAST_TINY]
    with pytest.raises(SystemExit, match=r"disk full while writing .*No space left on device.*start afresh") as err:
        O.main(args)
    monkeypatch.undo()
    command = str(err.value.code).split("`")[1]
    subprocess.run(command, shell=True, check=True)
    O.main(args)
    assert steps(out / "metrics.jsonl") == [1]


def test_fresh_start_after_an_interrupted_start_is_not_blocked(tmp_path, capsys):
    """A run stopped before its first step (config.json written, nothing else) blocks nothing."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": "other"}))
    assert runs.prepare_out(O.Config(out=str(out))) is None
    assert "stopped before its first step" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# eval.py on run directories and bad benchmark files
# ------------------------------------------------------------------------------------------------


def test_eval_of_a_run_directory_uses_its_newest_checkpoint_and_the_runs_budget(run, tmp_path):
    """An eval of a run directory uses its newest checkpoint; an eval killed before its first sample
    (settings.json, empty samples.jsonl) does not block a rerun with other settings; a tiny run's
    checkpoint gets the tiny run's token budget."""
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
    for d in runs.checkpoints(copy):
        os.remove(os.path.join(d, "state.pt"))
    assert "no complete checkpoint" in eval_exit(["--model", copy, "--data-dir", data_dir(tmp_path)])


def test_open_out_refuses_a_link_planted_after_the_check(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    os.symlink(target, tmp_path / "summary.json")
    monkeypatch.setattr(runs, "refuse_link", lambda path: None)  # as if the link came after the check
    for mode in ("w", "a"):  # O_NOFOLLOW itself refuses it
        with pytest.raises(SystemExit, match="is a symbolic link"):
            runs.open_out(str(tmp_path / "summary.json"), mode)
    assert target.read_text() == "precious\n"


# ------------------------------------------------------------------------------------------------
# hostile checkpoints and --out: no code runs from data, nothing written through a link
# ------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["state.pt", "optimizer.pt"])
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(copy, tmp_path, name):
    marker = tmp_path / "payload-ran"
    with open(os.path.join(copy, "ckpt-00002", name), "wb") as f:
        torch.save({"step": 2, "x": _Payload(str(marker))}, f)
    with pytest.raises(SystemExit, match="refused, nothing was run"):
        O.main(["--model", "tiny", "--steps", "3", "--resume", "--out", copy, *FAST_TINY])
    assert not marker.exists()


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json", "ckpt-00002/config.json"])
def test_a_link_planted_in_a_run_is_refused_and_its_target_untouched(copy, tmp_path, name):
    target = tmp_path / "precious.txt"
    target.write_text("precious\n")
    os.remove(os.path.join(copy, name))
    os.symlink(target, os.path.join(copy, name))
    with pytest.raises(SystemExit, match="is a symbolic link"):
        O.main(["--model", "tiny", "--steps", "3", "--resume", "--out", copy, *FAST_TINY])
    assert target.read_text() == "precious\n"


def test_checkpoint_files_get_the_usual_permissions(run):
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "state.pt", "optimizer.pt"):
        assert os.stat(os.path.join(run, "ckpt-00002", name)).st_mode & 0o777 == 0o666 & ~mask


def test_checkpoints_share_one_pool_file(run):
    """Each checkpoint keeps only its pool's length; the pool itself is one file: disk grows linearly."""
    first, second = runs.checkpoint_pool(os.path.join(run, "ckpt-00001")), runs.checkpoint_pool(os.path.join(run, "ckpt-00002"))
    assert 1 < len(first["problems"]) < len(second["problems"])
    assert second["problems"][:len(first["problems"])] == first["problems"]
    assert torch.equal(second["embeddings"][:len(first["problems"])], first["embeddings"])
    for ckpt in ("ckpt-00001", "ckpt-00002"):
        assert "pool" not in runs.load_pt(os.path.join(run, ckpt, "state.pt"))


def test_resume_from_the_same_step_again_and_again(copy):
    for _ in range(3):  # each time the newer checkpoint is moved aside under a new name
        O.main(["--model", "tiny", "--steps", "2", "--resume_from", "ckpt-00001", "--out", copy, *FAST_TINY])
        assert steps(os.path.join(copy, "metrics.jsonl")) == [1, 2]
    assert len([d for d in os.listdir(copy) if d.startswith("ckpt-00002.before-resume-from-00001")]) == 3


# ------------------------------------------------------------------------------------------------
# every way a run stops leaves a next command that works
# ------------------------------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-u", "opensir.py", "--model", "tiny", "--steps", "50", "--save_every", "100",
           "--out", out, *TINY_FAST]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 1/50"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130 and "continue with --resume" in rest, rest
    O.main(["--model", "tiny", "--steps", "2", "--save_every", "100", "--out", out, "--resume", *TINY_FAST])
    assert steps(os.path.join(out, "metrics.jsonl"))[-1] == 2


def test_a_second_ctrl_c_waits_for_the_save(copy, monkeypatch):
    """Ctrl-C, then Ctrl-C again while the exit save is writing: the save completes and resumes."""
    real = runs.save_checkpoint

    def save_hit_twice(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, in the middle of the save
        return real(*args, **kwargs)
    monkeypatch.setattr(runs, "save_checkpoint", save_hit_twice)
    calls = []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the first Ctrl-C, in the second step
        return real_rounds(*args, **kwargs)
    real_rounds = O.play_rounds
    monkeypatch.setattr(O, "play_rounds", interrupted_step)
    with pytest.raises(SystemExit) as err:
        O.main(["--model", "tiny", "--steps", "5", "--save_every", "100", "--resume", "--out", copy, *FAST_TINY])
    assert err.value.code == 130
    assert runs.latest_checkpoint(copy).endswith("ckpt-00003")
    monkeypatch.undo()
    O.main(["--model", "tiny", "--steps", "4", "--resume", "--out", copy, *FAST_TINY])
    assert steps(os.path.join(copy, "metrics.jsonl")) == [1, 2, 3, 4]


def test_logs_without_a_checkpoint_name_the_command_that_starts_afresh(copy):
    for d in runs.checkpoints(copy):
        shutil.rmtree(d)
    args = ["--model", "tiny", "--steps", "1", "--out", copy, *FAST_TINY]
    for resume in ([], ["--resume"]):
        with pytest.raises(SystemExit, match="start afresh in the same --out") as err:
            O.main(args + resume)
    subprocess.run(str(err.value.code).split("`")[1], shell=True, check=True)
    O.main(args)  # the same command, now in a clean --out
    assert steps(os.path.join(copy, "metrics.jsonl")) == [1]
    assert any(d.startswith("set-aside") for d in os.listdir(copy))  # the old logs were kept


def test_non_finite_gradient_is_never_applied(small):
    model, tok = small
    policy = copy.deepcopy(model)
    cfg = O.Config(beta=0.0, w_div=0.0, train_micro_batch=4)
    ids = tok(" 2")["input_ids"] + [tok.eos_token_id]
    seq = O.TrainSeq(tok("What is 1+1?")["input_ids"], ids, [1] * len(ids), float("nan"), "student")
    rounds = [[seq]]
    opt, sched = O.make_optimizer(policy, cfg)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    update = O.optimise(policy, None, opt, sched, rounds, cfg, None)
    assert update["nonfinite_skipped"] == 1
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_a_run_whose_gradients_stay_non_finite_stops_naming_the_learning_rate(tmp_path, monkeypatch):
    real = O.optimise
    monkeypatch.setattr(O, "optimise", lambda *a, **k: {**real(*a, **k), "nonfinite_skipped": 1})
    with pytest.raises(SystemExit, match=r"3 steps in a row .* not finite.*--lr"):
        O.main(["--model", "tiny", "--steps", "5", "--out", str(tmp_path / "run"), *FAST_TINY])


def test_init_pool_from_a_fifo_is_read_once_and_resume_never_needs_it(tmp_path):
    import threading
    fifo = tmp_path / "pool.fifo"
    os.mkfifo(fifo)
    text = "".join(json.dumps({"problem": f"What is {i} + {i}?", "concepts": ["addition"]}) + "\n" for i in range(3))
    threading.Thread(target=lambda: fifo.write_text(text), daemon=True).start()  # a pipe can be read once only
    out = str(tmp_path / "run")
    O.main(["--model", "tiny", "--steps", "1", "--out", out, "--init_pool", str(fifo), *FAST_TINY])
    assert rows(os.path.join(out, "init_pool.jsonl")) == [json.loads(line) for line in text.splitlines()]
    os.remove(fifo)
    O.main(["--model", "tiny", "--steps", "2", "--out", out, "--init_pool", str(fifo), "--resume", *FAST_TINY])
    assert steps(os.path.join(out, "metrics.jsonl")) == [1, 2]
