"""Generation engines: HF `model.generate` (the reference), transformers' continuous batching, and vLLM.

Plumbing beside opensir.py; a first reading can skip it. Every engine has one small interface: `generate`
(raw token ids for tokenised prompts, one budget per call or per prompt, the run's Sampling, one seed per
prompt), `update` (take the new weights after an optimiser step), `sleep` and `wake` (free and retake
generation memory around training). opensir.generate turns the ids into Completions (cut at the first EOS).

The continuous engine: `model.generate` pads each batch to its longest member and keeps every row's slot
until the longest one ends. Continuous batching (transformers >= 5: `model.generate_batch`, a paged KV
cache) lets a finished sequence's slot go to a waiting one, so eight solutions whose lengths differ
several-fold do not wait for the longest. Its manager is kept across the calls of a step and freed by
`sleep`; each call restarts it over the weights as they are at that moment (the loop updates them in place
after every optimiser step).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import models

PAGE_TOKENS = 64  # tokens per KV page: small pages waste less on short completions
CPU_BATCH_TOKENS = 512  # tokens per forward on CPU (prefill chunks + decodes); GPU: transformers' default
# Sequences decoding at once on CPU. Without flash attention (CUDA only), transformers' paged attention
# attends every query over the keys of all sequences in the batch under a mask: cost grows with the
# square of the concurrency, so on CPU a few sequences at a time beat many. GPU: transformers' default.
CPU_MAX_REQUESTS = 32
FREE_SHARE = {"cuda": 0.85, "cpu": 0.5}  # share of free memory the KV cache may take (CPU RAM is shared)


def softcap_refusal(model) -> Optional[str]:
    """Why the continuous engine must not run `model`, or None. Gemma-2 soft-caps its attention logits
    (tanh(s / c) * c before the softmax). Of transformers 5.24's paged attention paths, `paged|eager`
    (integrations/eager_paged.py) drops the `softcap` argument, so it would sample from another
    distribution; `sdpa` raises on it (integrations/sdpa_attention.py); only flash attention passes it
    to the kernel (modeling_flash_attention_utils.py), and that needs a CUDA GPU with flash-attn."""
    cfg = model.config.get_text_config()
    cap = getattr(cfg, "attn_logit_softcapping", None)
    if cap is None:
        return None
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available
    if model.device.type == "cuda" and (is_flash_attn_2_available() or is_flash_attn_3_available()):
        return None  # transformers switches the model to flash attention, which keeps the cap
    return (f"--engine continuous cannot run {cfg.model_type}: it soft-caps attention logits at {cap}, and "
            "the only paged attention in transformers that keeps the cap is flash attention, which needs a "
            "CUDA GPU and `pip install flash-attn` (>= 2.6). Use --engine generate (eager attention keeps "
            "the cap).")


@contextlib.contextmanager
def full_attention_within_window(model, longest: int):
    """Inside: a model with sliding-window layers (Gemma-2: every other layer, window 4096) treats every layer
    as full attention, when no sequence (prompt + budget) is longer than the window. That is exact: a window
    wider than the sequence hides nothing. It gives continuous batching one kind of layer to cache."""
    cfg = model.config.get_text_config()
    window, types = getattr(cfg, "sliding_window", None), getattr(cfg, "layer_types", None)
    if not window or not types or "sliding_attention" not in types or longest > window:
        yield
        return
    cfg.layer_types = ["full_attention"] * len(types)
    try:
        yield
    finally:
        cfg.layer_types = types


def kv_bytes_per_token(model, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of keys and values one token holds across all layers (models.kv_bytes, in the model's dtype)."""
    return models.kv_bytes(model.config, (dtype or model.dtype).itemsize)


