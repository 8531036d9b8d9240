"""The GPU check: every figure the README reports for a GPU, in one script that fits a short lease.

    python gpu_check.py                      # on a CUDA machine: about 8 minutes, random weights, no download
    python gpu_check.py --smoke              # the same sections on the CPU with the tiny model (a test runs it)

Each section runs in its own process under its own timeout and appends one JSON line to --out as soon as it
ends, so a lease that runs out still leaves every finished section behind:
  env         torch, transformers, the GPU, which of vllm / flash-attn / trl import
  generate    the HF engine (`--engine generate`), eager
  compiled    the HF engine with --compile (static KV cache, compiled decode, CUDA graphs)
  continuous  transformers' continuous batching, one manager kept for the run
  vllm        vLLM in-process, where it imports (not on the project's lent GPU: no network to install it)
  step        one full default step of --model gemma-2-2b-it --random_init (training included): time and peak memory
  tests       the suite's GPU tests (pytest -k gpu)
  trl         TRL GRPOTrainer on the same model and completions per step, where trl imports
Engine sections emulate the paper's completion lengths by a budget per request (engines take one per
prompt), drawn around the paper's means (problems 207 tokens, solutions 387) with long tails to the
budgets (1024, 2048); random weights rarely stop by themselves. Each reports tokens/s, the share of the
decode roofline (memory bandwidth over the bytes a decode step reads: the weights once, every sequence's
KV cache), and peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("env", "generate", "compiled", "continuous", "vllm", "step", "tests", "trl")
TIMEOUTS = {"env": 60, "generate": 90, "compiled": 150, "continuous": 90, "vllm": 120, "step": 150,
            "tests": 150, "trl": 120}  # seconds; about 8 minutes when every section runs
MEANS = {"teacher": (207, 1024), "student": (387, 2048)}  # the paper's mean lengths and budgets


def budgets(n: int, mean: int, cap: int, seed: int = 0) -> list:
    """n per-request budgets with the given mean and a long tail to cap (geometric, clipped)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.geometric(1.0 / mean, size=n), 8, cap)]


def engine_section(name: str, args) -> dict:
    import torch
    import bench
    import engines
    import models
    import opensir as O
    device = "cpu" if args.smoke else "cuda"
    model_name = "tiny" if args.smoke else args.model
    model, tok = O.load_model(model_name, device=device, dtype="fp32" if args.smoke else "bf16",
                              random_init=not args.smoke, seed=0)
    if name == "vllm" and not engines.vllm_available():
        return {"skipped": "vllm does not import here"}
    eos = O.eos_token_ids(model, tok)
    n = 16 if args.smoke else args.sequences
    engine = engines.make_engine(
        "generate" if name == "compiled" else name, model, eos, tok.pad_token_id, n, log=lambda *a: None,
        path=models.resolve_model(model_name, O.PROMPTS) if name == "vllm" else "", max_model_len=3072,
        compile_width=256 if name == "compiled" else 0)
    engine.update(model)
    out = {}
    for role, (mean, cap) in MEANS.items():
        if args.smoke:
            mean, cap = 12, 32
        prompt_len = 64 if args.smoke else 256
        prompts = [[(7 * i + j) % (len(tok) - 10) + 5 for j in range(prompt_len)] for i in range(n)]
        b = budgets(n, mean, cap)
        for warm in (True, False):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            gen = engine.generate(prompts[:4] if warm else prompts, cap, engines.Sampling(1.0, 50, 1.0),
                                  list(range(4 if warm else n)), budgets=b[:4] if warm else b)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        comps = [O.Completion(p, O.cut_at_eos(g, eos)[0], "", False) for p, g in zip(prompts, gen)]
        tokens = sum(len(c.ids) for c in comps)
        bw = bench.bandwidth(device, 0.0)[0]  # the device's memory bandwidth (bench.BANDWIDTH), None on a CPU
        roof = bench.roofline_tps(model, comps, bw) if bw else 0.0
        out[role] = {"sequences": n, "tokens": tokens, "seconds": round(dt, 3), "tok_per_s": round(tokens / dt, 1),
                     "roofline_share": round(tokens / dt / roof, 4) if roof else None,
                     "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}
    return out


def run_child(section: str, args) -> dict:
    if section == "env":
        import importlib.util
        import torch
        import transformers
        return {"torch": torch.__version__, "transformers": transformers.__version__,
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else None,
                **{m: importlib.util.find_spec(m) is not None for m in ("vllm", "flash_attn", "trl")}}
    if section in ("generate", "compiled", "continuous", "vllm"):
        return engine_section(section, args)
    if section == "step":
        import tempfile
        out = tempfile.mkdtemp(prefix="gpu-check-step-")
        flags = (["--model", "tiny", "--steps", "1", "--device", "cpu"] if args.smoke else
                 ["--model", args.model, "--random_init", "--steps", "1", "--init_pool_size", "0"])
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.join(HERE, "opensir.py"), *flags, "--out", out],
                              capture_output=True, text=True)
        if proc.returncode:
            return {"error": proc.stdout[-1500:] + proc.stderr[-1500:]}
        m = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
        return {"seconds": round(time.perf_counter() - t0, 1), "peak_mem_gib": m["peak_mem_gib"],
                **{k: v for k, v in m.items() if k.startswith(("sec/", "tok_per_sec/"))}}
    if section == "tests":
        if args.smoke:
            return {"skipped": "not in --smoke"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "gpu", "-p", "no:cacheprovider"],
                              capture_output=True, text=True, cwd=HERE)
        return {"returncode": proc.returncode, "tail": proc.stdout[-800:]}
    if section == "trl":
        import importlib.util
        if importlib.util.find_spec("trl") is None or not os.path.exists(os.path.join(HERE, "bench.py")):
            return {"skipped": "trl does not import here"}
        proc = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--mode", "trl", "--json", "-"]
                              + (["--smoke"] if args.smoke else ["--device", "cuda"]), capture_output=True, text=True)
        return {"returncode": proc.returncode, "tail": (proc.stdout + proc.stderr)[-800:]}
    raise ValueError(section)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.jsonl")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--model", default="gemma-2-2b-it", help="an architecture of models.ARCHITECTURES (random weights)")
    p.add_argument("--sequences", type=int, default=256, help="sequences per engine call")
    p.add_argument("--smoke", action="store_true", help="the CPU and the tiny model, small sizes")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.exit(f"gpu_check.py: unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    passthrough = ["--model", args.model, "--sequences", str(args.sequences)] + (["--smoke"] if args.smoke else [])
    for s in sections:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", s, *passthrough],
                                  capture_output=True, text=True, timeout=TIMEOUTS[s] * (3 if args.smoke else 1))
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": (proc.stdout + proc.stderr)[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"error": f"timed out after {TIMEOUTS[s] * (3 if args.smoke else 1)} s"}
        row = {"section": s, "wall_s": round(time.perf_counter() - t0, 1), **row}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
