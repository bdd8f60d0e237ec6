"""The sizes tools.memory adds up: Llasa's model shapes, fixed per-GPU costs, parameter counts
(Llama, LoRA adapters, the XCodec2 decoder) and the bytes of one tensor kind each (a KV cache,
logits, one layer's activations, the codec's decode, a gradient bucket). Sizes are in bytes;
`config` is a transformers Llama config or LlamaConfig kwargs. Models are built on the meta
device: exact counts, no memory, no download.
"""

import functools
import math

import torch

from codec import XCodec2Config, XCodec2Decoder
from lora import TARGETS as LORA_TARGETS

# Llama-3 shapes (Llasa-1B = Llama-3.2-1B, 3B = Llama-3.2-3B, 8B = Llama-3.1-8B) with LLASA's
# vocabulary of 193,800 (128,256 text + 8 markers + 65,536 speech tokens). rope scaling and
# max_position_embeddings change no tensor size and are left at LlamaConfig's defaults.
_LLAMA3 = dict(vocab_size=193_800, num_key_value_heads=8, rope_theta=500_000.0, rms_norm_eps=1e-5)
LLASA_SHAPES = {
    "llasa-1b": dict(
        _LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llasa-3b": dict(
        _LLAMA3,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "llasa-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}
SPEECH_ROWS = 65_537  # rows of lm_head the policy uses: 65,536 speech tokens + the stop token
GB = 1e9
# Fixed per-GPU costs outside torch's tensors (estimates: no GPU measures them here).
# The CUDA context with torch's, cuBLAS' and cuDNN's kernels: typical of an H100 with CUDA 12 and
# lazy module loading (CUDA_MODULE_LOADING=LAZY, torch's default since CUDA 11.7).
CUDA_CONTEXT = 500_000_000
# One NCCL communicator's own buffers (world > 1; the trainer uses only the default group):
# NCCL_BUFFSIZE's 4 MiB per channel and peer for the Simple protocol plus the LL/LL128 ones, over
# the tens of channels NVLink gets: a few hundred MB; NVLS (NVLink SHARP) can add more.
NCCL_BUFFERS = 300_000_000
GRAD_BUCKET = 1 << 26  # parallel.sync_gradients' bucket_numel (replicated world > 1)
XCODEC2 = XCodec2Config()  # the published codec, on every training GPU (--codec xcodec2)
# The LlamaConfig fields that set a tensor's size.
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)


def llama_dims(config) -> dict:
    """The size-relevant fields of a Llama config (SHAPE_KEYS), head_dim filled in."""
    from transformers import LlamaConfig

    if isinstance(config, dict):
        cfg = LlamaConfig(**config)
    else:
        cfg = config
    out = {k: getattr(cfg, k, False) for k in SHAPE_KEYS}
    out["head_dim"] = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return out


def param_shapes(config) -> tuple:
    """((name, shape), ...) of LlamaForCausalLM(config)'s parameters, tied ones once."""
    c = llama_dims(config)
    return _param_shapes(tuple(c[k] for k in SHAPE_KEYS))


@functools.lru_cache(maxsize=32)
def _param_shapes(key: tuple) -> tuple:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**dict(zip(SHAPE_KEYS, key))))
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def param_count(config) -> int:
    """Parameters of LlamaForCausalLM(config), tied embeddings counted once."""
    return sum(math.prod(s) for _, s in param_shapes(config))


def lora_shapes(config, rank: int, targets=None) -> list[tuple[int, int]]:
    """Shapes of every adapter matrix (A [r, in], B [out, r]) lora.add_adapters puts on a Llama;
    none at rank 0."""
    targets = LORA_TARGETS if targets is None else targets
    out = []
    if not rank:
        return out
    for name, s in param_shapes(config):
        in_layers = name.startswith("model.layers.") and name.endswith(".weight")
        if in_layers and name.split(".")[-2] in targets:
            out += [(rank, s[1]), (s[0], rank)]
    return out


def lora_params(config, rank: int, targets=None) -> int:
    """Adapter parameters of lora.add_adapters(model, rank, targets=targets): r * (in + out) per
    map."""
    return sum(a * b for a, b in lora_shapes(config, rank, targets))


