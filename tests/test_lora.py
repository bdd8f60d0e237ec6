"""lora.py and policy.py: LoRA's initial policy is the base exactly, merged rollouts and checkpoints
equal the adapter model, the adapters-off reference equals a copied base, 2 ranks (replicated
and FSDP2) equal 1, the PEFT layout round-trips, and a LoRA run trains only its adapters and
resumes exactly.

mp.spawn's children import `_lora_update` from this file by name."""

import contextlib
import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import config
import data
import decode
import grpo
import llama
import lora
import models
import outputs
import parallel
import policy as policies
import sample
from helpers import _FakeScorer, _tiny, read_json
from test_grpo import _fixed_rollouts, _port, _rank_share
from tools import memory


def _adapted(vocab, rank=4, seed=1, bump=0.05, **kw):
    """A tiny Llama with adapters whose B is random (so the adapted map differs from the base)."""
    lm = models.tiny_llama(vocab, seed=seed, **kw)
    lora.add_adapters(lm, rank, 8.0, seed=0)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, m in lora.adapters(lm):
            m.lora_B.copy_(bump * torch.randn(m.lora_B.shape, generator=g))
    return lm


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def test_initial_lora_policy_is_the_base_model_exactly():
    base = models.tiny_llama(300, seed=1)
    adapted = copy.deepcopy(base)
    names = lora.add_adapters(adapted, 4, 8.0, seed=0)
    assert len(names) == 2 * 7
    assert names[0] == "model.layers.0.self_attn.q_proj"
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    ids = _ids(300)
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, base(ids).logits)
        with lora.merged(adapted):
            assert torch.equal(adapted(ids).logits, base(ids).logits)
    for _, m in lora.adapters(adapted):
        assert torch.equal(m.merged_weight(), m.base.weight)
        assert m.merged is None
    with pytest.raises(ValueError, match="names no linear map of decoder layer 0"):
        lora.add_adapters(models.tiny_llama(300), 4, 8.0, targets=("q_proj", "qkv"))


