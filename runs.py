"""Run directories: the --out lock, the logs, checkpoints, exact resume and interrupts.

Plumbing beside opensir.py; a first reading can skip it. Nothing here changes a result: a run and its
resume give the same bytes as one uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import json
import os
import random
import re
import time
import zlib
from typing import Optional

import numpy as np
import torch

import parallel
from models import resolve_model



def jsonl_objects(path: str, label: str = "", expected: str = "a JSON object"):
    """(where, row) for each non-blank line of a JSONL file, `where` naming the file and line; a line
    that is not a JSON object is a ValueError that says where and what was `expected`. Lazy: a large
    file streams."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{label}{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected {expected}")
            yield where, row


def read_init_pool(path: str) -> list:
    """--init_pool rows: one JSON object a line with a non-blank "problem" and optional "concepts" (a
    list of strings), as init_pool.jsonl is written. Anything else is an error naming file and line."""
    rows = []
    try:
        expected = 'a JSON object with a non-blank "problem" string'
        for where, row in jsonl_objects(path, "--init_pool ", expected):
            if not isinstance(row.get("problem"), str) or not row["problem"].strip():
                raise ValueError(f"{where}: expected {expected}")
            concepts = row.get("concepts", [])
            if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
                raise ValueError(f'{where}: "concepts" must be a list of strings')
            rows.append({"problem": row["problem"], "concepts": concepts})
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--init_pool {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    if not rows:
        raise ValueError(f"--init_pool {path} holds no problems; pass a JSONL of problems or leave "
                         "--init_pool out to grow the starting pool")
    return rows


LINK_REFUSED = ("{path} is a symbolic link; nothing is ever written through a link inside --out (it would write "
                "to a file elsewhere). Remove the link, or choose another --out")


def refuse_link(path: str) -> None:
    if os.path.islink(path):
        raise SystemExit(LINK_REFUSED.format(path=path))


def refuse_links(out: str) -> None:
    """Refuse a run directory holding a link: at its top or inside a checkpoint directory (save_pretrained
    would write through it)."""
    for d in [out, *checkpoints(out)]:
        refuse_link(d)
        for name in os.listdir(d) if os.path.isdir(d) else ():
            refuse_link(os.path.join(d, name))


def open_out(path: str, mode: str = "w"):
    """Open a file in --out to write ("w" truncates, "a" appends, "wb", "ab" in binary) without following a
    link: one planted there is refused with a clear error (O_NOFOLLOW also refuses one planted after the check)."""
    refuse_link(path)
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SystemExit(LINK_REFUSED.format(path=path)) from None
        raise
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def usual_permissions(path: str) -> None:
    """Give the files of a directory the permissions the user's umask gives new files (safetensors writes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(path):
        os.chmod(os.path.join(path, name), 0o666 & ~mask)


def rng_state() -> dict:
    """Every generator's state in plain types and tensors (loadable with weights_only: no code runs)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def kept_rng():
    """Inside, anything may draw random numbers: every generator is put back as it was on leaving."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def checkpoint_dir(out: str, step: int) -> str:
    return os.path.join(out, f"ckpt-{step:05d}")


def checkpoints(out: str) -> list:
    """Every ckpt-NNNNN directory in out, oldest first (complete or not)."""
    if not os.path.isdir(out):
        return []
    return sorted(os.path.join(out, d) for d in os.listdir(out)
                  if re.fullmatch(r"ckpt-\d{5}", d) and os.path.isdir(os.path.join(out, d)))


def checkpoint_step(path: str) -> int:
    return int(os.path.basename(os.path.normpath(path))[5:])


def latest_checkpoint(out: str) -> Optional[str]:
    """The newest checkpoint that can be resumed: complete (state.pt is written last) and holding
    optimizer.pt."""
    done = [d for d in checkpoints(out) if all(os.path.exists(os.path.join(d, f)) for f in ("state.pt", "optimizer.pt"))]
    return done[-1] if done else None


def load_pt(path: str):
    """torch.load with weights_only: tensors and plain Python values only, so a checkpoint from elsewhere
    cannot run code (a file that needs more is refused, named). Errors name the file and what to do."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # refused globals, truncated zip, unpickling errors, I/O errors
        why = (str(err).splitlines() or [""])[0][:160]
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise SystemExit(f"{path} holds more than tensors and plain values (a checkpoint of an older version of "
                             f"this code, or a file made to run code when loaded): refused, nothing was run. "
                             f"({why})") from None
        raise SystemExit(f"{path} is damaged or unreadable ({type(err).__name__}: {why}). Continue from an older "
                         f"checkpoint with --resume_from {os.path.join(os.path.dirname(os.path.dirname(path)) or '.', 'ckpt-NNNNN')}, "
                         "or start a new --out.") from None


def checkpoint_pool(ckpt: str, state: Optional[dict] = None) -> dict:
    """The pool as it stood at a checkpoint: the first pool_size problems of the run's pool.pt."""
    state = state or load_pt(os.path.join(ckpt, "state.pt"))
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "pool.pt")
    pool, n = load_pt(path), state["pool_size"]
    if len(pool["problems"]) < n:
        raise SystemExit(f"{path} holds {len(pool['problems'])} problems, fewer than the {n} of {ckpt}: it is "
                         "damaged; start a new --out")
    emb = pool["embeddings"]
    return {"problems": pool["problems"][:n], "concepts": pool["concepts"][:n],
            "embeddings": emb[:n] if emb is not None else None}