def free_memory_bytes(device: torch.device) -> int:
    """What the KV cache may draw on: free GPU memory, or the kernel's MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # no /proc (macOS): assume 4 GiB and let --kv_cache_gib say otherwise


def kv_budget_blocks(model, prompt_lens: list, max_new_tokens: int, cap_gib: float) -> int:
    """KV pages for one call: what the whole workload would fill at once (more is never used), within
    FREE_SHARE of free memory and the user's cap (--kv_cache_gib, 0: none), and at least one request's."""
    per_block = kv_bytes_per_token(model) * PAGE_TOKENS
    need = sum(math.ceil((n + max_new_tokens) / PAGE_TOKENS) for n in prompt_lens)
    budget = FREE_SHARE.get(model.device.type, 0.5) * free_memory_bytes(model.device)
    if cap_gib > 0:
        budget = min(budget, cap_gib * 2**30)
    return max(min_blocks(prompt_lens, max_new_tokens), min(need, int(budget // per_block)))


def min_blocks(prompt_lens: list, max_new_tokens: int) -> int:
    """The smallest cache that holds the longest request whole."""
    return math.ceil((max(prompt_lens) + max_new_tokens) / PAGE_TOKENS) + 1


def is_oom_text(text: str) -> bool:
    return "out of memory" in text.lower() or "memoryerror" in text.lower() or "memory footprint" in text.lower()


@torch.no_grad()
def generate_continuous(model, prompts: list, eos_ids: list, max_new_tokens: int, temperature: float,
                        top_k: int, top_p: float, greedy: bool = False, kv_cache_gib: float = 0.0,
                        log: Callable = print, desc: str = "", keep: Optional[dict] = None,
                        budgets: Optional[list] = None) -> list:
    """Raw generated token ids, one list per prompt (list of token ids), in order, from continuous
    batching with the same sampler as HF generate: temperature, then top-k, then top-p (transformers
    builds the same warpers for both), any of `eos_ids` ends a sequence. Out of memory (building the
    cache or mid-run) halves the KV budget, says so, and reruns only the prompts that failed.
    keep: a dict that holds one manager from call to call (ContinuousEngine): its paged cache and warm-up are
    paid once, and each call restarts its loop over the model's current weights."""
    from transformers import GenerationConfig
    refusal = softcap_refusal(model)
    if refusal:
        raise ValueError(refusal)
    if not prompts:
        return []
    gen_cfg = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else temperature, top_k=None if greedy else top_k,
        top_p=None if greedy else top_p, max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids),
        pad_token_id=eos_ids[0])
    blocks = kv_budget_blocks(model, [len(p) for p in prompts], max_new_tokens, kv_cache_gib)
    if keep and keep["key"] == (gen_cfg.do_sample, gen_cfg.temperature, gen_cfg.top_k, gen_cfg.top_p) and (
            keep["blocks"] >= min_blocks([len(p) for p in prompts], max_new_tokens)):
        blocks = keep["blocks"]  # the kept manager's cache serves this call
    else:
        release(keep)
        model.destroy_cached_continuous_batching_manager()  # never reuse a manager someone else left behind
    # transformers logs, rather than raises, per-request failures (we raise them below) and, on CPU without
    # psutil, an error about its memory breakdown that does not apply once num_blocks is given
    cb_logger = logging.getLogger("ContinuousBatchingLogger")
    level = cb_logger.level
    cb_logger.setLevel(logging.CRITICAL)
    # transformers runs gc.collect() twice per call: over a trainer's heap that is ~1 s of fixed cost.
    # Freezing moves the objects alive now out of the collector's sight until unfreeze puts them back.
    gc.freeze()
    try:
        return _run(model, prompts, gen_cfg, blocks, budgets or [max_new_tokens] * len(prompts), log, desc,
                    floor=min_blocks([len(p) for p in prompts], max_new_tokens), keep=keep)
    finally:
        gc.unfreeze()
        cb_logger.setLevel(level)


def release(keep: Optional[dict]) -> None:
    """Destroy a kept manager (its cache goes with it)."""
    if keep:
        keep["manager"].destroy()
        keep.clear()


