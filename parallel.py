"""Several processes (`torchrun --nproc_per_node N opensir.py ...`) and --fsdp.

Plumbing beside opensir.py; a first reading can skip it: with one process (a plain `python opensir.py`)
every function here is a no-op or returns its input, and torch.distributed is never touched.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

from models import pick_device



# --- several processes: `torchrun --nproc_per_node N opensir.py ...` -------------------------------
# Every rank holds the whole model (policy, sampler, frozen reference) and plays rounds_per_step / N of
# a step's rounds (contiguous blocks, rank 0 first). Each round is seeded from (seed, step, round) and
# draws its references from the pool as it stood at the start of the step, so a round's rollouts do not
# depend on N or on the rank that plays it. The ranks then swap their rounds' candidates, so every rank
# holds the whole step (selection, the pool, the logs: the same code as one process), and each trains
# only its own rounds' sequences; gradients are summed across ranks (the loss weights already divide by
# the step's number of rounds), then clipped once. A plain `python opensir.py` run has N = 1 and never
# touches torch.distributed.


# --fsdp: FSDP2 (fully_shard) holds 1/N of the fp32 weights, gradients and AdamW state on each rank.
# sequence_logprobs calls the decoder and the lm_head separately (never the whole model's forward), so
# the units are every decoder layer and, when untied, the input embedding and the lm_head; the rest (the
# final norm; a tied embedding/lm_head, which one unit cannot serve from two call sites) stays whole on
# every rank and is summed by sum_gradients. FSDP's reduce-scatter sums the sharded gradients (divide
# factor 1). Generation and the reference use whole per-rank copies (the sampler), so only training
# runs FSDP's collectives, and every rank runs as many passes (optimise pads).


def dist_env() -> tuple:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def dist_errors(cfg) -> list:
    """What torchrun's N and the config cannot be together (checked before any model loads)."""
    _, world = dist_env()
    errors = []
    if cfg.rounds_per_step % world:
        errors.append(f"--rounds_per_step {cfg.rounds_per_step} cannot be shared out over {world} processes "
                      f"(torchrun --nproc_per_node x --nnodes = {world}): pass a --rounds_per_step that "
                      f"{world} divides, or start a number of processes that divides {cfg.rounds_per_step}")
    if cfg.dist_timeout < 1:
        errors.append(f"--dist_timeout must be >= 1 second, got {cfg.dist_timeout}")
    if cfg.fsdp and world == 1:
        errors.append("--fsdp shards the training state over torchrun's processes: start the run with "
                      "torchrun --nproc_per_node N (N >= 2), or drop --fsdp")
    if cfg.fsdp and not hasattr(torch.nn.utils, "clip_grads_with_norm_"):
        errors.append(f"--fsdp needs a newer torch than {torch.__version__} (FSDP2 with summed gradients and "
                      "sharded clipping; tested on 2.13): upgrade torch, or drop --fsdp")
    return errors


