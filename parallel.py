"""Distributed set-up and the collectives the trainer needs: torchrun's environment or one plain
process, rank agreement at the points where ranks can diverge, and gradient synchronization.

Ranks fail together: every stage where one rank may raise while the others go on into a
collective (rollouts and scoring, the backward passes, validation, checkpoint writes) runs inside
`Dist.together(stage)`. A rank that fails prints its error at once (a peer that learns of it first
may end the job, and torchrun then kills this rank before it could print). Replicated weights: the
stage ends with an all-reduce of a failure flag, which a failing rank joins too; it re-raises its
own error, the others raise `RankFailed` naming it. Under FSDP the peers may be inside a collective
of the stage itself (every forward, backward and rollout gathers weights), where an agreement
would never meet theirs: the failing rank leaves the process at once (os._exit), their collective
fails on the lost peer, and torchrun stops the job. Nobody is left waiting for the 30-minute NCCL
watchdog. Rules that keep this sound: every rank enters the same `together` blocks in the same
order, blocks do not nest, and only FSDP's own collectives run inside one.
"""

import contextlib
import datetime
import os
import sys
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class RankFailed(RuntimeError):
    """Another rank failed; it prints its own message, this one says which rank and where."""


@dataclass
class Dist:
    """This process's place among the ranks (one plain process: rank 0 of 1), and the collectives
    the trainer uses."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    node_start: int = 0  # global rank of this node's local rank 0
    # Where collectives run: the rank's GPU under NCCL, the CPU under gloo.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False  # stages hold FSDP collectives: a failing rank leaves without agreeing

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or "max") over ranks, in place (a no-op on one process)."""
        if self.world > 1:
            reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
            dist.all_reduce(t, op=reduce_op)
        return t

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (small Python objects: metrics, infos)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def together(self, stage: str):
        """Run a stage that may fail on some ranks only; on exit every rank knows whether any
        failed.

        One small all-reduce per use. The failing rank prints its error, then re-raises it (after
        telling the others), or under FSDP leaves the process at once; every other rank raises
        RankFailed naming the failed ranks and the stage."""
        try:
            yield
        except BaseException as e:
            if self.world > 1:
                if self.fsdp and lost_peer(e):
                    # The cause is the rank that left: one line, not a traceback.
                    first_line = (str(e).splitlines() or [""])[0]
                    sys.stderr.write(
                        f"[rank {self.rank}] stops during {stage}: a peer rank left (it printed "
                        f"its own error); here: {first_line[:200]}\n"
                    )
                    sys.stderr.flush()
                    os._exit(1)
                report_failure(self.rank, e, stage)
                if self.fsdp:  # no agreement: the peers may sit in an FSDP collective of this stage
                    os._exit(1)
                with contextlib.suppress(Exception):  # our own error is the one to report
                    self._failed_ranks(True)
            raise
        failed = self._failed_ranks(False)
        if failed:
            raise RankFailed(
                f"rank {', '.join(map(str, failed))} failed during {stage}; rank {self.rank} "
                "stops too (the failing rank printed its error)"
            )

    def _failed_ranks(self, failed: bool) -> list[int]:
        """The ranks that failed, this one by `failed` (a collective: every rank calls it)."""
        if self.world == 1:
            return []
        flags = torch.zeros(self.world, device=self.device)
        flags[self.rank] = float(failed)
        dist.all_reduce(flags)
        return [r for r in range(self.world) if flags[r] > 0]


# What a collective's error says when a peer rank left: gloo's closed or reset connection, NCCL's
# aborted communicator.
PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "communicator was aborted",
    "remote process exited",
)


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank left (PEER_LOST), rather than for a cause
    of this rank's own."""
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return any(s in text for s in PEER_LOST)


def report_failure(rank: int, error: BaseException, stage: str | None = None):
    """Print this rank's traceback to stderr now, once (marked on the error, which main()
    checks)."""
    if getattr(error, "rank_reported", False):
        return
    where = f" during {stage}" if stage else ""
    tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    sys.stderr.write(f"[rank {rank}] failed{where}:\n{tb}")
    sys.stderr.flush()
    sys.stdout.flush()
    with contextlib.suppress(AttributeError, TypeError):
        error.rank_reported = True