def _run(model, prompts, gen_cfg, blocks, budgets: list, log, desc, floor: int, keep: Optional[dict] = None) -> list:
    batch_tokens = CPU_BATCH_TOKENS if model.device.type == "cpu" else None
    max_req = CPU_MAX_REQUESTS if model.device.type == "cpu" else None
    out: list = [None] * len(prompts)
    todo = list(range(len(prompts)))
    while todo:
        errors = []
        try:
            got = _one_pass(model, [prompts[i] for i in todo], gen_cfg, blocks, batch_tokens, max_req, desc, keep,
                            [budgets[i] for i in todo])
            for i, (ids, err) in zip(todo, got):
                if err is None:
                    out[i] = ids[:budgets[i]]
                else:
                    errors.append(err)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
            errors.append(f"{type(err).__name__}: {err}")
        todo = [i for i in todo if out[i] is None]
        if not todo:
            break
        oom = any(is_oom_text(e) for e in errors)
        if not oom or blocks <= floor:  # not a budget problem, or no smaller budget fits one request
            hint = (" transformers saw no memory at all: on CPU it reads it with psutil (pip install psutil)."
                    if "available memory 0" in " ".join(errors) else "")
            raise RuntimeError(f"continuous engine failed on {len(todo)} prompts: {errors[0]}.{hint} "
                               "Try a smaller --kv_cache_gib, or --engine generate.")
        release(keep)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        blocks = max(floor, blocks // 2)
        batch_tokens = max(64, (batch_tokens or 8192) // 2)
        gib = blocks * PAGE_TOKENS * kv_bytes_per_token(model) / 2**30
        log(f"[{desc or 'generate'}] out of memory: retrying {len(todo)} prompts with a KV cache of "
            f"{gib:.2f} GiB (set --kv_cache_gib to start there)")
    return out


def _one_pass(model, prompts, gen_cfg, blocks, batch_tokens, max_req, desc, keep: Optional[dict] = None,
              budgets: Optional[list] = None) -> list:
    """[(generated ids, None) or (None, error text)] per prompt, from one continuous-batching manager.
    Like model.generate_batch, except that every request is queued before the loop starts (the same
    batches, hence the same samples, on every run with the same seed), failures come back per request
    rather than only in a log, and the model's attention implementation is restored whatever happens."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints
    from tqdm.auto import tqdm
    import inspect
    size = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters else "block_size"
    cb_cfg = ContinuousBatchingConfig(  # (transformers before 5.18, which vLLM 0.31 pins, calls a page a block)
        **{size: PAGE_TOKENS}, num_blocks=blocks, max_batch_tokens=batch_tokens, max_requests_per_batch=max_req,
        max_memory_percent=0.95, cpu_offload_space=0.0)
    hints = WorkloadHints(max_prompt_length=max(len(p) for p in prompts),
                          max_generated_length=gen_cfg.max_new_tokens, num_requests=len(prompts))
    attn = model.config._attn_implementation
    manager, results, done = (keep or {}).get("manager"), {}, False
    try:
        if manager is not None:  # a kept manager: its attention switch was undone at its last stop
            manager.switch_to_cb_friendly_attn(model)
            manager.background_thread_status.clear()  # a stopped loop accepts no requests until cleared
        else:
            manager = model.init_continuous_batching(generation_config=gen_cfg, continuous_batching_config=cb_cfg,
                                                     workload_hints=hints)
            # Building the batch processor reseeds torch with a draw plus the process's rank (transformers'
            # DistributedHelper.set_tp_seed, made for tensor parallelism): the caller's seed is put back.
            rng = torch.random.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            manager.warmup()  # builds the paged cache here, so running out of memory raises here
            torch.random.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        if budgets and len(set(budgets)) > 1:  # a budget per request (benchmarks emulating length distributions)
            ids = [manager.add_request(p, max_new_tokens=b) for p, b in zip(prompts, budgets)]
        else:
            ids = manager.add_requests(inputs=prompts, max_new_tokens=gen_cfg.max_new_tokens)
        manager.start()
        with tqdm(total=len(prompts), desc=desc, leave=False, dynamic_ncols=True, disable=not desc) as bar:
            while len(results) < len(ids):
                r = manager.get_result(timeout=1)
                if r is None:
                    if not manager.is_running():
                        break
                elif r.is_finished():  # finished or failed
                    results[r.request_id] = r
                    bar.update(1)
        done = len(results) == len(ids) and all(r.error is None for r in results.values())
    finally:
        if manager is not None and keep is not None and done:  # kept, cache and all, for the next call
            manager.stop(block=True, timeout=60, keep_for_next_session=True)
            keep.update(manager=manager, key=(gen_cfg.do_sample, gen_cfg.temperature, gen_cfg.top_k, gen_cfg.top_p),
                        blocks=blocks)
        elif manager is not None:
            if manager.is_running():
                manager.stop(block=True, timeout=60)
            manager.destroy()
            if keep:
                keep.clear()
        if model.config._attn_implementation != attn:
            model.set_attn_implementation(attn)
    fatal = manager.background_thread_status.fatal_error
    return [(list(results[i].generated_tokens), None) if i in results and results[i].error is None
            else (None, str(results[i].error) if i in results else f"no result ({fatal})") for i in ids]



# ------------------------------------------------------------------------------------------------
# Seeded sampling: each sequence draws from its own stream, so a completion depends on its prompt, the
# weights and its seed, not on which other prompts share its batch (or its process, under torchrun).
# ------------------------------------------------------------------------------------------------


@dataclass
class Sampling:
    """How every engine samples: temperature, then top-k, then top-p (HF's order), or argmax when greedy."""
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    greedy: bool = False


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, three rounds) on int64 tensors holding values < 2**32."""
    for _ in range(3):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32  # the product stays below 2**59: no int64 overflow
    return (x >> 16) ^ x


def uniform(seeds: torch.Tensor, t: int) -> torch.Tensor:
    """(b,) float64 in (0, 1): the t-th uniform draw of each seed's stream, a pure function of (seed, t)."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    x = _mix32(_mix32(lo) ^ hi ^ _mix32(torch.full_like(lo, t & _MASK32)))
    return (x.double() + 0.5) / 2.0**32


def seeded_sampler(sampling: Sampling, seeds: list, start: int):
    """A logits processor for model.generate(do_sample=False): it applies HF's own temperature, top-k and
    top-p warpers, then draws each row's next token by inverse CDF at uniform(seed_row, t), t the number of
    tokens generated so far, and leaves that token the only finite logit, so the argmax takes it."""
    from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    warpers = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))

    class SeededSampling(LogitsProcessor):
        def __init__(self):
            self.seeds = torch.tensor(seeds, dtype=torch.int64)

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            for w in warpers:
                scores = w(input_ids, scores)  # (b, V)
            cdf = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)  # (b, V)
            u = uniform(self.seeds, input_ids.shape[1] - start).to(cdf.device) * cdf[:, -1]  # (b,)
            token = torch.searchsorted(cdf, u[:, None]).clamp_(max=scores.shape[-1] - 1)  # (b, 1)
            return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)

    return SeededSampling()