def active():
    """torch.distributed when this run has several processes, else None."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    return active().get_rank() if active() else 0


def dist_init(cfg, may_differ: set) -> None:
    """Join torchrun's process group (gloo on CPU, nccl on GPUs; only when WORLD_SIZE > 1), then refuse
    a config that differs across ranks (another flag on another node)."""
    import datetime
    import hashlib
    import torch.distributed as dist
    rk, world = dist_env()
    if world == 1 or dist.is_initialized():
        return
    cuda = pick_device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # "cuda" below means this rank's GPU
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    digest = hashlib.sha256(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in may_differ},
                                       sort_keys=True).encode()).hexdigest()
    digests = dist_call("all_gather_object", [None] * world, digest)
    if len(set(digests)) > 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise SystemExit(f"rank {rk}: ranks {bad} were started with a config other than rank 0's; start every "
                         "node with the same flags")


def dist_call(name: str, *args):
    """One collective of torch.distributed, with a clear message when it fails: another rank died, or did
    not arrive within --dist_timeout. all_gather_object and broadcast_object_list return their list."""
    dist = active()
    try:
        getattr(dist, name)(*args)
    except (RuntimeError, ValueError) as err:  # DistBackendError (a peer closed its socket), timeouts
        raise SystemExit(f"rank {dist.get_rank()}: {name} failed: another rank stopped or did not arrive "
                         f"within --dist_timeout ({(str(err).splitlines() or [''])[0][:200]})") from None
    return args[0] if name.endswith("_object") or name.endswith("_object_list") else None


def exit_process(status=0) -> None:
    """End a torchrun process whose work is written (or that stops with a message): exit at once, without the
    interpreter's teardown. In that teardown torch's gloo threads can abort the process ("terminate called
    without an active exception", SIGABRT), so torchrun reports a finished run as failed, or hides the exit
    status a stop chose (130 after Ctrl-C): seen once in CI, rank 1 of a finished --fsdp run. status: as
    SystemExit's (None, an int, or a message for stderr and exit 1). A one-process run returns."""
    if dist_env()[1] > 1:
        if isinstance(status, str):
            print(status, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status if isinstance(status, int) else 0 if status is None else 1)


def without_prompts(c):
    """A candidate to send to the other ranks: without prompt tokens (they only train their own rounds)."""
    return dataclasses.replace(c, completion=dataclasses.replace(c.completion, prompt_ids=[]),
                               solutions=[dataclasses.replace(s, prompt_ids=[]) for s in c.solutions])


def share_rounds(mine: dict, n_rounds: int) -> list:
    """Every round's candidates, in round order, on every rank; a rank keeps its own rounds as they are."""
    if active() is None:
        return [mine[r] for r in range(n_rounds)]
    parts = dist_call("all_gather_object", [None] * active().get_world_size(), {r: [without_prompts(c) for c in cs] for r, cs in mine.items()})
    every = {r: cs for part in parts for r, cs in part.items()}
    return [mine.get(r, every[r]) for r in range(n_rounds)]


def broadcast(obj):
    """Rank 0's obj on every rank (obj itself with one process)."""
    return obj if active() is None else dist_call("broadcast_object_list", [obj], 0)[0]


def same_on_every_rank(pool, policy) -> str:
    """Check, at every checkpoint, that the ranks still hold the same pool and weights (they should by
    construction: a difference is a bug or a broken GPU, and stops the run). Returns the pool's digest."""
    import hashlib
    h = hashlib.sha256(json.dumps([pool.problems, pool.concepts]).encode())
    if pool.embeddings is not None:
        h.update(pool.embeddings.numpy().tobytes())
    with torch.no_grad():
        weights = float(sum(p.double().sum() for p in policy.parameters()))  # one checksum of the weights
    if active() is None:
        return h.hexdigest()
    seen = dist_call("all_gather_object", [None] * active().get_world_size(), (h.hexdigest(), weights))
    if len(set(seen)) > 1:
        raise SystemExit(f"rank {rank()}: the ranks' pools or weights differ (pool digest, weight sum per rank: "
                         f"{seen}); this is a bug, please report it with the command line")
    return h.hexdigest()


def sum_gradients(params: list) -> None:
    """Sum every gradient over the ranks (each rank's loss already carries its share of 1 / rounds)."""
    if active() is None:
        return
    for p in params:
        if p.grad is None:  # a rank none of whose sequences were selected still takes part
            p.grad = torch.zeros_like(p)
        dist_call("all_reduce", p.grad)


def shard_policy(policy) -> None:
    """fully_shard every decoder layer and, untied, the embedding and the lm_head; gradients summed."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    head, embed = policy.get_output_embeddings(), policy.get_input_embeddings()
    units = [m for m in policy.get_decoder().modules() if type(m).__name__ in set(policy._no_split_modules or ())]
    for m in units + ([embed, head] if head.weight is not embed.weight else []):
        # every unit is its own root (no whole-model forward), and FSDP keeps a root's weights gathered
        # after its forward unless told: reshard, or each rank holds the whole fp32 model until backward
        fully_shard(m, reshard_after_forward=True)
    for m in policy.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # each rank's loss already carries its share of 1 / rounds
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)


def clip_gradients(params: list, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over the whole model's gradient: sharded (DTensor) and whole parameters together."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    parts = [torch.nn.utils.get_total_norm([g for g in grads if isinstance(g, DTensor) == d]) for d in (True, False)]
    parts = [n.full_tensor() if isinstance(n, DTensor) else n for n in parts]  # DTensor: the norm over all shards
    total = torch.sqrt(sum(n.float() ** 2 for n in parts))
    for d in (True, False):  # foreach kernels take no mix of the two
        torch.nn.utils.clip_grads_with_norm_([p for p in params if isinstance(p, DTensor) == d], max_norm, total)
    return total


def full_training_state(policy, optimizer) -> tuple:
    """--fsdp: the whole model and optimizer state dicts, on rank 0's CPU (a collective: every rank calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(policy, options=opts), get_optimizer_state_dict(policy, optimizer, options=opts)


def load_sharded_optimizer(policy, optimizer, full_state: dict) -> None:
    """--fsdp resume: every rank reads the full optimizer state and keeps its shard (any N)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(policy, optimizer, optim_state_dict=full_state,
                             options=StateDictOptions(full_state_dict=True))