def save_checkpoint(out: str, step: int, policy, tokenizer, optimizer, scheduler, pool,
                    rng: dict, cfg, full: Optional[tuple] = None) -> str:
    """Model and tokenizer by save_pretrained (loadable by transformers and eval.py), optimizer.pt, and
    state.pt with the rest an exact resume needs. Older checkpoints keep their weights and state but
    drop optimizer.pt: AdamW state is twice the fp32 weights, and only the newest is resumed from.
    A save that fails (a full disk) removes its half-written directory, so --resume finds the last good one.
    full: --fsdp's gathered (model, optimizer) state dicts, written in place of the sharded objects'."""
    import shutil
    refuse_links(out)  # save_pretrained would write through a link planted in a checkpoint directory
    path = checkpoint_dir(out, step)
    if os.path.exists(os.path.join(path, "state.pt")):
        os.remove(os.path.join(path, "state.pt"))  # overwriting: incomplete until the new state.pt lands
    try:
        policy.save_pretrained(path, **({"state_dict": full[0]} if full else {}))
        tokenizer.save_pretrained(path)
        # the pool only grows, so one file in --out serves every checkpoint (each keeps its length): disk grows
        # linearly with the steps, not with their square
        with open_out(os.path.join(out, "pool.tmp"), "wb") as f:
            torch.save(pool.state(), f)
        os.replace(os.path.join(out, "pool.tmp"), os.path.join(out, "pool.pt"))
        state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng, "pool_size": len(pool.problems),
                 "config": dataclasses.asdict(cfg)}
        for obj, name in ((full[1] if full else optimizer.state_dict(), "optimizer.pt"), (state, "state.tmp")):
            with open_out(os.path.join(path, name), "wb") as f:  # a Python file: a full disk is ENOSPC, not basic_ios
                torch.save(obj, f)
        os.replace(os.path.join(path, "state.tmp"), os.path.join(path, "state.pt"))  # last: marks it complete
        usual_permissions(path)
    except Exception as err:  # OSError, and what safetensors and torch raise for a full disk mid-write
        shutil.rmtree(path, ignore_errors=True)
        full = getattr(err, "errno", None) == errno.ENOSPC or shutil.disk_usage(out).free < 2**26
        raise OSError(errno.ENOSPC if full else getattr(err, "errno", None) or errno.EIO,
                      f"could not save checkpoint {path}" + (" (disk full)" if full else f" ({err})")) from err
    for d in checkpoints(out):
        old = os.path.join(d, "optimizer.pt")
        if d != path and os.path.exists(old):
            os.remove(old)
    return path


class StepGuard:
    """Ctrl-C stops the run at once, except between a step's first weight update and the moment the
    step is recorded: then it waits, so the checkpoint saved on exit is never half a step. It is never
    lost: an interrupt that lands in a finalizer (where Python drops exceptions) still ends the step."""

    def __init__(self):
        self.critical = self.pending = False

    def handler(self, *_):
        self.pending = True
        if not self.critical:
            raise KeyboardInterrupt

    def begin(self):
        self.critical = True

    def end(self):
        self.critical = False
        if self.pending:
            raise KeyboardInterrupt