def budget_stop(budgets: list, start: int, eos_id: int):
    """A logits processor that ends row i with EOS once it has generated budgets[i] - 1 tokens: a budget per
    request inside one padded batch (benchmarks emulating the paper's length distributions)."""
    from transformers import LogitsProcessor

    class BudgetStop(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            done = torch.tensor([input_ids.shape[1] - start >= b - 1 for b in budgets], device=scores.device)  # (b,)
            forced = torch.full_like(scores, float("-inf"))
            forced[:, eos_id] = 0.0
            return torch.where(done[:, None], forced, scores)

    return BudgetStop()


class HFEngine:
    """`--engine generate`: HF model.generate on left-padded batches of `batch_size` prompts sorted by length
    (less padding), KV cache, every EOS id stops a row; a batch that runs out of memory is halved and rerun.

    compile_width > 0 (--compile): the decode step is compiled (transformers' own torch.compile of the
    forward, CUDA graphs on a GPU) over a static KV cache. Every batch is padded to `batch_size` rows and its
    prompts to `compile_width` tokens, so the shapes never change and nothing recompiles whatever the prompt
    widths (one graph per token budget); a longer prompt runs eagerly. Greedy output equals the eager path."""
    name = "generate"

    def __init__(self, model, eos_ids: list, pad_id: int, batch_size: int, log: Callable = print,
                 compile_width: int = 0, compile_backend: str = "inductor"):
        self.model, self.eos_ids, self.pad_id, self.batch_size, self.log = model, eos_ids, pad_id, batch_size, log
        self.compile_width, self.compile_backend = compile_width, compile_backend  # backend: "aot_eager" in tests

    def _compiled(self, width: int, max_new_tokens: int) -> dict:
        """generate() arguments for the compiled path, or {} when the batch runs eagerly."""
        if not self.compile_width or width > self.compile_width:
            return {}
        from transformers import CompileConfig, StaticCache
        cuda = next(self.model.parameters()).device.type == "cuda"
        compile_cfg = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if cuda else None, backend=self.compile_backend)
        compile_cfg._compile_all_devices = True  # transformers compiles on GPUs only unless told
        cache = StaticCache(config=self.model.config, max_cache_len=self.compile_width + max_new_tokens)
        return dict(compile_config=compile_cfg, past_key_values=cache)

    @torch.no_grad()
    def generate(self, prompts: list, max_new_tokens: int, sampling: Sampling, seeds: list, desc: str = "",
                 budgets: Optional[list] = None) -> list:
        from transformers import GenerationConfig, LogitsProcessorList
        device = next(self.model.parameters()).device
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list = [None] * len(prompts)
        bar, pos = progress(total=len(prompts), desc=desc), 0
        while pos < len(order):
            idx = order[pos: pos + self.batch_size]
            width = max(len(prompts[i]) for i in idx)
            compiled = self._compiled(width, max_new_tokens)
            rows = [prompts[i] for i in idx] + [[self.pad_id]] * ((self.batch_size - len(idx)) if compiled else 0)
            row_seeds = [seeds[i] for i in idx] + [0] * (len(rows) - len(idx))
            width = self.compile_width if compiled else width
            input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in rows])  # (b, L)
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])  # (b, L)
            procs = [] if sampling.greedy else [seeded_sampler(sampling, row_seeds, width)]
            if budgets:
                procs.append(budget_stop([budgets[i] for i in idx] + [max_new_tokens] * (len(rows) - len(idx)), width,
                                         self.eos_ids[0]))
            gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids,
                                       pad_token_id=self.pad_id, use_cache=True,  # the model's own defaults play no part
                                       compile_config=compiled.pop("compile_config", None))
            try:
                gen = self.model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device),
                                          generation_config=gen_cfg, logits_processor=LogitsProcessorList(procs),
                                          **compiled)
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_oom(err) or self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                torch.cuda.empty_cache()
                bar.write(f"[{desc}] out of memory: retrying with --gen_batch {self.batch_size}")
                continue
            for row, i in enumerate(idx):
                out[i] = gen[row, width:].tolist()
            bar.update(len(idx))
            pos += len(idx)
        bar.close()
        return out

    def update(self, policy) -> None:
        """Copy the updated weights into the generation copy (nothing to do when it is the policy itself);
        with --fsdp one parameter gathered at a time."""
        if self.model is policy:
            return
        from torch.distributed.tensor import DTensor
        full = dict(policy.named_parameters())
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                q = full[name]
                p.copy_(q.full_tensor() if isinstance(q, DTensor) else q)

    def sleep(self) -> None:  # the HF engines keep no memory between calls
        pass

    def wake(self) -> None:
        pass