def test_adapted_map_merged_and_disabled_by_hand():
    lin = torch.nn.Linear(5, 3)
    m = lora.LoRALinear(lin, 2, 6.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(4, 5)
    expect = lin(x) + 3.0 * (x @ m.lora_A.T @ m.lora_B.T)  # alpha / r = 3
    assert torch.allclose(m(x), expect, atol=1e-6)
    assert torch.allclose(x @ m.merged_weight().T + lin.bias, expect, atol=1e-6)
    with lora.disabled(m):
        assert torch.equal(m(x), lin(x))
    assert m.enabled


def test_lora_rollouts_run_on_merged_weights_eager_static_and_compiled():
    tok = data.tiny_tokenizer()
    sv = data.speech_vocab(tok)
    lm = _adapted(len(tok), bump=0.2)
    prompts = [data.prompt_ids(tok, t) for t in ["One.", "Two words here."]]
    kw = dict(
        max_new_tokens=10, temperature=0.8, stop_ids=(sv.end_id,), allowed_ids=sv.allowed_ids()
    )
    with torch.no_grad():
        plain = sample.generate(lm, prompts, generator=torch.Generator().manual_seed(0), **kw)
        with lora.merged(lm):
            merged = sample.generate(lm, prompts, generator=torch.Generator().manual_seed(0), **kw)
        static = sample.generate(
            lm,
            prompts,
            generator=torch.Generator().manual_seed(0),
            decoder=decode.Decoder(lm, compile=False),
            **kw,
        )
        # inductor, as on a GPU
        compiled = sample.generate(
            lm,
            prompts,
            generator=torch.Generator().manual_seed(0),
            decoder=decode.Decoder(lm, compile=True),
            **kw,
        )
        off = copy.deepcopy(lm)
        with lora.disabled(off):
            base = sample.generate(off, prompts, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(plain.tokens, merged.tokens)
    assert torch.equal(plain.tokens, static.tokens)
    assert torch.allclose(plain.logprobs, merged.logprobs, atol=1e-5)
    assert torch.allclose(plain.logprobs, static.logprobs, atol=1e-5)
    assert torch.equal(plain.tokens, compiled.tokens)
    assert torch.allclose(plain.logprobs, compiled.logprobs, atol=1e-5)
    # the adapters do change the policy
    assert not torch.allclose(plain.logprobs, base.logprobs, atol=1e-3)


def test_a_bf16_base_keeps_fp32_rotary_buffers_and_checkpoints_in_fp32(tmp_path):
    """On CUDA the frozen base is bf16 (models.cast_parameters): its rotary inv_freq stays fp32, and
    the merged checkpoint is fp32 with a config.json that says so (dtype "auto" keeps it)."""
    tok = data.tiny_tokenizer()
    lm = models.cast_parameters(models.tiny_llama(len(tok), seed=1), torch.bfloat16)
    lora.add_adapters(lm, 4, 8.0)
    assert lm.model.rotary_emb.inv_freq.dtype == torch.float32
    assert lm.lm_head.weight.dtype == torch.bfloat16
    cfg = config.Config(model="tiny", lora_rank=4, lora_alpha=8.0)
    weights, extra = policies.checkpoint_state(llama.LogProbs(lm), cfg, parallel.Dist())
    outputs.save_checkpoint(
        str(tmp_path / "ckpt"), lm, tok, {"step": 1}, weights=weights, extra=extra
    )
    assert read_json(tmp_path / "ckpt" / "config.json")["dtype"] == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype="auto")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert lora.parse_targets("q_proj, k_proj,q_proj") == ("q_proj", "k_proj")


@pytest.mark.parametrize("tied", [False, True])
def test_merged_checkpoint_is_a_plain_llama_with_the_adapter_models_logits(tmp_path, tied):
    tok = data.tiny_tokenizer()
    lm = _adapted(len(tok), tie_word_embeddings=tied)
    cfg = config.Config(model="tiny", lora_rank=4, lora_alpha=8.0)
    weights, extra = policies.checkpoint_state(llama.LogProbs(lm), cfg, parallel.Dist())
    path = str(tmp_path / "ckpt")
    outputs.save_checkpoint(path, lm, tok, {"step": 1}, weights=weights, extra=extra)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert not any("lora" in k or ".base." in k for k in loaded.state_dict())
    assert all(
        v.dtype == torch.float32
        for v in load_file(os.path.join(path, "model.safetensors")).values()
    )
    ids = _ids(len(tok))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, lm(ids).logits, atol=1e-5)
    # The adapter in PEFT's layout, loaded back into a fresh adapted base: the same model exactly.
    folder = os.path.join(path, lora.ADAPTER_DIR)
    cfg_json = read_json(os.path.join(folder, "adapter_config.json"))
    assert (cfg_json["peft_type"], cfg_json["r"], cfg_json["lora_alpha"]) == ("LORA", 4, 8.0)
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (4, 64)
    assert len(tensors) == 2 * 2 * 7
    fresh = models.tiny_llama(len(tok), seed=1, tie_word_embeddings=tied)
    lora.add_adapters(fresh, 4, 8.0, seed=5)
    lora.load_adapter(fresh, folder, 4, 8.0, lora.TARGETS)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, lm(ids).logits)
    with pytest.raises(ValueError, match="adapter of rank 4"):
        lora.load_adapter(fresh, folder, 8, 8.0, lora.TARGETS)


