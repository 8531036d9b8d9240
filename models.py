"""Model loading: short names, hub checks, architectures for random weights, device and dtype.

Plumbing beside opensir.py; a first reading can skip it. opensir.load_model calls load_model here with
the method's prompts (the built-in tiny and toy models are trained on them, tiny.py).
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch



MODELS = {  # short names -> hub ids; any hub id or local directory works too
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
}


# The architectures behind the short names, written down so `--random_init` can build any of them
# with random weights and no download: enough to measure memory and speed before fetching weights.
ARCHITECTURES = {
    "gemma-2-2b-it": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True),
    "llama-3.2-3b-instruct": dict(
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192), tie_word_embeddings=True),
    "qwen2.5-1.5b-instruct": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True),
}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no GPU (use --device cpu)")
    return torch.device(device)


def compute_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """bf16 on GPU (Gemma-2 is unstable in fp16), fp32 on CPU."""
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return torch.float32
    return torch.bfloat16


def model_name_error(name: str, random_init: bool = False) -> Optional[str]:
    """Why `name` cannot name a model, or None. Checked before anything loads."""
    if random_init:
        return None if name in ARCHITECTURES else (
            f"--random_init builds the architectures of {', '.join(ARCHITECTURES)}, not {name!r}")
    if name in ("tiny", "toy") or name in MODELS or os.path.isdir(name) or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return None
    return (f"unknown model {name!r}. Short names: {', '.join(['tiny', 'toy', *MODELS])}. "
            "Or pass a hub id (org/name) or the path of a local directory holding a saved model.")


def hub_error(path: str) -> Optional[str]:
    """For a hub id not in the local cache, why it cannot be fetched now (offline mode, or no route to
    the hub), in one sentence: transformers would spend ~30 s retrying and end in a long traceback."""
    if os.path.isdir(path) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return None
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return None
    fix = (f"download it on a machine with access (`hf download {path} --local-dir DIR`), copy DIR here "
           "and pass DIR instead of the hub id")
    if constants.HF_HUB_OFFLINE:
        return f"{path} is neither a local directory nor in the local hub cache, and HF_HUB_OFFLINE is set: {fix}"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy decides what is reachable; let transformers try
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=10).close()
    except OSError as err:
        return f"{path} is neither a local directory nor in the local hub cache, and {url.hostname} cannot be reached ({err}): {fix}"
    return None


def resolve_model(name: str, prompts: Optional[tuple] = None) -> str:
    """Short name -> hub id; "tiny" and "toy" -> their cache directories, built on first use on `prompts`
    (opensir.PROMPTS: the teacher and student prompt functions); else as given."""
    if model_name_error(name):
        raise ValueError(model_name_error(name))
    if name in ("tiny", "toy"):
        import tiny  # the built-in models' builder lives beside this file; only they need it
        if prompts is None:
            raise ValueError(f"--model {name} is built on opensir.py's prompts: load it through opensir.load_model")
        ensure = tiny.ensure_tiny_model if name == "tiny" else tiny.ensure_toy_model
        return ensure(prompts, cache_root())
    return MODELS.get(name, name)


def attention_for(model_type: str, attn: str = "auto") -> str:
    """Gemma-2 soft-caps its attention logits; SDPA kernels drop the cap, eager attention keeps it."""
    if attn != "auto":
        return attn
    return "eager" if model_type.startswith("gemma2") else "sdpa"


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` entries and a chat template, for random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<user>", "<assistant>"]})
    tok.chat_template = ("<bos>{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant> {% endif %}")
    return tok


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto", attn: str = "auto",
               random_init: bool = False, seed: int = 0, prompts: Optional[tuple] = None):
    """(model, tokenizer) on the device, in eval mode. dtype "fp32" for trained (master) weights.
    prompts: for the built-in tiny and toy models (resolve_model)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    dev = pick_device(device)
    torch_dtype = compute_dtype(dev, dtype)
    if random_init:
        if model_name_error(name_or_path, random_init=True):
            raise ValueError(model_name_error(name_or_path, random_init=True))
        arch = dict(ARCHITECTURES[name_or_path])
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0  # synthetic_tokenizer's
        tokenizer = synthetic_tokenizer(config.vocab_size)
        torch.manual_seed(seed)  # the same seed gives the same "initial weights" (policy and reference)
        with torch.device(dev):  # initialised where it runs: 2-3 B random weights take minutes on a CPU
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch_dtype, attn_implementation=attention_for(config.model_type, attn))
    else:
        path = resolve_model(name_or_path, prompts)
        unreachable = hub_error(path)
        if unreachable:
            raise OSError(unreachable)
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, attn_implementation=attention_for(config.model_type, attn))
        except (OSError, ValueError, SafetensorError) as err:  # missing or damaged files, no network, not a model
            hint = ("Its files may be damaged or incomplete (for a checkpoint, use an older one)." if os.path.isdir(path)
                    else "If this machine is offline, download the model elsewhere and pass its local directory.")
            raise OSError(f"could not load {path!r}: {(str(err).strip().splitlines() or [''])[0]}\n{hint}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(dev).eval(), tokenizer


def cache_root() -> str:
    """Where the project keeps what it builds or downloads: $OPENSIR_CACHE, else ~/.cache/opensir."""
    return os.environ.get("OPENSIR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "opensir")


# ------------------------------------------------------------------------------------------------
# The memory plan: what a run will hold on its device, computed from the model's config before loading.
# ------------------------------------------------------------------------------------------------
PLAN_PROMPT_TOKENS = 1024  # the paper's prompt budget: a generous stand-in for prompt lengths not yet known
PLAN_HEADROOM = 0.92  # share of the device a plan may fill (the allocator, CUDA context and fragmentation take the rest)


def architecture_config(name: str, random_init: bool = False):
    """The transformers config of a model, without loading weights or touching the network: the written-down
    ARCHITECTURES for short names, config.json for a local directory or a hub id already in the cache;
    None when it is not at hand (and for the built-in tiny and toy models, too small to plan)."""
    from transformers import AutoConfig
    if name in ARCHITECTURES:
        arch = dict(ARCHITECTURES[name])
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    if random_init or name in ("tiny", "toy"):
        return None
    try:
        return AutoConfig.from_pretrained(MODELS.get(name, name), local_files_only=True)
    except (OSError, ValueError):
        return None


def count_parameters(config) -> int:
    """The exact parameter count of the model a config builds (instantiated on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def kv_bytes(config, dtype_bytes: int) -> int:
    """Bytes of keys and values one token holds across all layers."""
    cfg = config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * dtype_bytes


def device_memory_bytes(device: torch.device) -> int:
    """All memory of the device: the GPU's total, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return 16 << 30


def memory_plan(cfg, config, world: int = 1) -> list:
    """[(item, bytes, how it was computed)] for one process of a run of `config` under `cfg` (a Config).
    Weights, gradients and AdamW are counted exactly; the KV cache and activations are computed bounds."""
    n = count_parameters(config)
    text = config.get_text_config()
    cd = 4 if compute_dtype(pick_device(cfg.device), cfg.dtype) == torch.float32 else 2
    shard = world if cfg.fsdp else 1
    seq = PLAN_PROMPT_TOKENS + max(cfg.teacher_max_new_tokens, cfg.student_max_new_tokens)
    plan = [("policy weights (fp32)", 4 * n // shard, f"{n:,} parameters x 4 bytes" + (f" / {shard}" if shard > 1 else "")),
            ("gradients (fp32)", 4 * n // shard, "as the weights"),
            ("AdamW moments (fp32)", 8 * n // shard, "two per parameter")]
    if cfg.beta > 0 or cfg.w_div > 0:
        plan.append(("frozen reference", cd * n, f"{n:,} x {cd} bytes (--beta and --w_div use it)"))
    if cfg.engine == "vllm":
        share = int(cfg.vllm_gpu_memory * device_memory_bytes(pick_device(cfg.device)))
        plan.append(("vLLM weights and KV cache", share, f"--vllm_gpu_memory {cfg.vllm_gpu_memory} of the device"))
        return plan + _training_activations(cfg, text, seq, cd)
    if cd != 4 or cfg.fsdp:
        plan.append(("sampler weights", cd * n, f"the generation copy, {cd} bytes a parameter"))
    if cfg.engine == "continuous":
        kv = int(cfg.kv_cache_gib * 2**30)
        plan.append(("KV cache", kv, f"--kv_cache_gib {cfg.kv_cache_gib}" if kv else "sized from free memory at start"))
    else:
        kv = kv_bytes(config, cd) * cfg.gen_batch * seq
        plan.append(("KV cache", kv, f"--gen_batch {cfg.gen_batch} sequences x {seq} tokens x "
                                     f"{kv_bytes(config, cd):,} bytes a token"))
    return plan + _training_activations(cfg, text, seq, cd)


def _training_activations(cfg, text, seq: int, cd: int) -> list:
    acts = cfg.train_micro_batch * seq * text.hidden_size * text.num_hidden_layers * cd
    logits = 3 * cfg.logprob_chunk * text.vocab_size * 4
    return [("training activations", acts + logits,
             f"--train_micro_batch {cfg.train_micro_batch} x {seq} tokens x hidden {text.hidden_size} x "
             f"{text.num_hidden_layers} layers (checkpointed), + --logprob_chunk {cfg.logprob_chunk} x vocab logits")]


def check_memory(cfg, log, world: int = 1) -> None:
    """Print the memory plan before anything loads, and refuse (SystemExit naming the flags to change) a
    run that cannot fit on its GPU."""
    config = architecture_config(cfg.model, cfg.random_init)
    if config is None:
        return
    device = pick_device(cfg.device)
    plan, have = memory_plan(cfg, config, world), device_memory_bytes(device)
    total = sum(b for _, b, _ in plan)
    log(f"memory plan on {device} ({have / 2**30:.0f} GiB): " + ", ".join(f"{k} {b / 2**30:.1f}" for k, b, _ in plan)
        + f"; total {total / 2**30:.1f} GiB")
    if device.type == "cuda" and total > PLAN_HEADROOM * have:
        biggest = sorted(plan, key=lambda p: -p[1])[:3]
        raise SystemExit(
            f"this run needs about {total / 2**30:.1f} GiB on {device} and the device has {have / 2**30:.1f} GiB:\n  "
            + "\n  ".join(f"{k}: {b / 2**30:.1f} GiB ({how})" for k, b, how in biggest)
            + "\nLower --gen_batch or set --kv_cache_gib (KV cache), lower --train_micro_batch (activations), "
              "--beta 0 --w_div 0 (no frozen reference), or shard with torchrun --fsdp.")