def layer_activation_bytes(config, lora_rank: int = 0, lora_maps: int = 7) -> int:
    """Bytes one decoder layer keeps for backward per token under bf16 autocast with fp32 weights
    (HF Llama, SDPA; the residual stream stays fp32 since the embedding output is fp32):
      16d + 8   both RMSNorms: fp32 input and fp32 normalized output, and the fp32 1/rms
      10d       bf16 casts of the normalized input for q, k, v, gate, up (autocast casts per op)
      2q + 4kv  SDPA's inputs: bf16 casts of the fp32 rotary q and k, and v
      2q        SDPA's output, the same storage as o_proj's input
      4 heads   SDPA's fp32 logsumexp (flash path; the math path would keep [heads, L, L])
      8i        MLP: gate out, silu(gate), up out, their product (bf16 each)
    with d hidden, q = heads * head_dim, kv = kv_heads * head_dim, i intermediate.
    With LoRA (lora_rank r on lora_maps maps, a bf16 base: the residual stream is bf16) the norms
    keep 14d less, and each adapted map 2r more (its bf16 A x, for B's gradient)."""
    c = llama_dims(config)
    d = c["hidden_size"]
    i = c["intermediate_size"]
    h = c["num_attention_heads"]
    q = h * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    if lora_rank:
        return 12 * d + 4 * q + 4 * kv + 8 * i + 4 * h + 8 + 2 * lora_rank * lora_maps
    return 26 * d + 4 * q + 4 * kv + 8 * i + 4 * h + 8


def logits_bytes(micro_batch: int, positions: int, rows: int) -> int:
    """fp32 logits [micro_batch, positions, rows] and their gradient: one chunk of the speech-only
    head (positions = chunk, rows = 65,537) or the old full-vocabulary head (positions = response
    length, rows = 193,800). Transients of the same size (bf16 matmul output, logits /
    temperature) come and go around them."""
    return 2 * 4 * micro_batch * positions * rows


def kv_cache_bytes(config, batch: int, max_len: int, dtype_bytes: int = 2) -> int:
    """llama.KVCache: k and v, one [batch, kv_heads, max_len, head_dim] tensor per layer each,
    bf16 by default."""
    c = llama_dims(config)
    per_layer = batch * c["num_key_value_heads"] * max_len * c["head_dim"] * dtype_bytes
    return 2 * c["num_hidden_layers"] * per_layer


def codec_param_count(config: XCodec2Config = XCODEC2) -> int:
    """Parameters of codec.XCodec2Decoder(config)."""
    return _codec_params(config)


@functools.lru_cache(maxsize=8)
def _codec_params(config: XCodec2Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in XCodec2Decoder(config).parameters())


def codec_decode_bytes(config: XCodec2Config, clips: int, frames: int) -> int:
    """Peak transient bytes of XCodec2Decoder.forward (no_grad, fp32) on `clips` code sequences
    right-padded to `frames` codes (frames / 50 seconds of audio each):
        clips * frames * max(44 * C, 100 * hop + 4 * C)
    with C = hidden_dim and hop = hop_length (output samples per code): a transformer block's MLP
    holds 11 fp32 values of width C per frame (the residual stream, the norm, fc1's 4C output and
    its silu, ...), the head and ISTFT 25 fp32 values per output sample (the head's 4 hop + 2
    outputs, the complex spectrum, the irfft frames windowed and masked, ...) beside the stream;
    linear in clips x frames, the same for any depth, no frames x frames attention (SDPA's fused
    kernels). Not counted: cuDNN/cuFFT workspaces (the table's 10% headroom)."""
    C = config.hidden_dim
    hop = config.hop_length
    return clips * frames * max(44 * C, 100 * hop + 4 * C)


def grad_bucket_bytes(config, bucket_numel: int = GRAD_BUCKET) -> int:
    """The largest flat fp32 buffer parallel.sync_gradients concatenates: parameters in order, a
    bucket closed by the parameter that brings it to `bucket_numel` elements (so it can hold more:
    at Llasa's vocabulary the [193800, d] embedding is a bucket of its own)."""
    largest = 0
    numel = 0  # of the bucket being filled
    for _, s in param_shapes(config):
        numel += math.prod(s)
        if numel >= bucket_numel:
            largest = max(largest, numel)
            numel = 0
    return 4 * max(largest, numel)