def setup_distributed(cfg) -> tuple[Dist, torch.device]:
    """(Dist, training device) from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or one
    plain process. NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        d = Dist()
    else:
        d = Dist(
            rank=int(os.environ["RANK"]),
            world=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ["LOCAL_RANK"]),
            fsdp=cfg.fsdp,
        )
        d.node_start = d.rank - d.local_rank
    use_cuda = cfg.device == "auto" and torch.cuda.is_available()
    if use_cuda:
        device = torch.device(f"cuda:{d.local_rank}")
    elif cfg.device == "auto":
        device = torch.device("cpu")
    else:
        device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    d.device = device  # where the collectives run: the GPU, or the CPU (gloo)
    if not cuda:
        d.device = torch.device("cpu")
    if d.world > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        # The timeout is a last resort: failures are agreed on (Dist.together), not waited out.
        timeout = datetime.timedelta(seconds=max(1800, 2 * cfg.worker_timeout))
        if cuda:
            # device_id binds NCCL's communicator to this rank's GPU at once (no guessing, no
            # lazy init).
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return d, device


def start_scorer(cfg, d: Dist, speaker_model: str | None = None):
    """Local rank 0 starts this node's Whisper worker (with `speaker_model` for speaker similarity,
    when the data has voice prompts); every rank of the node connects to it.
    Returns (worker or None, scorer)."""
    from whisper_worker import WhisperWorker, WorkerClient

    worker = None
    with d.together("starting the Whisper worker"):
        if d.local_rank == 0:
            reward_config = dict(
                beta_c=cfg.beta_c, tau_n=cfg.tau_n, lambda_c=cfg.lambda_c, lambda_n=cfg.lambda_n
            )
            scorer_config = dict(
                model=cfg.whisper,
                device=cfg.whisper_device,
                language=cfg.language or None,
                batch_size=cfg.whisper_batch,
                max_transcript_tokens=cfg.whisper_max_tokens or None,
                window_s=cfg.whisper_window,
                speaker_model=speaker_model,
                quality=cfg.quality or None,
                reward_config=reward_config,
            )
            worker = WhisperWorker(
                scorer_config,
                reward=cfg.reward,
                request_timeout=cfg.worker_timeout,
                threads=cfg.whisper_threads or None,
            )
            worker.start()
    info = None  # how to reach the worker: each rank gathers its local rank 0's
    if worker:
        info = worker.connect_info()
    infos = d.gather(info)
    if worker:
        return worker, worker
    client = WorkerClient(infos[d.node_start], request_timeout=cfg.worker_timeout)
    return worker, client


def sync_gradients(params, d: Dist, bucket_numel: int = 1 << 26):
    """Sum gradients over ranks (replicated weights) in flat buckets of at most `bucket_numel`
    elements: few collectives, and no full-model copy of the gradients (4 more bytes per fp32
    parameter). A parameter without a gradient sends zeros, so every rank sends the same layout."""
    if d.world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket = []  # the gradients of the bucket being filled
    numel = 0  # their elements
    for i, p in enumerate(params):
        bucket.append(p.grad)
        numel += p.grad.numel()
        if numel >= bucket_numel or i == len(params) - 1:
            flat = d.all_reduce(torch.cat([g.reshape(-1) for g in bucket]))
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
            bucket = []
            numel = 0


# ----------------------------------------------------------------------------------------------
# FSDP2 (--fsdp): the policy and reference sharded per decoder layer and at the root


def shard(module, device: torch.device):
    """fully_shard each decoder layer of `module.lm` (a Hugging Face Llama), then `module` itself,
    whose forward is the trainer's log-prob pass: the root's hooks gather the embeddings, the final
    norm and lm_head around it. fp32 master weights (and AdamW state), sharded over the ranks;
    on CUDA the compute runs in bf16 with fp32 gradient reduction. Returns the module."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as e:
        raise RuntimeError(
            f"--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
            f"{torch.__version__}: upgrade torch, or train without --fsdp"
        ) from e
    param_dtype = None  # the CPU computes in fp32
    if device.type == "cuda":
        param_dtype = torch.bfloat16
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in module.lm.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def is_sharded(module) -> bool:
    """Whether `module` is an FSDP2 module (False where torch has no FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch 2.5
        return False
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered(module):
    """Whole weights on every rank for the decode loop, which calls the model's parts directly
    (not its forward, so FSDP's hooks never gather them); sharded again on exit, freeing them.
    A no-op for a module that is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch 2.5: FSDP2 is not public, so nothing can be sharded
        yield
        return
    groups = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()


def full_model_state(module, d: Dist) -> dict | None:
    """The whole fp32 state dict of a sharded module on rank 0 (CPU), None on the others; a
    collective. Keys are `module.lm`'s (the Hugging Face model's)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    if d.rank != 0:
        return None
    return {k.removeprefix("lm."): v for k, v in state.items()}


def save_sharded_optimizer(folder: str, module, optimizer):
    """Every rank writes its shard of the AdamW state to `folder` (torch distributed checkpoint
    format; a collective; multi-node needs a shared filesystem)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(module, optimizer)}, checkpoint_id=folder)


def load_sharded_optimizer(folder: str, module, optimizer):
    """The inverse of save_sharded_optimizer, into an optimizer over the same sharded module."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    state = {"optimizer": get_optimizer_state_dict(module, optimizer)}
    dcp.load(state, checkpoint_id=folder)
    set_optimizer_state_dict(module, optimizer, state["optimizer"])