def test_adapters_off_reference_equals_a_copied_base():
    tok, ro = _fixed_rollouts()
    cfg = config.Config(kl_coef=0.1, micro_batch=3, temperature=0.8, max_new_tokens=7)
    out = []
    for copied in (False, True):
        lm = _adapted(len(tok)).train()
        policy = llama.LogProbs(lm)
        if copied:
            base = copy.deepcopy(lm)
            with lora.disabled(base), torch.no_grad():  # the same base, as a model of its own
                for _, m in lora.adapters(base):
                    m.lora_B.zero_()
            ref = llama.LogProbs(base)
        else:
            ref = lora.AdaptersOff(policy)
        opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
        stats = grpo.update_policy(
            policy,
            ref,
            opt,
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
            ro,
            cfg,
            parallel.Dist(),
            contextlib.nullcontext,
        )
        out.append((stats, {k: v.detach().clone() for k, v in lm.named_parameters()}))
    (a, pa), (b, pb) = out
    assert a["kl"] > 0
    assert a["kl"] == pytest.approx(b["kl"], rel=1e-6)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-7), k
    base = models.tiny_llama(len(tok), seed=1).state_dict()
    # the base never moved
    assert all(
        torch.equal(pa[k.replace("proj.weight", "proj.base.weight")], v)
        for k, v in base.items()
        if "proj" in k
    )


def test_lora_update_with_grad_checkpointing_equals_without():
    """Checkpointed layers behind frozen embeddings still carry the adapters' gradients (policy.py
    turns on the input's requires_grad): the same update either way."""
    tok, ro = _fixed_rollouts()
    cfg = config.Config(kl_coef=0.0, micro_batch=4, temperature=0.8, max_new_tokens=7)
    out = []
    for checkpointing in (False, True):
        lm = _adapted(len(tok)).train()
        if checkpointing:
            getattr(lm, "activation_checkpointing_enable", lm.gradient_checkpointing_enable)()
            lm.enable_input_require_grads()
        opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.5)
        stats = grpo.update_policy(
            lm,
            None,
            opt,
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
            ro,
            cfg,
            parallel.Dist(),
            contextlib.nullcontext,
        )
        out.append((stats["grad_norm"], {k: p.detach().clone() for k, p in lm.named_parameters()}))
    assert out[0][0] > 0
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    for k in out[0][1]:
        assert torch.allclose(out[0][1][k], out[1][1][k], atol=1e-7), k


def _lora_update(rank, world, init_method, out_file, fsdp):
    """One update of a LoRA policy (reference: adapters off) on this rank's share of rollouts."""
    tok, ro = _rank_share(rank, world, init_method)
    policy = llama.LogProbs(_adapted(len(tok))).train()
    if fsdp:
        policy = parallel.shard(policy, torch.device("cpu"))
    cfg = config.Config(
        kl_coef=0.1,
        micro_batch=3,
        updates_per_rollout=2,
        temperature=0.8,
        max_new_tokens=7,
        fsdp=fsdp,
        lora_rank=4,
        lora_alpha=8.0,
    )
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    d = parallel.Dist(rank=rank, world=world)
    stats = grpo.update_policy(
        policy,
        lora.AdaptersOff(policy),
        opt,
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        ro,
        cfg,
        d,
        contextlib.nullcontext,
    )
    weights, extra = policies.checkpoint_state(policy, cfg, d)  # FSDP: gathered here, a collective
    if rank == 0:
        folder = out_file + ".ckpt"
        extra(folder)
        adapter = load_file(os.path.join(folder, lora.ADAPTER_DIR, "adapter_model.safetensors"))
        torch.save({"adapter": adapter, "weights": weights(), "stats": stats}, out_file)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)


@pytest.mark.parametrize("fsdp", [False, True])
def test_lora_two_ranks_equal_one(tmp_path, fsdp):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _lora_update(0, 1, None, one, False)
    mp.spawn(_lora_update, args=(2, f"tcp://127.0.0.1:{_port()}", two, fsdp), nprocs=2, join=True)
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert set(a["adapter"]) == set(b["adapter"])
    assert set(a["weights"]) == set(b["weights"])
    for k in a["adapter"]:
        assert torch.allclose(a["adapter"][k], b["adapter"][k], atol=1e-6, rtol=0), k
    for k in a["weights"]:
        assert torch.allclose(a["weights"][k], b["weights"][k], atol=1e-6, rtol=0), k
    assert a["stats"]["loss"] == pytest.approx(b["stats"]["loss"], abs=1e-6)
    assert a["stats"]["kl"] == pytest.approx(b["stats"]["kl"], rel=1e-5)
    start = _adapted(len(_fixed_rollouts()[0])).state_dict()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    # the step moved it
    assert not torch.equal(start["model.layers.0.self_attn.q_proj.lora_B"], a["adapter"][key])