class ContinuousEngine(HFEngine):
    """`--engine continuous`: transformers' continuous batching (generate_continuous above), one manager kept
    from call to call (restarted per call over the model's current weights, updated in place) and released
    by `sleep`, around training: every step then starts from a fresh manager, as a resumed step does, so a
    resume stays exact (a kept manager's scheduling state would change the batches). It takes no
    logits processor, so it samples from the global torch stream, seeded per call from the call's first
    seed: reproducible for the same call, but a completion depends on the other prompts of its call."""
    name = "continuous"

    def __init__(self, model, eos_ids: list, pad_id: int, kv_cache_gib: float = 0.0, log: Callable = print):
        super().__init__(model, eos_ids, pad_id, batch_size=0, log=log)
        self.kv_cache_gib = kv_cache_gib
        self.kept: dict = {}  # one manager for a step's calls: its paged cache and warm-up are paid once a step

    def generate(self, prompts: list, max_new_tokens: int, sampling: Sampling, seeds: list, desc: str = "",
                 budgets: Optional[list] = None) -> list:
        if not prompts:
            return []
        torch.manual_seed(seeds[0] % 2**63)
        with full_attention_within_window(self.model, max(len(p) for p in prompts) + max_new_tokens):
            return generate_continuous(self.model, prompts, self.eos_ids, max_new_tokens, sampling.temperature,
                                       sampling.top_k, sampling.top_p, greedy=sampling.greedy,
                                       kv_cache_gib=self.kv_cache_gib, log=self.log, desc=desc, keep=self.kept,
                                       budgets=budgets)

    def sleep(self) -> None:
        """Free the kept manager and its KV cache for training."""
        release(self.kept)