def peak_memory_gib() -> float:
    """Peak memory so far: the CUDA allocator's peak on a GPU, else the process's peak resident size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


MAY_CHANGE_ON_RESUME = {"init_pool", "nonfinite_stop", "compile", "vllm_gpu_memory", "out", "resume", "resume_from", "steps", "save_every", "device", "gen_batch",
                   "train_micro_batch", "logprob_chunk", "grad_ckpt", "dist_timeout", "threads", "engine",
                   "kv_cache_gib", "report_to"}  # may change between a run and its resume


_OUT_LOCKS: dict = {}  # real path of --out -> its open .lock file, held for the life of the process


def lock_out(out: str) -> None:
    """Create --out and hold an exclusive flock on OUT/.lock: a second run into the same --out refuses at
    once. The kernel drops the lock when the process ends, however it ends, so none is ever stale."""
    import fcntl
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out} is a file, not a directory; choose another --out")
    try:
        os.makedirs(out, exist_ok=True)
        if os.path.realpath(out) in _OUT_LOCKS:
            return
        f = open_out(os.path.join(out, ".lock"), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise SystemExit(f"another run is writing to {out} (it holds {os.path.join(out, '.lock')}). Wait "
                             "for it to end or stop it, or choose another --out.") from None
    except OSError as err:
        raise SystemExit(f"--out {out} cannot be written ({err.strerror or err}); choose a writable directory") from None
    _OUT_LOCKS[os.path.realpath(out)] = f


def _scan_log(path: str, keep_to: Optional[int] = None) -> int:
    """The last step logged in a metrics/problems JSONL (0 if none). A torn last line (a run killed
    mid-append, or a full disk) is dropped with a warning; a bad line elsewhere is an error naming file
    and line. With keep_to, the file is cut (in place: logs are appended in step order) before the torn
    line or the first line of a later step."""
    if not os.path.exists(path):
        return 0
    last, torn, cut, offset = 0, None, None, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            if torn is not None:
                raise SystemExit(f"{path}, line {torn}: not a valid log line, and lines follow it. Fix or "
                                 "delete that line, then resume again.")
            try:
                step = json.loads(line)["step"]
                assert isinstance(step, int)
            except (ValueError, KeyError, TypeError, AssertionError):
                torn, cut = lineno, start if cut is None else cut
                continue
            last = max(last, step)
            if keep_to is not None and step > keep_to and cut is None:
                cut = start
    if keep_to is not None:
        if torn is not None:
            print(f"warning: {path}, line {torn}: torn last line (a run killed mid-write or a full disk); dropped")
        if cut is not None:
            os.truncate(path, cut)
        with open(path, "rb+") as f:  # a last line cut just before its newline: the next append needs one
            if f.seek(0, 2) and (f.seek(-1, 2), f.read(1))[1] != b"\n":
                f.write(b"\n")
    return last


SOLUTIONS = "solutions.jsonl.gz"  # the student's solutions, one gzip member a step
RUN_FILES = ("config.json", "metrics.jsonl", "problems.jsonl", SOLUTIONS, "init_pool.jsonl", "pool.pt",
             "tensorboard", "wandb")  # what a start writes in --out


# ------------------------------------------------------------------------------------------------
# solutions.jsonl.gz: every legal problem of a step with the student's texts, so each reward can be traced
# ------------------------------------------------------------------------------------------------

def solution_rows(step: int, rounds_cands: list) -> list:
    """One row per legal problem of the step (rounds_cands: round -> its opensir.Candidates): the problem,
    the majority answer, each solution's parsed answer, text and student reward, in the same order."""
    return [{"step": step, "round": rnd, "problem": c.parsed.problem, "majority": c.majority,
             "answers": list(c.answers), "solutions": [s.text for s in c.solutions],
             "student_rewards": [float(r) for r in c.student_rewards]}
            for rnd, cands in enumerate(rounds_cands) for c in cands if c.parsed.legal]


def append_solutions(path: str, rows: list) -> None:
    """Append the step's rows as one gzip member (mtime 0: the same bytes on a resume), so a run killed
    while writing loses only that step. A step with no legal problem writes nothing."""
    if rows:
        data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0)
        with open_out(path, "ab") as f:
            f.write(data)


def solution_members(path: str):
    """(end, rows) for each complete gzip member of a solutions file, in order; `end` is the byte offset
    where the member ends. A torn last member (a run killed mid-write) ends the iteration quietly; bytes
    that are not gzip are a ValueError naming the file and the offset. Streams: one member in memory."""
    d, parts, fed, pending = zlib.decompressobj(wbits=31), [], 0, b""
    with open(path, "rb") as f:
        while True:
            chunk = pending or f.read(1 << 20)
            pending = b""
            if not chunk:
                return
            start, fed = fed, fed + len(chunk)
            try:
                parts.append(d.decompress(chunk))
            except zlib.error as err:
                raise ValueError(f"{path}: not gzip data near byte {start} ({err})") from None
            if d.eof:
                pending = d.unused_data
                fed -= len(pending)
                text = b"".join(parts).decode("utf-8")
                yield fed, [json.loads(line) for line in text.splitlines() if line.strip()]
                d, parts = zlib.decompressobj(wbits=31), []


def read_solutions(path: str) -> list:
    """Every row of a solutions.jsonl.gz (a torn last member is left out)."""
    return [row for _, rows in solution_members(path) for row in rows]


