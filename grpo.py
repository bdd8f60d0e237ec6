"""GRPO for LLASA text-to-speech, rewarded by Whisper. Run with

    torchrun --nproc_per_node=2 grpo.py --preset llasa-1b --whisper-device cuda:2
    python grpo.py --preset tiny                    # offline smoke run on a CPU, about a minute

One training step (`train_step`): prompts -> G rollouts each (sample.generate) -> audio (codec)
-> rewards (Whisper worker process) -> group-normalized advantages -> clipped policy loss with KL to
a frozen reference -> gradients summed over ranks -> AdamW step. Each rank owns whole prompt groups;
the gradient is that of the global token-mean loss, so 2 ranks step exactly like 1.
"""
import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from codec import SAMPLE_RATE, load_codec
from sample import generate, load_model, tiny_llama


# ----------------------------------------------------------------------------------------------
# The math: advantages and the clipped policy loss (pure functions; tests call them directly)

def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-6):
    """rewards [N] laid out group by group (N = groups * group_size) -> advantages [N].

    (r - group mean) / (group std + eps), std unbiased as in verl and TRL; scale=False keeps only the
    centering (Dr. GRPO). A group whose rewards are all equal gets advantage 0, never NaN."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the {rewards.numel()} rewards, got {group_size}")
    r = rewards.float().view(-1, group_size)  # [groups, G]
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps=0.2, kl_coef=0.04,
                agg="token-mean", denom=None, norm_len=None):
    """Clipped GRPO objective with a k3 KL penalty, as a loss to minimize.

    logp, old_logp, ref_logp (None when kl_coef == 0): [B, T] log-probs (nats) of the sampled
    tokens; advantages [B]; mask [B, T] float, 1 on response tokens. Aggregation over `mask`:
      token-mean               sum over all tokens / number of tokens
      seq-mean-token-mean      mean over sequences of each sequence's token mean
      seq-mean-token-sum-norm  mean over sequences of token sums / norm_len (Dr. GRPO; default T)
    `denom` overrides the divisor (tokens, or sequences for the seq-* modes): the trainer passes the
    global count over all ranks and micro-batches so that summed gradients are the global mean's.
    Returns (loss, stats) with stats kl and clip_frac as token means over `mask` (floats)."""
    if agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {LOSS_AGGS}")
    mask = mask.float()
    adv = advantages.float()[:, None]  # [B, 1]
    ratio = torch.exp(logp - old_logp)  # [B, T]
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # [B, T]
    kl = torch.zeros_like(logp)
    if kl_coef and ref_logp is not None:
        log_r = (ref_logp - logp).clamp(-20.0, 20.0)  # exp() stays finite where policy and ref disagree wildly
        kl = torch.exp(log_r) - log_r - 1  # k3 estimator of KL(policy || ref), >= 0
        per_token = per_token + kl_coef * kl
    if agg == "token-mean":
        loss = (per_token * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)
    else:
        seq_sum = (per_token * mask).sum(dim=1)  # [B]
        if agg == "seq-mean-token-mean":
            seq_val = seq_sum / mask.sum(dim=1).clamp(min=1)
        else:
            seq_val = seq_sum / (mask.shape[1] if norm_len is None else norm_len)
        loss = seq_val.sum() / (mask.shape[0] if denom is None else denom)
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        is_clipped = ((ratio * adv) > (clipped * adv)).float()  # the clipped branch was taken
        stats = {"kl": ((kl * mask).sum() / n).item(), "clip_frac": ((is_clipped * mask).sum() / n).item()}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# Configuration: one dataclass; argparse is generated from it; presets are named overrides.

def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    preset: str = opt("", "named defaults: 'tiny' (offline CPU smoke run) or 'llasa-1b' (the seed's recipe)")
    # models
    model: str = opt("HKUSTAudio/Llasa-1B", "policy: Hugging Face id or directory; 'tiny' = tiny random Llama")
    codec: str = opt("xcodec2", "speech codec: 'xcodec2[:PATH]', 'xcodec2-package[:PATH]' or 'tone' (test codec)")
    whisper: str = opt("large-v3", "Whisper model name, checkpoint path, or 'random-tiny'")
    whisper_device: str = opt("cuda:2", "device of the Whisper worker process (one per node)")
    whisper_batch: int = opt(16, "clips per Whisper batch")
    whisper_max_tokens: int = opt(128, "longest transcript Whisper may decode, tokens")
    whisper_threads: int = opt(0, "CPU threads of the Whisper worker process (0 = torch's default)")
    language: str = opt("", "Whisper language for rows without a 'language' field ('' = detect)")
    reward: str = opt("whisper", "'whisper' or 'module:function' scoring (audio, text) -> float in [0, 1]")
    device: str = opt("auto", "training device: 'auto' (cuda:LOCAL_RANK if available, else cpu) or 'cpu'")
    # data
    data: str = opt(data.SAMPLE_DATA, "training texts: JSONL with a 'text' field, or .txt one per line")
    val_data: str = opt("", "validation texts (same formats); '' = no validation")
    out: str = opt("runs/grpo", "output directory: metrics.jsonl, samples/, checkpoints/")
    resume: str = opt("", "checkpoint directory (OUT/checkpoints/step_N) to continue from exactly")
    # GRPO
    steps: int = opt(200, "optimizer steps (rollout batches) to run in total")
    prompts_per_step: int = opt(8, "prompts per step over all ranks; must divide by the world size")
    group_size: int = opt(16, "samples per prompt (G)")
    max_new_tokens: int = opt(2048, "longest response in speech tokens (50 tokens = 1 s)")
    temperature: float = opt(0.8, "sampling temperature; training log-probs use the same")
    top_p: float = opt(0.9, "nucleus sampling threshold (1 = off)")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    repetition_penalty: float = opt(1.0, "HF repetition penalty (1 = off)")
    clip_eps: float = opt(0.2, "PPO clip range epsilon")
    kl_coef: float = opt(0.0, "k3 KL penalty to the frozen initial model; 0 drops the reference model")
    loss_agg: str = opt("token-mean", f"loss aggregation: {', '.join(LOSS_AGGS)}")
    scale_rewards: bool = opt(True, "divide advantages by the group std (off = Dr. GRPO)")
    updates_per_rollout: int = opt(1, "optimizer steps per rollout batch (>1 needs old log-probs)")
    micro_batch: int = opt(4, "sequences per forward/backward in the update")
    # reward shape (reward.tts_reward)
    beta_c: float = opt(3.0, "CER utility sharpness: U_cer = 1 - tanh(beta_c * cer)")
    tau_n: float = opt(3.0, "NLL utility temperature: U_nll = exp(-nll / tau_n), nats")
    lambda_c: float = opt(0.6, "weight of the CER utility in the harmonic mean")
    lambda_n: float = opt(0.4, "weight of the NLL utility in the harmonic mean")
    # optimizer
    lr: float = opt(1e-6, "AdamW learning rate")
    warmup_steps: int = opt(0, "linear learning-rate warmup, steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "max global gradient norm (0 = off)")
    grad_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    seed: int = opt(0, "seed for data order, sampling and the tiny models")
    # outputs
    sample_every: int = opt(50, "steps between saved audio samples")
    n_samples: int = opt(4, "audio samples saved each time")
    save_every: int = opt(100, "steps between checkpoints (the last step always saves)")
    val_every: int = opt(50, "steps between validations (needs --val-data)")
    worker_timeout: float = opt(600.0, "seconds a reward request may take before the run stops")


PRESETS = {
    "tiny": dict(model="tiny", codec="tone", whisper="random-tiny", whisper_device="cpu", device="cpu",
                 val_data=os.path.join(os.path.dirname(data.SAMPLE_DATA), "val.jsonl"), out="runs/tiny",
                 steps=6, prompts_per_step=4, group_size=4, max_new_tokens=64, top_p=1.0, lr=1e-3,
                 kl_coef=0.04, micro_batch=8, sample_every=3, save_every=3, val_every=3, n_samples=2,
                 whisper_max_tokens=16, whisper_threads=1),
    "llasa-1b": dict(model="HKUSTAudio/Llasa-1B", codec="xcodec2", whisper="large-v3", whisper_device="cuda:2",
                     steps=200, prompts_per_step=8, group_size=16, max_new_tokens=2048, temperature=0.8,
                     top_p=0.9, lr=1e-6, kl_coef=0.0, updates_per_rollout=1, micro_batch=2),
}


def parse_config(argv=None) -> Config:
    """Flags from the dataclass; a preset sets the defaults, any flag overrides them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="")
    preset = pre.parse_known_args(argv)[0].preset
    if preset and preset not in PRESETS:
        raise SystemExit(f"unknown --preset {preset!r}; choose from {sorted(PRESETS)}")
    defaults = {**{f.name: f.default for f in dataclasses.fields(Config)}, **PRESETS.get(preset, {})}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, d = "--" + f.name.replace("_", "-"), defaults[f.name]
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=d,
                           help=f"{f.metadata['help']} (default: {d})")
        else:
            p.add_argument(flag, type=type(f.default), default=d, help=f"{f.metadata['help']} (default: {d!r})")
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.loss_agg not in LOSS_AGGS:
        raise SystemExit(f"--loss-agg {cfg.loss_agg!r}: expected one of {LOSS_AGGS}")
    if cfg.temperature <= 0:  # training log-probs are taken at logits / temperature
        raise SystemExit(f"--temperature must be > 0 for training, got {cfg.temperature}")
    for name in ("steps", "prompts_per_step", "micro_batch", "updates_per_rollout", "sample_every",
                 "save_every", "val_every", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    return cfg


# ----------------------------------------------------------------------------------------------
# Distributed set-up: torchrun's environment, or one plain process.

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    node_start: int = 0  # global rank of this node's local rank 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (small Python objects: metrics, infos)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def setup_distributed(cfg: Config) -> tuple[Dist, torch.device]:
    if "RANK" not in os.environ:
        d = Dist()
    else:
        d = Dist(rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]),
                 local_rank=int(os.environ["LOCAL_RANK"]))
        d.node_start = d.rank - d.local_rank
    if d.world > 1 and cfg.device not in ("auto", "cpu"):
        raise SystemExit(f"--device {cfg.device!r} would put every rank on one device; under torchrun use "
                         "'auto' (rank r on cuda:LOCAL_RANK) or 'cpu'")
    use_cuda = cfg.device == "auto" and torch.cuda.is_available()
    device = torch.device(f"cuda:{d.local_rank}" if use_cuda else ("cpu" if cfg.device == "auto" else cfg.device))
    if d.world > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=max(1800, 2 * cfg.worker_timeout)))
    return d, device


