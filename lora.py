"""LoRA, hand-written (--lora-rank): low-rank adapters on a frozen LLASA, as in Hu et al. 2021.

Each targeted linear map y = W x + b of the decoder layers becomes

    y = W x + b + (alpha / r) * B (A x),    A [r, in] ~ kaiming-uniform (as nn.Linear, PEFT),
                                            B [out, r] = 0

so the initial policy is the base model exactly. Only A and B train (fp32); W and everything else
is frozen (bf16 on CUDA: half the memory, no gradients, no AdamW state). What the trainer needs:
  - `disabled(model)`: adapters off, the base model itself: the KL reference without a second copy;
  - `merged(model)`: rollouts on merged weights W + (alpha / r) B A (one matmul per map, as in a
    plain model; decode.Decoder's compiled step copies `weight_of` each call);
  - `merged_state(state)`: a plain LLASA state dict (fp32) for the checkpoint's Hugging Face
    directory, which AutoModelForCausalLM and LLASA's own code load;
  - `save_adapter` / `load_adapter`: the adapter alone in PEFT's layout (adapter_config.json +
    adapter_model.safetensors: `peft.PeftModel.from_pretrained(base, dir)` loads it), which
    --resume reads.
Merging in bf16 rounds W + delta to bf16: a rollout's log-probs then differ from the update's
(unmerged) pass a little more than a full fine-tune's do; `logp_mismatch` reports it, --tis-cap
corrects it.
"""

import contextlib
import json
import math
import os

import torch
import torch.nn.functional as F

# The linear maps of attention (q, k, v, o) and of the MLP (gate, up, down)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DIR = "adapter"  # in a checkpoint: the adapter in PEFT's layout


class LoRALinear(torch.nn.Module):
    """A frozen nn.Linear `base` plus a trainable low-rank update scale * B @ A (fp32)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        device = base.weight.device
        A = torch.empty(rank, base.in_features)  # [r, in]
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # as nn.Linear, PEFT
        B = torch.zeros(base.out_features, rank, device=device)  # [out, r]
        self.lora_A = torch.nn.Parameter(A.to(device))
        self.lora_B = torch.nn.Parameter(B)
        self.scale = alpha / rank
        self.enabled = True  # False: the base map (`disabled`)
        self.merged = None  # a merged weight [out, in] while `merged` holds it

    # What code written for nn.Linear reads (KVCache.for_model: out_features), as PEFT's layers do.
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)
    weight = property(lambda self: self.base.weight)  # the frozen base weight, not the adapted map
    bias = property(lambda self: self.base.bias)

    def forward(self, x):
        if self.merged is not None:
            return F.linear(x, self.merged, self.base.bias)
        y = self.base(x)
        if not self.enabled:
            return y
        # In x's dtype (bf16 on a bf16 base: no fp32 copy of x; autocast would cast to it anyway).
        delta = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return y + (delta * self.scale).to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scale * B @ A in the base weight's dtype (computed in fp32)."""
        w = self.base.weight
        delta = self.lora_B.float() @ self.lora_A.float()  # [out, in]
        return (w.float() + self.scale * delta).to(w.dtype)


def add_adapters(model, rank: int, alpha: float, targets=TARGETS, seed: int = 0) -> list[str]:
    """Freeze `model` (a Hugging Face Llama) and put a LoRALinear on each `targets` projection of
    every decoder layer, A drawn from `seed` (the same on every rank). Returns the wrapped modules'
    names. A target that names no linear map of a layer is an error naming what there is."""
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    names = []
    for i, layer in enumerate(model.model.layers):
        found = _linear_children(layer)  # "self_attn.q_proj" -> (the attention module, "q_proj")
        for target in targets:
            hits = [k for k in found if k.split(".")[-1] == target]
            if not hits:
                there = ", ".join(k.split(".")[-1] for k in found)
                raise ValueError(
                    f"--lora-targets {target!r} names no linear map of decoder layer {i} "
                    f"(it has {there})"
                )
            for key in hits:
                parent, child = found[key]
                setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, gen))
                names.append(f"model.layers.{i}.{key}")
    return names


def _linear_children(layer) -> dict:
    """A decoder layer's nn.Linear maps: "part.name" -> (the part's module, name), part being
    self_attn or mlp."""
    found = {}
    for part in ("self_attn", "mlp"):
        module = getattr(layer, part)
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear):
                found[f"{part}.{name}"] = (module, name)
    return found