def cut_solutions(path: str, keep_to: int) -> None:
    """On resume: keep the members of steps up to keep_to (the checkpoint's), drop the later steps and a
    torn last member, in place. Bytes that are not gzip stop the resume, naming the file."""
    if not os.path.exists(path):
        return
    keep = 0
    try:
        for end, rows in solution_members(path):
            if rows and rows[0]["step"] > keep_to:
                break
            keep = end
    except (ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path} is damaged ({err}); move it aside, then resume again") from None
    size = os.path.getsize(path)
    if keep < size:
        os.truncate(path, keep)


def eta(elapsed: float, step_secs: list, left_steps: int) -> str:
    """'0:04:10 elapsed, ~1:02:00 left': the left estimate is the mean step time of this process times the
    steps still to run."""
    hms = lambda s: f"{int(s) // 3600}:{int(s) % 3600 // 60:02d}:{int(s) % 60:02d}"  # noqa: E731
    mean = sum(step_secs) / len(step_secs) if step_secs else 0.0
    return f"{hms(elapsed)} elapsed, ~{hms(mean * left_steps)} left"


# ------------------------------------------------------------------------------------------------
# --report_to: TensorBoard or wandb (optional packages, requirements-track.txt)
# ------------------------------------------------------------------------------------------------

class Tracker:
    """Each step's scalar metrics, the solve-rate histogram and a small table of sampled problems with a
    solution, to TensorBoard (event files in --out/tensorboard; a resume purges the redone steps) or wandb
    (--out/wandb; WANDB_MODE=offline works without a network; each start is its own wandb run, grouped by
    --out). Nothing here draws a random number: a tracked run gives the same results as an untracked one."""

    SAMPLES = 4  # problems in each step's table

    def __init__(self, kind: str, out: str, start: int, config: dict):
        self.kind = kind
        with kept_rng():  # the tracker's packages may draw from the global generators
            self._open(out, start, config)

    def _open(self, out: str, start: int, config: dict) -> None:
        kind = self.kind
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start + 1)
            self.writer.add_text("config", "    " + json.dumps(config, indent=1).replace("\n", "\n    "), start)
        elif kind == "wandb":
            import wandb
            self.wandb = wandb
            name = os.path.basename(os.path.abspath(out))
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "opensir"), dir=out, config=config,
                                  group=name, name=f"{name}-from-{start}" if start else name)
        else:
            raise ValueError(f"unknown tracker {kind!r}")

    @classmethod
    def sample(cls, rows: list) -> list:
        """Up to SAMPLES solution rows spread over the step: [round, problem, majority, agree, solution, reward]."""
        picked = rows[::max(1, -(-len(rows) // cls.SAMPLES))][:cls.SAMPLES]
        return [[r["round"], r["problem"], str(r["majority"]),
                 sum(a is not None and a == r["majority"] for a in r["answers"]) / max(len(r["answers"]), 1),
                 r["solutions"][0][:2000] if r["solutions"] else "",
                 r["student_rewards"][0] if r["student_rewards"] else 0.0] for r in picked]

    COLUMNS = ["round", "problem", "majority", "agree", "first solution", "its reward"]

    def log(self, step: int, metrics: dict, rows: list) -> None:
        """One step: metrics.jsonl's line, rows: the step's solution_rows (a few go in the table)."""
        with kept_rng():
            self._log(step, metrics, rows)

    def _log(self, step: int, metrics: dict, rows: list) -> None:
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        hist = metrics.get("solve_rate/hist10")
        table = self.sample(rows)
        if self.kind == "tensorboard":
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            if hist and sum(hist):  # the exact bin counts; sum and sum of squares from the bin centres
                centres = [(i + 0.5) / len(hist) for i in range(len(hist))]
                self.writer.add_histogram_raw(
                    "solve_rate", 0.0, 1.0, sum(hist), sum(c * n for c, n in zip(centres, hist)),
                    sum(c * c * n for c, n in zip(centres, hist)), [(i + 1) / len(hist) for i in range(len(hist))],
                    hist, step)
            if table:
                cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
                self.writer.add_text("samples", "\n".join(
                    ["| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
                    + ["| " + " | ".join(cell(v) for v in r) + " |" for r in table]), step)
            self.writer.flush()  # a killed run keeps every logged step
        else:
            extra = {}
            if hist and sum(hist):
                extra["solve_rate"] = self.wandb.Histogram(np_histogram=(hist, [i / len(hist) for i in range(len(hist) + 1)]))
            if table:
                extra["samples"] = self.wandb.Table(columns=self.COLUMNS, data=table)
            self.run.log({**scalars, **extra}, step=step)

    def close(self) -> None:
        with kept_rng():
            self.writer.close() if self.kind == "tensorboard" else self.run.finish()


def holdings(out: str) -> str:
    """What an earlier run left in --out that a new start would overwrite, in words ("" for nothing)."""
    names = [os.path.basename(d) for d in checkpoints(out)]
    logged = _scan_log(os.path.join(out, "metrics.jsonl"))
    grown = os.path.exists(os.path.join(out, "init_pool.jsonl"))
    return ", ".join(([f"checkpoints {names[0]} to {names[-1]}" if len(names) > 1 else f"checkpoint {names[0]}"]
                      if names else []) + [f"steps logged up to {logged}"] * bool(logged)
                     + ["a grown init_pool.jsonl"] * grown)


def start_afresh(out: str) -> str:
    """The command that lets the same training command start again in an --out that holds logs but no
    complete checkpoint: move the logs (and any incomplete checkpoint) aside, nothing deleted."""
    here = [os.path.join(out, f) for f in RUN_FILES if os.path.exists(os.path.join(out, f))] + checkpoints(out)
    aside = os.path.join(out, "set-aside")
    n = 1
    while os.path.exists(f"{aside}-{n}"):
        n += 1
    return (f"To start afresh in the same --out, move what it holds aside first: `mkdir {aside}-{n} && mv "
            f"{' '.join(here)} {aside}-{n}/`, then run the same command.")


def next_command(out: str) -> str:
    """What to run after a stop: --resume from the newest complete checkpoint, the same command when nothing
    was left, or how to start afresh."""
    newest = latest_checkpoint(out)
    if newest:
        return f"continue with --resume (from {newest})"
    if not holdings(out):
        return "nothing was saved; the same command starts again"
    return "no checkpoint was completed. " + start_afresh(out)


def prepare_out(cfg) -> Optional[str]:
    """Check --out before any model loads and return the checkpoint to resume from, if any. Refuses
    whenever going on would drop or overwrite what an earlier run left without the user asking.
    config.json is written only once the models have loaded, so a failed start blocks nothing."""
    lock_out(cfg.out)
    refuse_links(cfg.out)
    metrics, problems = os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "problems.jsonl")
    ckpts, found = checkpoints(cfg.out), holdings(cfg.out)
    grown = os.path.exists(os.path.join(cfg.out, "init_pool.jsonl"))
    resume = cfg.resume or bool(cfg.resume_from)
    cfg_path = os.path.join(cfg.out, "config.json")
    if not found:  # nothing a run finished is here: a failed or interrupted start blocks nothing
        if os.path.exists(cfg_path):
            print(f"{cfg.out} holds a run that stopped before its first step; starting it afresh")
        return None
    if not ckpts and not cfg.resume_from:
        raise SystemExit(f"{cfg.out} holds {found} but no checkpoint to resume from. {start_afresh(cfg.out)} Or "
                         "choose another --out" + (f" (to reuse the grown starting pool, pass --init_pool "
                                                   f"{os.path.join(cfg.out, 'init_pool.jsonl')})" if grown else "") + ".")
    if not resume:
        raise SystemExit(f"{cfg.out} already holds a run ({found}). Pass --resume to continue it, or choose "
                         "another --out.")
    if os.path.exists(cfg_path):
        try:
            saved = json.load(open(cfg_path))
        except ValueError as err:
            raise SystemExit(f"{cfg_path} is damaged ({err}); restore it or choose another --out") from None
        diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items()
                if k not in MAY_CHANGE_ON_RESUME and saved.get(k) != v}
        if saved.get("engine", cfg.engine) != cfg.engine:
            print(f"warning: --engine {cfg.engine} differs from the run's {saved.get('engine')}: the same distribution, "
                  "but the samples from here on differ from those of an uninterrupted run")
        if diff:
            raise SystemExit(f"{cfg.out} holds a run with a different config; refusing to touch it. "
                             "Differences (saved, now): " + ", ".join(f"{k}={a!r}->{b!r}" for k, (a, b) in diff.items()))
    if cfg.resume_from:
        path = cfg.resume_from if os.path.isdir(cfg.resume_from) else os.path.join(cfg.out, cfg.resume_from)
        if not (os.path.isdir(path) and os.path.samefile(os.path.dirname(os.path.abspath(path)), cfg.out)
                and re.fullmatch(r"ckpt-\d{5}", os.path.basename(os.path.normpath(path)))):
            raise SystemExit(f"--resume_from {cfg.resume_from}: not a checkpoint directory of --out {cfg.out} "
                             f"(found: {found})")
        if not os.path.exists(os.path.join(path, "state.pt")):
            raise SystemExit(f"--resume_from {path}: no state.pt, so it cannot be resumed; pick an older checkpoint")
        step = checkpoint_step(path)
        for d in checkpoints(cfg.out):  # kept under another name: nothing is overwritten or lost
            if checkpoint_step(d) > step:
                aside, n = d + f".before-resume-from-{step:05d}", 1
                while os.path.exists(aside):  # a repeated --resume_from: a new name, never a move into the old one
                    n += 1
                    aside = d + f".before-resume-from-{step:05d}-{n}"
                os.rename(d, aside)
                print(f"moved {d} aside to {aside}")
        resume_from = path
    else:
        newest, older = ckpts[-1], [d for d in ckpts if os.path.exists(os.path.join(d, "state.pt"))]
        missing = [f for f in ("state.pt", "optimizer.pt") if not os.path.exists(os.path.join(newest, f))]
        if missing:
            why = ("only the newest checkpoint keeps optimizer.pt, so a newer one was deleted or its save was cut off"
                   if missing == ["optimizer.pt"] else "deleted, or a save that was cut off")
            offer = (f"To continue from the newest checkpoint with state.pt, pass --resume_from {older[-1]} (steps after "
                     f"{checkpoint_step(older[-1])} are dropped from the logs and redone; newer checkpoint "
                     "directories are moved aside, not deleted" + ("" if os.path.exists(os.path.join(
                         older[-1], "optimizer.pt")) else "; AdamW restarts from zero moments: only the newest "
                         "checkpoint keeps optimizer state") + ").") if older else "No checkpoint has state.pt."
            raise SystemExit(f"--resume: the newest checkpoint {newest} has no {' and no '.join(missing)} "
                             f"({why}), so the run cannot be resumed exactly. Found: "
                             f"{found}. {offer}")
        resume_from = newest
    for p in (metrics, problems):  # steps after the checkpoint are redone
        _scan_log(p, keep_to=checkpoint_step(resume_from))
    cut_solutions(os.path.join(cfg.out, SOLUTIONS), checkpoint_step(resume_from))
    return resume_from


class Run:
    """One training run's process group and output directory, for train(): what it checks before any model
    loads, what it writes after each step, and what a stop leaves behind.

    Several processes: rank 0 owns --out (its lock, the logs, the checkpoints) and the others learn what it
    decided; every rank holds the same pool and weights, so one writes them. Ctrl-C (inside `interrupts`)
    saves the last completed step and exits; under torchrun it reaches every rank, the others ignore it
    and torchrun stops them."""

    def __init__(self, cfg, prompts: tuple):
        errors = parallel.dist_errors(cfg)
        if errors:
            raise SystemExit("invalid config:\n  " + "\n  ".join(errors))
        parallel.dist_init(cfg, MAY_CHANGE_ON_RESUME)
        self.cfg, (self.rank, self.world) = cfg, parallel.dist_env()
        resume_from = why = self.init_pool = None
        if self.rank == 0:
            try:
                if cfg.init_pool and not (cfg.resume or cfg.resume_from):  # read once: a pipe or a FIFO works
                    self.init_pool = read_init_pool(cfg.init_pool)
                resume_from = prepare_out(cfg)
            except ValueError as err:
                why = str(err)
            except SystemExit as err:
                why = err.code
        if self.world > 1:
            resume_from, why, self.init_pool = parallel.dist_call("broadcast_object_list",
                                                                  [resume_from, why, self.init_pool], 0)
        if why is not None:
            raise SystemExit(why if self.rank == 0 else 1)  # rank 0 says why, once
        self.resume_from = resume_from
        self.state = load_pt(os.path.join(resume_from, "state.pt")) if resume_from else None  # damage shows before loading
        self.log = print if self.rank == 0 else (lambda *a, **k: None)
        if self.world > 1:
            if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not cfg.random_init:
                resolve_model(cfg.model, prompts)  # the tiny model is built once a node, not by N processes at once
            parallel.dist_call("barrier")
        per = cfg.rounds_per_step // self.world
        self.mine = range(self.rank * per, (self.rank + 1) * per)  # this rank's rounds of every step
        self.metrics_path, self.problems_path, self.solutions_path = (
            os.path.join(cfg.out, f) for f in ("metrics.jsonl", "problems.jsonl", SOLUTIONS))
        self.final = self.tracker = None
        self.began, self.step_secs = time.monotonic(), []  # for the step line's elapsed time and estimate

    def start(self, policy, optimizer, scheduler) -> tuple:
        """Write config.json; on resume restore the optimizer, scheduler and RNG. Returns (the step to start
        after, the saved pool's state or None)."""
        cfg = self.cfg
        if self.rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            with open_out(os.path.join(cfg.out, "config.json")) as f:
                json.dump(dataclasses.asdict(cfg), f, indent=1)
        if self.world > 1:
            self.log(f"{self.world} processes: rounds {cfg.rounds_per_step // self.world} per rank per step")
        if self.rank == 0 and cfg.report_to != "none":
            self.tracker = Tracker(cfg.report_to, cfg.out, self.state["step"] if self.resume_from else 0,
                                   dataclasses.asdict(cfg))
        if not self.resume_from:
            for p in (self.metrics_path, self.problems_path, self.solutions_path) if self.rank == 0 else ():
                open_out(p).close()
            return 0, None
        opt_path = os.path.join(self.resume_from, "optimizer.pt")
        if os.path.exists(opt_path) and cfg.fsdp:
            parallel.load_sharded_optimizer(policy, optimizer, load_pt(opt_path))
        elif os.path.exists(opt_path):
            optimizer.load_state_dict(load_pt(opt_path))
        else:  # only an explicit --resume_from of an older checkpoint gets here
            self.log(f"{self.resume_from} keeps no optimizer state: AdamW restarts from zero moments")
        scheduler.load_state_dict(self.state["scheduler"])
        set_rng_state(self.state["rng"])
        pool = checkpoint_pool(self.resume_from, self.state)
        self.log(f"resumed from {self.resume_from} at step {self.state['step']}, pool of {len(pool['problems'])}")
        return self.state["step"], pool

    def log_step(self, step: int, m: dict, rows: list, rounds_cands: list = ()) -> None:
        """Append the step's metrics.jsonl line, problems.jsonl rows and solutions.jsonl.gz member (rank 0),
        send them to --report_to's tracker, and print the one-line summary with the time left.
        rounds_cands: round -> its Candidates (their solutions)."""
        m["ranks"] = self.world  # sec/, tok_per_sec/: rank 0's
        self.step_secs.append(m["sec/step"])
        if self.rank == 0:
            with open_out(self.metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            with open_out(self.problems_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            solutions = solution_rows(step, rounds_cands)
            append_solutions(self.solutions_path, solutions)
            if self.tracker:
                self.tracker.log(step, m, solutions)
        self.log(f"step {step}/{self.cfg.steps} | teacher R {m['teacher/reward']:.3f} legal {m['teacher/legal_rate']:.0%}"
                 f" | student R {m['student/reward']:.3f} | solve {m['solve_rate/mean']:.2f} in-band "
                 f"{m['solve_rate/in_band']:.0%} | pool {m['pool']} | loss {m['loss']:+.4f} kl {m['kl']:.2e} "
                 f"gnorm {m['grad_norm']:.3f} | {m['sec/step']:.1f}s, "
                 + eta(time.monotonic() - self.began, self.step_secs, self.cfg.steps - step))

    @contextlib.contextmanager
    def interrupts(self, start: int, policy, sampler, tokenizer, optimizer, scheduler, pool):
        """Inside: Ctrl-C waits for the step being recorded (StepGuard), then saves the last completed step
        (weights, optimizer, pool cut back to that step, RNG) and exits with 130."""
        import signal
        self.models = (policy, sampler, tokenizer, optimizer, scheduler, pool)
        self.completed, self.snapshot, self.pool_len = start, rng_state(), len(pool.problems)
        self.guard = StepGuard()
        handler = self.guard.handler if self.rank == 0 else signal.SIG_IGN
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}  # SIGTERM: schedulers, torchrun
        try:
            yield self.guard
        except KeyboardInterrupt:
            for s in old:  # a second Ctrl-C must not cut the save short
                signal.signal(s, signal.SIG_IGN)
            self._save_interrupted()
            raise SystemExit(130)
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def end_step(self, step: int) -> None:
        """The step is complete: remember it for Ctrl-C, and checkpoint it every --save_every and at the end."""
        policy, sampler, tokenizer, optimizer, scheduler, pool = self.models
        cfg, out = self.cfg, self.cfg.out
        self.completed, self.snapshot, self.pool_len = step, rng_state(), len(pool.problems)
        self.guard.end()
        if step % cfg.save_every and step != cfg.steps:
            return
        if self.world > 1:
            self.log(f"pool {parallel.same_on_every_rank(pool, sampler if cfg.fsdp else policy)[:12]} and weights "
                     f"identical on all {self.world} ranks")
        full = parallel.full_training_state(policy, optimizer) if cfg.fsdp else None  # gathered on rank 0
        if self.rank == 0:
            self.final = save_checkpoint(out, step, policy, tokenizer, optimizer, scheduler, pool, self.snapshot, cfg, full)
        if self.world > 1:
            parallel.dist_call("barrier")

    def _save_interrupted(self) -> None:
        policy, _, tokenizer, optimizer, scheduler, pool = self.models
        out, completed = self.cfg.out, self.completed
        pool.truncate(self.pool_len)  # drop problems of the unfinished step; weights are still `completed`'s
        if self.cfg.fsdp and latest_checkpoint(out) != checkpoint_dir(out, completed):
            self.log(f"\ninterrupted: with --fsdp one rank cannot gather the sharded state, so step {completed} is "
                     f"not saved; {next_command(out)}")
        elif latest_checkpoint(out) != checkpoint_dir(out, completed):
            self.log(f"\ninterrupted: saving step {completed} (a second Ctrl-C waits for it)")
            path = save_checkpoint(out, completed, policy, tokenizer, optimizer, scheduler, pool, self.snapshot, self.cfg)
            self.log(f"saved {path}; continue with --resume")
        else:
            self.log(f"\ninterrupted: step {completed} is already saved in {checkpoint_dir(out, completed)}; "
                     "continue with --resume")

    def finish(self) -> Optional[str]:
        """Leave the process group; the path of the final checkpoint."""
        if self.tracker:
            self.tracker.close()
            self.tracker = None
        if parallel.active() is not None:
            parallel.active().destroy_process_group()
        return self.final or latest_checkpoint(self.cfg.out)



# ------------------------------------------------------------------------------------------------
# What a step logs: metrics.jsonl and problems.jsonl rows, from the step's Candidates and TrainSeqs
# ------------------------------------------------------------------------------------------------

def step_metrics(step: int, rounds_cands: list, rounds: list, chosen: list, pool, cfg, update: dict,
                 timers) -> dict:
    """One metrics.jsonl line: every reward component by role, solve-rate histogram, lengths, costs."""
    cands = [c for cs in rounds_cands for c in cs]
    legal = [c for c in cands if c.parsed.legal]
    seqs = [s for r in rounds for s in r]
    teach = [s for s in seqs if s.role == "teacher"]
    stud = [s for s in seqs if s.role == "student"]
    mean = lambda xs: float(np.mean(xs)) if len(xs) else 0.0  # noqa: E731
    hist = np.histogram([c.solve_rate for c in legal if c.n_parsed], bins=10, range=(0, 1))[0]
    peak = peak_memory_gib()
    return {
        "step": step, "recipe": cfg.recipe, **update,
        "teacher/legal_rate": len(legal) / max(len(cands), 1),
        "teacher/reward": mean([c.reward for c in cands]),
        "teacher/solvability": mean([c.solv for c in legal]),
        "teacher/diversity": mean([c.div for c in legal]),
        "teacher/length": mean([c.length for c in legal]),
        "teacher/format": mean([c.fmt for c in legal]),
        "student/reward": mean([r for c in legal for r in c.student_rewards]),
        "student/agree": mean([float(a is not None and a == c.majority) for c in legal for a in c.answers]),
        "student/format": mean([f for c in legal for f in c.student_formats]),
        "student/parsed_rate": mean([float(a is not None) for c in legal for a in c.answers]),
        "solve_rate/mean": mean([c.solve_rate for c in legal if c.n_parsed]),
        "solve_rate/in_band": mean([float(c.solv > 0) for c in legal]),
        "solve_rate/hist10": hist.tolist(),
        "rounds/no_legal": sum(not any(c.parsed.legal for c in cs) for cs in rounds_cands),
        "rounds/no_student": sum(not studs for _, studs in chosen),  # per round in both scopes
        "train/teacher_seqs": len(teach), "train/student_seqs": len(stud),
        "train/teacher_adv_abs": mean([abs(s.advantage) for s in teach]),
        "train/student_adv_abs": mean([abs(s.advantage) for s in stud]),
        "len/teacher": mean([len(c.completion.ids) for c in cands]),
        "len/student": mean([len(s.ids) for c in legal for s in c.solutions]),
        "pool": len(pool.problems),
        **{f"sec/{k}": round(timers[k], 3) for k in ("teacher_gen", "student_gen", "scoring", "train", "step")},
        "tok_per_sec/teacher": timers["teacher_tokens"] / max(timers["teacher_gen"], 1e-9),
        "tok_per_sec/student": timers["student_tokens"] / max(timers["student_gen"], 1e-9),
        "peak_mem_gib": round(peak, 3),
    }


def problem_rows(step: int, rnd: int, ref_texts: list, cands: list, groups: list, students: list) -> list:
    """problems.jsonl rows: every teacher output of the round with its reference and scores."""
    rows = []
    for i, c in enumerate(cands):
        rows.append({
            "step": step, "round": rnd, "reference": ref_texts[c.group], "problem": c.parsed.problem,
            "legal": c.parsed.legal, "concepts": c.parsed.concepts, "solve_rate": c.solve_rate,
            "n_parsed": c.n_parsed, "majority": c.majority, "answers": c.answers,
            "rewards": {"total": c.reward, "solvability": c.solv, "diversity": c.div, "length": c.length,
                        "format": c.fmt},
            "trained_as_teacher": c.group in groups, "trained_as_student": i in students,
            "teacher_output": c.completion.text,
        })
    return rows