# ----------------------------------------------------------------------------------------------
# Log-probs of responses under a model, and the policy update

def response_logprobs(model, prompts: list[list[int]], tokens: torch.Tensor, temperature: float,
                      with_entropy: bool = False):
    """Teacher-forced log-probs (nats) of `tokens` [B, T] after each prompt, at logits / temperature.

    Rows are [prompt | response] right-padded, so positions match generation (0 at the first prompt
    token) and no attention mask is needed: the pads come after every position that is read.
    Logits are computed only at response positions. Returns logp [B, T] (and entropy [B, T] of
    the tempered distribution when asked, without grad, computed in chunks to bound memory)."""
    device = tokens.device
    B, T = tokens.shape
    P = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    ids = torch.zeros(B, int(P.max()) + T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, device=device)
        ids[i, len(p):len(p) + T] = tokens[i]
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # [B, L, H]
    pos = (P[:, None] - 1 + torch.arange(T, device=device)[None, :])  # [B, T]: position predicting token t
    h = hidden.gather(1, pos[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [B, T, H]
    logits = model.lm_head(h).float() / max(temperature, 1e-6)  # [B, T, V]
    logp = logits.gather(-1, tokens[:, :, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [B, T]
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = torch.cat([torch.special.entr(F.softmax(c, dim=-1)).sum(-1)  # nats
                             for c in logits.detach().split(256, dim=1)], dim=1)  # [B, T]
    return logp, entropy


@dataclass
class Rollouts:
    """One rank's rollout batch, the input of the update. B = groups on this rank * G."""
    prompts: list  # B token-id lists
    tokens: torch.Tensor  # [B, T] response ids, right-padded
    lengths: torch.Tensor  # [B] response lengths, stop token included
    advantages: torch.Tensor  # [B]


def update_policy(policy, ref, optimizer, scheduler, ro: Rollouts, cfg: Config, d: Dist, autocast) -> dict:
    """`cfg.updates_per_rollout` AdamW steps on the clipped GRPO loss over this rank's rollouts.

    Every micro-batch's loss is divided by the global token (or sequence) count, and gradients are
    summed over ranks: the step is exactly that of the global mean loss, whatever the world size."""
    B, T = ro.tokens.shape
    mask = (torch.arange(T, device=ro.tokens.device)[None, :] < ro.lengths[:, None]).float()  # [B, T]
    count = mask.sum() if cfg.loss_agg == "token-mean" else torch.tensor(float(B), device=mask.device)
    denom = d.all_reduce(count.clone()).item()
    # Micro-batches of similar lengths, each cut to its longest response: one long sample must not
    # pad every micro-batch to --max-new-tokens (the logits are [micro_batch, T, vocab] floats).
    order = torch.argsort(ro.lengths.cpu(), descending=True).tolist()
    mbs = [order[i:i + cfg.micro_batch] for i in range(0, B, cfg.micro_batch)]
    cut = [int(ro.lengths[mb].max()) for mb in mbs]

    def forward(model, j, **kw):
        mb = mbs[j]
        with autocast():
            return response_logprobs(model, [ro.prompts[i] for i in mb], ro.tokens[mb, :cut[j]], cfg.temperature, **kw)

    with torch.no_grad():  # fixed targets for all updates of this rollout
        ref_logp = [forward(ref, j) for j in range(len(mbs))] if ref is not None and cfg.kl_coef else [None] * len(mbs)
        old_logp = [forward(policy, j) for j in range(len(mbs))] if cfg.updates_per_rollout > 1 else None
    sums = torch.zeros(5, device=mask.device)  # loss, kl*n, clip*n, entropy sum, tokens
    params = [p for p in policy.parameters() if p.requires_grad]
    for update in range(cfg.updates_per_rollout):
        for j, mb in enumerate(mbs):
            out = forward(policy, j, with_entropy=update == 0)
            logp, entropy = out if update == 0 else (out, None)
            old = logp.detach() if old_logp is None else old_logp[j]  # one update: ratio = 1, on-policy
            m = mask[mb, :cut[j]]
            loss, st = policy_loss(logp, old, ref_logp[j], ro.advantages[mb], m, clip_eps=cfg.clip_eps,
                                   kl_coef=cfg.kl_coef, agg=cfg.loss_agg, denom=denom, norm_len=cfg.max_new_tokens)
            loss.backward()
            if update == 0:
                n = m.sum()
                sums += torch.stack([loss.detach(), st["kl"] * n, st["clip_frac"] * n, (entropy * m).sum(), n])
        if d.world > 1:  # sum the ranks' shares of the global mean loss
            all_reduce_grads(params, d)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if not torch.isfinite(gnorm):  # identical on every rank (same summed gradients): all stop together
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite gradient norm ({gnorm.item()}) in update {update}; "
                                     "the optimizer step was skipped and no checkpoint was written")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # free the gradients before the next rollout
    scheduler.step()  # the schedule counts rollout steps, whatever --updates-per-rollout
    sums = d.all_reduce(sums)
    n = sums[4].clamp(min=1)
    return {"loss": sums[0].item(), "kl": (sums[1] / n).item(), "clip_frac": (sums[2] / n).item(),
            "entropy": (sums[3] / n).item(), "grad_norm": gnorm.item()}


def all_reduce_grads(params, d: Dist, bucket_numel: int = 1 << 26):
    """Sum gradients over ranks in flat buckets of at most `bucket_numel` elements: few collectives,
    and no full-model copy of the gradients (a 1B model would need 4 GB more)."""
    for p in params:
        if p.grad is None:  # every rank must send the same layout
            p.grad = torch.zeros_like(p)
    bucket, numel = [], 0
    for i, p in enumerate(params):
        bucket.append(p.grad)
        numel += p.grad.numel()
        if numel >= bucket_numel or i == len(params) - 1:
            flat = d.all_reduce(torch.cat([g.reshape(-1) for g in bucket]))
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
            bucket, numel = [], 0


# ----------------------------------------------------------------------------------------------
# Data order, checkpoints, samples

def step_examples(examples: list, step: int, cfg: Config, d: Dist) -> list:
    """This rank's prompts for `step`, from an endless run of seeded epoch permutations.

    The data position is a function of the step alone, which is what makes --resume exact."""
    per_rank = cfg.prompts_per_step // d.world
    start = step * cfg.prompts_per_step + d.rank * per_rank
    out = []
    for k in range(start, start + per_rank):
        epoch, i = divmod(k, len(examples))
        out.append(examples[np.random.default_rng([cfg.seed, epoch]).permutation(len(examples))[i]])
    return out


def save_checkpoint(path: str, policy, tokenizer, trainer_state: dict):
    """A Hugging Face directory (model + tokenizer) plus trainer_state.pt, written atomically:
    everything goes to PATH.tmp first and is renamed into place only when complete."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    portable_tokenizer_config(os.path.join(tmp, "tokenizer_config.json"))
    torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def portable_tokenizer_config(path: str):
    """transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x (and LLASA's usual
    inference code on it) cannot load; "PreTrainedTokenizerFast" loads on both."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


def save_samples(folder: str, audios, texts, results, finished):
    import soundfile as sf
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "samples.jsonl"), "w", encoding="utf-8") as f:
        for i, (audio, text, r, fin) in enumerate(zip(audios, texts, results, finished)):
            sf.write(os.path.join(folder, f"{i}.wav"), audio, SAMPLE_RATE)
            f.write(json.dumps({"wav": f"{i}.wav", "text": text, "transcript": r.get("transcript"),
                                "reward": r["reward"], "cer": r.get("cer"), "nll": r.get("nll"),
                                "finished": bool(fin), "seconds": len(audio) / SAMPLE_RATE,
                                "error": r.get("error")}, ensure_ascii=False) + "\n")


def energy_std_db(audio: np.ndarray) -> float:
    """Std of 20 ms frame energies in dB over voiced frames: a cheap prosody-flatness signal
    (GRPO on CER/NLL alone tends to flatten prosody, arXiv 2509.18531)."""
    n = len(audio) // 320
    if n < 2:
        return 0.0
    db = 10 * np.log10(np.mean(audio[:n * 320].reshape(n, 320) ** 2, axis=1) + 1e-10)
    voiced = db[db > db.max() - 40]
    return float(voiced.std()) if len(voiced) > 1 else 0.0


def _step_of(line: str) -> float:
    """Step of a metrics.jsonl line; a line torn by a crash counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


# ----------------------------------------------------------------------------------------------
# The trainer

class Trainer:
    """Holds what a step needs: models, optimizer, codec, reward scorer, RNG, distributed info."""

    def __init__(self, cfg: Config, d: Dist, device: torch.device, scorer=None):
        self.cfg, self.d, self.device, self.scorer = cfg, d, device, scorer  # scorer: .score(audios, texts, langs)
        if cfg.prompts_per_step % d.world:
            raise ValueError(f"--prompts-per-step {cfg.prompts_per_step} must divide by the {d.world} ranks")
        self.examples = data.load_dataset(cfg.data)
        self.val_examples = data.load_dataset(cfg.val_data) if cfg.val_data else []
        self.policy, self.tokenizer = self.load_model(cfg.resume or cfg.model)
        # The reference is the initial model, also on resume; none at all without a KL term.
        self.ref = None
        if cfg.kl_coef:
            self.ref = (copy.deepcopy(self.policy) if not cfg.resume else self.load_model(cfg.model)[0]).eval()
            self.ref.requires_grad_(False)
        if cfg.grad_checkpointing:  # transformers 5 renamed it; 4.46 has only the old name
            getattr(self.policy, "activation_checkpointing_enable", self.policy.gradient_checkpointing_enable)()
        self.speech = data.speech_vocab(self.tokenizer)
        self.allowed_ids = self.speech.allowed_ids()
        self._prompts = {}
        self.codec = load_codec(cfg.codec, device)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = max(cfg.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + d.rank)  # sampling RNG
        self.start_step = 0
        if cfg.resume:
            self.load_trainer_state(os.path.join(cfg.resume, "trainer_state.pt"))

    def load_model(self, name: str):
        if name == "tiny":
            # 64 speech tokens: a random policy then emits the stop token within 64 steps most of the time.
            tok = data.tiny_tokenizer(n_speech=64)
            return tiny_llama(len(tok), seed=self.cfg.seed).to(self.device), tok
        return load_model(name, self.device, torch.float32)  # fp32 master weights; bf16 autocast on CUDA

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def prompt(self, text: str) -> list[int]:
        if text not in self._prompts:
            self._prompts[text] = data.prompt_ids(self.tokenizer, text)
        return self._prompts[text]

    # -- one GRPO step ------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[dict, dict]:
        cfg, d, G = self.cfg, self.d, self.cfg.group_size
        examples = step_examples(self.examples, step, cfg, d)
        texts = [ex.text for ex in examples for _ in range(G)]  # [B*G], group by group
        langs = [ex.language or cfg.language or None for ex in examples for _ in range(G)]
        t0 = time.time()

        # 1. Rollouts: G samples per prompt from the current policy.
        roll = self.rollout(texts, self.gen)
        t1 = time.time()

        # 2. Audio: the speech tokens before the stop token -> 16 kHz clips.
        audios = self.decode_audio(roll)
        t2 = time.time()

        # 3. Rewards from the Whisper worker. A truncated sample (no stop token) earns 0.
        results = self.scorer.score(audios, texts, langs)
        rewards = torch.tensor([r["reward"] for r in results], dtype=torch.float32)  # [B*G]
        if not torch.isfinite(rewards).all():  # a broken scorer: stop before it steers the policy
            bad = [(texts[i], results[i]) for i in torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()]
            raise FloatingPointError(f"step {step}: non-finite reward for {bad[:3]}")
        rewards[~roll.finished.cpu()] = 0.0
        t3 = time.time()

        # 4. Advantages within each group (whole groups live on one rank).
        advantages = group_advantages(rewards, G, scale=cfg.scale_rewards).to(self.device)  # [B*G]

        # 5. Clipped policy-gradient update with KL to the reference, gradients summed over ranks.
        self.policy.train()
        ro = Rollouts([self.prompt(t) for t in texts], roll.tokens, roll.lengths, advantages)
        stats = update_policy(self.policy, self.ref, self.optimizer, self.scheduler, ro, cfg, d, self.autocast)
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"step {step}: non-finite loss {stats['loss']}")
        t4 = time.time()

        local = {"reward": rewards.tolist(), "cer": [r.get("cer") for r in results],
                 "nll": [r.get("nll") for r in results], "length": roll.lengths.tolist(),
                 "finished": roll.finished.tolist(), "energy_std_db": [energy_std_db(a) for a in audios],
                 "times": [t1 - t0, t2 - t1, t3 - t2, t4 - t3]}
        parts = d.gather(local)
        allv = {k: sum((p[k] for p in parts), []) for k in local if k != "times"}
        times = np.max([p["times"] for p in parts], axis=0)  # the slowest rank sets the pace
        metrics = {"step": step + 1, "reward_mean": mean(allv["reward"]), "reward_std": float(np.std(allv["reward"])),
                   "cer": mean(allv["cer"]), "nll": mean(allv["nll"]), **stats,
                   "response_len": mean(allv["length"]), "truncated_frac": 1 - mean(allv["finished"]),
                   "energy_std_db": mean(allv["energy_std_db"]),
                   "time_rollout": times[0], "time_codec": times[1], "time_reward": times[2], "time_train": times[3],
                   "tokens_per_s": sum(allv["length"]) / max(times[0], 1e-9),
                   "lr": self.scheduler.get_last_lr()[0]}
        shown = {"audios": audios[:cfg.n_samples], "texts": texts[:cfg.n_samples],
                 "results": results[:cfg.n_samples], "finished": roll.finished[:cfg.n_samples].tolist()}
        return metrics, shown

    def rollout(self, texts: list[str], generator):
        """One sample per text from the current policy (speech tokens + stop only)."""
        self.policy.eval()
        cuda = self.device.type == "cuda"
        with torch.no_grad(), self.autocast():
            return generate(self.policy, [self.prompt(t) for t in texts], max_new_tokens=self.cfg.max_new_tokens,
                            temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k,
                            repetition_penalty=self.cfg.repetition_penalty, stop_ids=(self.speech.end_id,),
                            allowed_ids=self.allowed_ids, generator=generator,
                            cache_dtype=torch.bfloat16 if cuda else None)  # bf16 cache under bf16 autocast

    def decode_audio(self, roll) -> list[np.ndarray]:
        codes = [self.speech.to_codes(roll.tokens[i, :n - int(fin)].tolist())
                 for i, (n, fin) in enumerate(zip(roll.lengths.tolist(), roll.finished.tolist()))]
        return self.codec.decode(codes)

    @torch.no_grad()
    def validate(self) -> dict:
        """One sample per validation text with a fixed seed, so steps compare like for like."""
        cfg, d = self.cfg, self.d
        mine = self.val_examples[d.rank::d.world]
        local = {"reward": [], "cer": [], "nll": [], "finished": []}
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 12345 + d.rank)
        chunk = max(1, cfg.prompts_per_step * cfg.group_size // d.world)  # no larger than a training batch
        for i in range(0, len(mine), chunk):
            part = mine[i:i + chunk]
            roll = self.rollout([ex.text for ex in part], gen)
            results = self.scorer.score(self.decode_audio(roll), [ex.text for ex in part],
                                        [ex.language or cfg.language or None for ex in part])
            finished = roll.finished.tolist()
            local["reward"] += [r["reward"] if f else 0.0 for r, f in zip(results, finished)]
            local["cer"] += [r.get("cer") for r in results]
            local["nll"] += [r.get("nll") for r in results]
            local["finished"] += finished
        parts = d.gather(local)
        return {f"val_{k}": mean(sum((p[k] for p in parts), [])) for k in local}

    # -- state ----------------------------------------------------------------------------------
    def trainer_state(self, step: int) -> dict:
        return {"step": step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "generators": self.d.gather(self.gen.get_state()), "data_position": step * self.cfg.prompts_per_step,
                "world_size": self.d.world, "config": dataclasses.asdict(self.cfg)}

    def load_trainer_state(self, path: str):
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: {path} not found (expected OUT/checkpoints/step_N/trainer_state.pt)")
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["world_size"] != self.d.world:
            raise ValueError(f"--resume: checkpoint was written by {state['world_size']} ranks, this run has "
                             f"{self.d.world}; the sampling streams cannot continue exactly")
        for key in ("prompts_per_step", "group_size", "seed"):
            if state["config"][key] != getattr(self.cfg, key):
                raise ValueError(f"--resume: --{key.replace('_', '-')} was {state['config'][key]} in the "
                                 f"checkpoint, {getattr(self.cfg, key)} now")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generators"][self.d.rank].cpu())
        self.start_step = state["step"]


def start_scorer(cfg: Config, d: Dist):
    """Local rank 0 starts this node's Whisper worker; every rank of the node connects to it."""
    from whisper_worker import WhisperWorker, WorkerClient
    worker = None
    if d.local_rank == 0:
        worker = WhisperWorker(dict(model=cfg.whisper, device=cfg.whisper_device, language=cfg.language or None,
                                    batch_size=cfg.whisper_batch, max_transcript_tokens=cfg.whisper_max_tokens,
                                    reward_config=dict(beta_c=cfg.beta_c, tau_n=cfg.tau_n,
                                                       lambda_c=cfg.lambda_c, lambda_n=cfg.lambda_n)),
                               reward=cfg.reward, request_timeout=cfg.worker_timeout,
                               threads=cfg.whisper_threads or None)
        worker.start()
    infos = d.gather(worker.connect_info() if worker else None)
    return worker, (worker or WorkerClient(infos[d.node_start], request_timeout=cfg.worker_timeout))


def train(cfg: Config) -> list[dict]:
    """Run (or continue) training; returns the metrics of the steps run (every rank)."""
    from tqdm import tqdm
    d, device = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)
    worker = scorer = None
    history = []
    try:
        tr = Trainer(cfg, d, device)  # data and models first: a bad file fails before the worker starts
        worker, scorer = start_scorer(cfg, d)
        tr.scorer = scorer
        metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        if d.rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            keep = []
            if cfg.resume and os.path.exists(metrics_path):  # drop lines past the checkpoint we continue from
                keep = [ln for ln in open(metrics_path) if _step_of(ln) <= tr.start_step]
            with open(metrics_path, "w") as f:
                f.writelines(keep)
        bar = tqdm(range(tr.start_step, cfg.steps), initial=tr.start_step, total=cfg.steps,
                   disable=d.rank != 0, desc="grpo", dynamic_ncols=True)
        for step in bar:
            t0 = time.time()
            metrics, shown = tr.train_step(step)
            done, last = step + 1, step + 1 == cfg.steps
            if tr.val_examples and (done % cfg.val_every == 0 or last):
                metrics.update(tr.validate())
            metrics["time_step"] = time.time() - t0
            history.append(metrics)
            if d.rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if done % cfg.sample_every == 0 or last:
                    save_samples(os.path.join(cfg.out, "samples", f"step_{done}"), **shown)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", s_per_step=f"{metrics['time_step']:.1f}")
            if done % cfg.save_every == 0 or last:
                state = tr.trainer_state(done)  # a collective: every rank takes part
                if d.rank == 0:
                    save_checkpoint(os.path.join(cfg.out, "checkpoints", f"step_{done}"), tr.policy, tr.tokenizer, state)
        if d.world > 1:
            dist.barrier()  # every rank ends after the last checkpoint is on disk
        return history
    finally:
        if scorer is not None and scorer is not worker:
            scorer.close()
        if worker is not None:
            worker.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    cfg = parse_config(argv)
    train(cfg)


if __name__ == "__main__":
    main()