def test_lora_run_trains_only_adapters_and_resumes_exactly(tmp_path):
    """grpo.train with --lora-rank: the base never moves, checkpoints hold the merged model and the
    adapter; a resumed run continues exactly (base from --model, adapter from the checkpoint)."""
    common = [
        "--reward",
        "test_grpo:tone_reward",
        "--val-data",
        "",
        "--lora-rank",
        "4",
        "--lr",
        "1e-2",
        "--save-every",
        "1",
    ]
    full = grpo.train(_tiny(tmp_path / "a", *common, "--steps", "2"))
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step_1"
    resumed = grpo.train(_tiny(tmp_path / "b", *common, "--steps", "2", "--resume", str(ckpt)))
    for key in ("reward_mean", "loss", "kl", "entropy", "grad_norm"):
        assert full[1][key] == pytest.approx(resumed[0][key], abs=1e-6), key
    final = tmp_path / "a" / "run" / "checkpoints" / "step_2"
    assert os.path.isfile(final / lora.ADAPTER_DIR / "adapter_model.safetensors")
    merged = AutoModelForCausalLM.from_pretrained(str(final)).state_dict()
    base = models.load_model("tiny", dtype=torch.float32)[0].state_dict()
    moved = [k for k in base if not torch.equal(base[k], merged[k])]
    # only adapted maps differ: embeddings, norms, head never
    assert moved
    assert all("proj" in k for k in moved)
    with pytest.raises(ValueError, match="--lora-rank was 4"):
        grpo.Trainer(
            _tiny(tmp_path / "c", *common, "--lora-rank", "8"),
            parallel.Dist(),
            torch.device("cpu"),
            _FakeScorer(0.5),
            resume_from=str(ckpt),
        )


def test_memory_lora_terms_match_real_tensors():
    shape = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512)
    model = models.tiny_llama(1003, **shape).to(torch.bfloat16).train()  # the base as on CUDA
    lora.add_adapters(model, 8, 16.0)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 1003, (2, 9))).logits.float().sum().backward()
    opt.step()
    m = memory.training_memory(model.config, lora_rank=8)
    assert memory.lora_params(model.config, 8) == sum(p.numel() for p in trained)
    assert m["weights"] == sum(p.nbytes for p in model.parameters())
    assert m["grads"] == sum(p.grad.nbytes for p in trained)
    assert m["reference"] == 0
    assert m["optimizer"] == sum(
        v.nbytes for s in opt.state.values() for k, v in s.items() if k != "step"
    )
    # activations per layer per token, as tests/test_memory.py measures the full model's
    from test_memory import _saved_bytes

    big = dict(hidden_size=256, num_heads=8, num_kv_heads=2, intermediate_size=1024)
    nets = {}
    for n in (2, 4):
        nets[n] = models.tiny_llama(512, num_layers=n, **big).to(torch.bfloat16).train()
        lora.add_adapters(nets[n], 8, 16.0)
    b = {(n, L): _saved_bytes(nets[n], 2, L) for n in (2, 4) for L in (64, 128)}
    per_token = (b[4, 128] - b[4, 64] - b[2, 128] + b[2, 64]) / (2 * 2 * 64)
    formula = memory.layer_activation_bytes(nets[2].config, lora_rank=8)
    assert abs(per_token - formula) <= 0.1 * formula, (per_token, formula)
    full, lo = (
        memory.training_memory(memory.LLASA_SHAPES["llasa-8b"], world=2, fsdp=True, lora_rank=r)
        for r in (0, 16)
    )
    # Llasa-8B on two 80 GB cards: with LoRA, not without
    assert lo["total"] < 0.9 * 80e9 < full["total"]