class VLLMEngine:
    """`--engine vllm`: vLLM in this process, sharing the GPU with training (the pattern of TRL's colocate
    mode), an optional extra (requirements-vllm.txt). It is built with dummy weights and takes the policy's
    weights by a push after every optimiser step (load_weights), so it replaces the compute-dtype sampler
    copy. Around training it sleeps (level 2: weights and KV cache freed); `update` retakes the weights
    memory and pushes, `wake` retakes the KV cache. Every request carries its own seed, the run's
    temperature, top-k and top-p, and every EOS id as a stop token; token ids come back, cut at the first
    EOS by opensir.generate as for the other engines. `llm`: an object with vLLM's LLM interface (tests)."""
    name = "vllm"

    def __init__(self, path: str, eos_ids: list, pad_id: int, max_model_len: int, gpu_memory: float,
                 seed: int = 0, dtype: str = "bfloat16", log: Callable = print, llm=None):
        self.eos_ids, self.pad_id, self.log = eos_ids, pad_id, log
        if llm is None:
            import os
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights pass by reference
            from vllm import LLM
            llm = LLM(model=path, dtype=dtype, load_format="dummy", enable_sleep_mode=True, seed=seed,
                      gpu_memory_utilization=gpu_memory, max_model_len=max_model_len, enable_prefix_caching=False)
        self.llm, self.asleep, self.weights_current = llm, False, False

    def generate(self, prompts: list, max_new_tokens: int, sampling: Sampling, seeds: list, desc: str = "",
                 budgets: Optional[list] = None) -> list:
        if not prompts:
            return []
        if not self.weights_current:
            raise RuntimeError("--engine vllm: generate before the policy's weights were pushed (update)")
        self.wake()
        from vllm import SamplingParams
        greedy = sampling.greedy
        params = [SamplingParams(n=1, temperature=0.0 if greedy else sampling.temperature,
                                 top_k=(sampling.top_k or -1) if not greedy else -1,
                                 top_p=1.0 if greedy else sampling.top_p, max_tokens=b, seed=s,
                                 stop_token_ids=list(self.eos_ids), detokenize=False)
                  for s, b in zip(seeds, budgets or [max_new_tokens] * len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=bool(desc))
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            if c.finish_reason == "stop" and (not ids or ids[-1] not in self.eos_ids):
                ids.append(c.stop_reason if isinstance(c.stop_reason, int) else self.eos_ids[0])  # a stop token vLLM held back
            result.append(ids)
        return result

    def update(self, policy) -> None:
        """Push the policy's weights (whole, one parameter at a time under --fsdp) into vLLM's model."""
        from torch.distributed.tensor import DTensor
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        weights = [(name, (p.full_tensor() if isinstance(p, DTensor) else p).detach())
                   for name, p in policy.named_parameters()]
        self.llm.apply_model(lambda model: model.load_weights(weights))
        self.llm.reset_prefix_cache()
        self.weights_current = True

    def sleep(self) -> None:
        if not self.asleep:
            self.llm.sleep(level=2)  # weights and KV cache freed: the weights come back by update's push
            self.asleep, self.weights_current = True, False

    def wake(self) -> None:
        if self.asleep:
            if not self.weights_current:
                raise RuntimeError("--engine vllm: woken before the policy's weights were pushed (update)")
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False


def vllm_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


def make_engine(name: str, model, eos_ids: list, pad_id: int, batch_size: int, kv_cache_gib: float = 0.0,
                log: Callable = print, path: str = "", max_model_len: int = 0, gpu_memory: float = 0.3,
                seed: int = 0, compile_width: int = 0, max_new_tokens: int = 0):
    """The engine `name` ("auto" resolved by resolve_engine) over `model`, the generation copy of the policy;
    vLLM builds its own copy of `path` and takes the policy's weights by push (push them before generating)."""
    chosen, why = resolve_engine(name, model, max_new_tokens)
    if chosen == "vllm":
        engine = VLLMEngine(path, eos_ids, pad_id, max_model_len, gpu_memory, seed, log=log)
    elif chosen == "continuous":
        engine = ContinuousEngine(model, eos_ids, pad_id, kv_cache_gib, log)
    else:
        engine = HFEngine(model, eos_ids, pad_id, batch_size, log, compile_width)
    engine.why = why
    return engine


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# The generation engines (--engine). "continuous" is transformers' own continuous batching
# (engines.py): a finished sequence's slot goes to a waiting one instead of idling until its batch's
# longest member ends. "auto": auto_engine, by measurement.
ENGINES = {"generate": "HF model.generate, padded batches of --gen_batch",
           "continuous": "transformers continuous batching, paged KV cache (engines.py)",
           "vllm": "vLLM in this process, weights pushed after every step (pip install -r requirements-vllm.txt)"}


def auto_engine(device: str, n_params: int, max_new_tokens: int) -> tuple:
    """(engine, why) for --engine auto, from measurements (docs/engines.md). A GPU: vLLM where it is
    installed, else `generate` (no GPU has measured continuous batching faster). A CPU: `generate` at every
    shape measured, whole steps, engines alternating: the continuous engine's set-up makes the step of the
    tiny and toy models ~1.3x slower, and at 29.4M parameters with 128-256 new tokens it was level."""
    shape = f"{n_params / 1e6:.1f}M parameters, up to {max_new_tokens} new tokens"
    if device == "cuda" and vllm_available():
        return "vllm", f"auto on cuda: vllm is installed ({shape})"
    if device == "cpu":
        return "generate", (f"auto on cpu ({shape}): the whole step measured as fast or faster than continuous "
                            "batching at every shape tried (docs/engines.md)")
    return "generate", f"auto on {device} ({shape}): continuous batching not measured faster there"


def resolve_engine(engine: str, model, max_new_tokens: int = 0) -> tuple:
    """(the engine that runs `model`, why): "auto" by auto_engine; `generate` where the continuous engine
    would change the model's distribution (Gemma-2's soft-capping), and asked for, that is an error."""
    why = f"--engine {engine}"
    if engine == "auto":
        engine, why = auto_engine(model.device.type, sum(p.numel() for p in model.parameters()), max_new_tokens)
    if engine == "vllm":
        if model.device.type != "cuda" or not vllm_available():
            raise ValueError("--engine vllm needs a CUDA GPU and `pip install -r requirements-vllm.txt`; "
                             "use --engine generate")
        return "vllm", why
    if engine == "continuous":
        refusal = softcap_refusal(model)
        if refusal:
            raise ValueError(refusal)
    return engine, why


def progress_range(start: int, stop: int, step: int, desc: str):
    """range(start, stop, step) under a progress bar (none without desc)."""
    from tqdm.auto import tqdm
    return tqdm(range(start, stop, step), desc=desc, leave=False, dynamic_ncols=True, disable=not desc)


def progress(total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not desc)
