"""--fsdp (issue 11, item 3): FSDP2 shards the training state over torchrun's ranks (gloo on the CPU) and
trains what one process trains. The tiny model ties its lm_head to its embedding, so the whole-per-rank
part (embedding, norm) and the sharded decoder layers are both exercised."""
import os

import pytest
import torch

import opensir as O
from test_dist import ARGS, metrics, pool, rows, torchrun, weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """one: 1 process, 2 steps. fsdp: 2 processes with --fsdp, 1 step (a checkpoint), then resumed with
    --fsdp on 2 processes to step 2."""
    d = tmp_path_factory.mktemp("fsdp")
    one, fsdp = str(d / "one"), str(d / "fsdp")
    O.main(ARGS + ["--steps", "2", "--out", one])
    log = torchrun(2, "opensir.py", ARGS + ["--fsdp", "--steps", "1", "--out", fsdp])
    log += torchrun(2, "opensir.py", ARGS + ["--fsdp", "--steps", "2", "--resume", "--out", fsdp])
    return one, fsdp, log


def test_fsdp_on_two_processes_trains_what_one_process_trains(runs):
    one, fsdp, log = runs
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


def test_fsdp_optimizer_state_is_whole(runs):
    """optimizer.pt holds every parameter's AdamW moments, full size (a resume reshards it for any N)."""
    _, fsdp, _ = runs
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