def adapters(model) -> list:
    """(name, LoRALinear) of every adapted map of `model`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def disabled(model):
    """The base model: every adapter of `model` off for the duration."""
    layers = [m for _, m in adapters(model)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


@contextlib.contextmanager
def merged(model):
    """Every adapted map of `model` runs as one matmul with its merged weight (in the base dtype:
    one extra copy of the targeted weights while this holds). A no-op without adapters."""
    layers = [m for _, m in adapters(model)]
    for m in layers:
        m.merged = m.merged_weight()
    try:
        yield
    finally:
        for m in layers:
            m.merged = None


def weight_of(linear) -> torch.Tensor:
    """The weight a linear map applies: an nn.Linear's own, a LoRALinear's merged one."""
    if not isinstance(linear, LoRALinear):
        return linear.weight
    if linear.merged is not None:
        return linear.merged
    return linear.merged_weight()


class AdaptersOff:
    """The KL reference of a LoRA policy: the same module (llama.LogProbs, sharded or not) called
    with its adapters off, so no second copy of the weights exists."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, *args, **kw):
        with disabled(self.policy):
            return self.policy(*args, **kw)


# ----------------------------------------------------------------------------- checkpoints


def merged_state(state: dict, scale: float) -> dict:
    """A LoRA model's state dict (keys `...q_proj.base.weight`, `.lora_A`, `.lora_B`) as a plain
    model's, fp32: W + scale * B @ A under `...q_proj.weight` (computed in fp32: bf16 would round
    small updates away), every other tensor as it is, in fp32; on the CPU, one tensor at a time."""

    def cpu(t):
        return t.detach().cpu().float()

    out = {}
    for key, value in state.items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        stem = key.removesuffix("base.weight")  # "...q_proj." for an adapted map's base weight
        if key.endswith(".base.weight") and stem + "lora_A" in state:
            delta = cpu(state[stem + "lora_B"]) @ cpu(state[stem + "lora_A"])  # [out, in]
            out[stem + "weight"] = cpu(value) + scale * delta
        elif key.endswith(".base.bias"):
            out[key.removesuffix(".base.bias") + ".bias"] = cpu(value)
        else:
            out[key] = cpu(value)
    return out


def save_adapter(folder: str, state: dict, rank: int, alpha: float, targets, base_model: str):
    """The adapter tensors of `state` (a LoRA model's state dict) in PEFT's layout:
    folder/adapter_config.json and folder/adapter_model.safetensors, with keys
    base_model.model.<module>.lora_A.weight (and lora_B)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {
        f"base_model.model.{k}.weight": v.detach().cpu().float().contiguous()
        for k, v in state.items()
        if k.endswith((".lora_A", ".lora_B"))
    }
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def load_adapter(model, folder: str, rank: int, alpha: float, targets):
    """Copy a `save_adapter` folder's tensors into `model`'s adapters (made by add_adapters with the
    same rank, alpha and targets; a mismatch is an error naming the folder)."""
    from safetensors.torch import load_file

    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder}: no adapter_config.json (a LoRA checkpoint holds its adapter there)"
        )
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    saved = (config["r"], float(config["lora_alpha"]), sorted(config["target_modules"]))
    if saved != (rank, float(alpha), sorted(targets)):
        raise ValueError(
            f"{folder}: adapter of rank {config['r']}, alpha {config['lora_alpha']}, targets "
            f"{config['target_modules']}; this run has {rank}, {alpha}, {sorted(targets)}"
        )
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    with torch.no_grad():
        for name, m in adapters(model):
            for part in ("lora_A", "lora_B"):
                key = f"base_model.model.{name}.{part}.weight"
                if key not in tensors:
                    raise ValueError(f"{folder}: adapter_model.safetensors has no {key}")
                getattr(m, part).copy_(tensors[key])


def parse_targets(text: str) -> tuple:
    """--lora-targets: comma-separated projection names -> a tuple, each name once (unknown names
    are caught by add_adapters, which knows the model)."""
    stripped = [t.strip() for t in text.split(",")]
    names = tuple(dict.fromkeys(t for t in stripped if t))  # each once, in order
    if not names:
        examples = ",".join(TARGETS)
        raise ValueError(
            f"--lora-targets {text!r}: expected comma-separated names such as {examples}"
        )
    return names
