"""Speed figures, each measured in one run against a reference: `python -m tools.bench SECTION`.

Every comparison prints one JSON line with `name`, the measured numbers and `ratio`
(ours / reference speed, > 1 means ours is faster). Sections:
  sample   tokens/s of sample.generate vs Hugging Face `generate` on the same model, batch and
           number of new tokens; on CUDA also ms per step against the memory-bandwidth bound
           (tools/bench_decode.py, as is `step`).
  step     ms per step of the compiled static decode step at a 256-slot cache and at the trainer's
           1,792 slots (it should cost the same), and of the eager loop.
  codec    seconds per second of audio of codec.XCodec2Decoder vs the xcodec2 package's decode_code
           (same random weights, full model shapes), if that package is importable; else ours only.
  reward   clips/s of scorer.WhisperScorer (transcripts verified against the text) vs its
           whisper.decode path, vs the seed's way (per clip: an NLL forward with its own encoder
           pass, then model.transcribe), same Whisper checkpoint and clips; and against the encoder
           alone (one pass per clip), the floor of any Whisper scorer; with the fraction of greedy
           tokens the draft (the text) proposed.
  gpu      the GPU figures in one command (tools/bench_gpu.py): decode at Llasa-1B shapes against
           HF and the bandwidth bound, a GRPO step's phase split and peak memory, Whisper
           large-v3 scoring.
           `--smoke` runs it all at tiny shapes on a CPU.
"""

import argparse
import dataclasses
import functools
import json
import sys

import torch

from tools import bench_decode, bench_gpu
from tools.bench_common import timed

# ----------------------------------------------------------------------------- codec


def _package_decoder(config, seed: int = 0):
    """The xcodec2 package's `XCodec2Model.decode_code`, run on its own generator + fc_post_a with
    random weights (decode_code uses nothing else; building XCodec2Model itself would download
    w2v-bert-2.0). Returns (decode_code, modules), the modules' state-dict keys being the
    checkpoint's, or (None, reason) when the package cannot be imported."""
    try:
        from xcodec2.modeling_xcodec2 import XCodec2Model
        from xcodec2.vq.codec_decoder_vocos import CodecDecoderVocos
    except Exception as e:  # ImportError, or a pinned dependency failing on this torch
        return None, f"none: xcodec2 package not importable ({type(e).__name__}: {e})"
    torch.manual_seed(seed)
    c = config
    modules = torch.nn.ModuleDict(
        dict(
            generator=CodecDecoderVocos(
                hidden_dim=c.hidden_dim,
                depth=c.depth,
                heads=c.n_heads,
                pos_meb_dim=c.hidden_dim // c.n_heads,
                hop_length=c.hop_length,
                vq_dim=c.vq_dim,
            ),
            fc_post_a=torch.nn.Linear(c.vq_dim, c.hidden_dim),
        )
    ).eval()
    return (lambda codes: XCodec2Model.decode_code(modules, codes)), modules


def bench_codec(argv):
    """XCodec2Decoder vs the xcodec2 package's decode_code: seconds per second of audio, same
    random weights."""
    import codec

    p = argparse.ArgumentParser(prog="python -m tools.bench codec", description=bench_codec.__doc__)
    p.add_argument(
        "--preset",
        choices=["full", "small"],
        default="full",
        help="'full': the published model's shapes (187M decoder parameters); 'small': hidden 64, "
        "2 blocks, for a quick look (default: full)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="audio per clip, 50 codes per second (default: 10)",
    )
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per measurement, median reported (default: 3)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device (default: cuda if available, else cpu)",
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads, as on CI (default: 2)"
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = (
        codec.XCodec2Config()
        if args.preset == "full"
        else codec.XCodec2Config(hidden_dim=64, depth=2, n_heads=4)
    )
    ref_decode, ref = _package_decoder(config)
    ours = codec.XCodec2Decoder(config)
    if ref_decode is not None:  # the package's weights, read through the checkpoint's key names
        state = ref.state_dict()
        ours.load_state_dict(
            {name: state[codec.checkpoint_key(name)] for name in ours.state_dict()}
        )
        ref.to(device)
    ours.eval().to(device)
    n_params = sum(t.numel() for t in ours.parameters())

    T = round(args.seconds * 50)
    for B in [int(b) for b in args.batches.split(",")]:
        codes = torch.randint(
            0, codec.CODEBOOK_SIZE, (B, 1, T), generator=torch.Generator().manual_seed(B)
        ).to(device)
        lengths = torch.full((B,), T, device=device)
        # Ours as the codec runs equal-length clips (no mask), ours with the padding mask on, the
        # package's.
        fns = [functools.partial(ours, codes), functools.partial(ours, codes, lengths)]
        if ref_decode:
            fns.append(functools.partial(ref_decode, codes))
        with torch.no_grad():
            outs = [fn() for fn in fns]  # warm-up, and the outputs to compare
            times = timed(fns, device, args.repeats)
        audio_s = B * T / 50
        # Matmul work: 2 flops per weight per frame (the convs and linears), plus attention's
        # 4 T^2 C per transformer block and clip.
        flops = 2 * n_params * B * T + 4 * B * T * T * config.hidden_dim * config.depth
        row = dict(
            name="codec",
            preset=args.preset,
            device=str(device),
            threads=args.threads,
            batch=B,
            seconds_per_clip=args.seconds,
            decoder_params=n_params,
            ours_s_per_audio_s=round(times[0] / audio_s, 4),
            ours_masked_s_per_audio_s=round(times[1] / audio_s, 4),
            ours_gflop_s=round(flops / times[0] / 1e9, 1),
        )
        if ref_decode:
            row.update(
                reference="xcodec2 XCodec2Model.decode_code",
                ref_s_per_audio_s=round(times[2] / audio_s, 4),
                ratio=round(times[2] / times[0], 3),
                max_abs_diff=float((outs[0] - outs[2]).abs().max()),
            )
        else:
            row.update(reference=ref, ratio=None)
        print(json.dumps(row), flush=True)


# ----------------------------------------------------------------------------- reward


def bench_reward(argv):
    """WhisperScorer (transcripts verified against the text) vs its whisper.decode path and the
    seed's way of scoring, and against the encoder alone: clips per second, same model and clips."""
    import os

    import torch.nn.functional as F
    import whisper
    from whisper.tokenizer import get_tokenizer

    import scorer as scoring
    import whisper_worker
    from reward import char_error_rate, tts_reward
    from whisper_decode import DraftStats

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
    assets = os.environ.get("TEST_ASSETS", os.path.join(root, "..", "shared", "assets"))
    p = argparse.ArgumentParser(
        prog="python -m tools.bench reward", description=bench_reward.__doc__
    )
    p.add_argument(
        "--whisper",
        default=os.path.join(assets, "whisper-tiny.en.pt"),
        help="Whisper name or checkpoint (default: whisper-tiny.en.pt in TEST_ASSETS)",
    )
    p.add_argument(
        "--clips",
        type=int,
        default=8,
        help="clips per run, cycling through the clean and noisy clips of "
        "TEST_ASSETS/speech (default: 8)",
    )
    p.add_argument("--language", default="en", help="language of the clips (default: en)")
    p.add_argument(
        "--batch-size", type=int, default=16, help="WhisperScorer's batch size (default: 16)"
    )
    p.add_argument(
        "--window",
        type=float,
        default=30.0,
        help="seconds Whisper hears, as --whisper-window; the seed's way hears 30 (default: 30)",
    )
    p.add_argument(
        "--texts",
        choices=["given", "heard"],
        default="given",
        help="each clip's text: what it was made to say, or what Whisper hears in it "
        "(its greedy transcript: speech that says its text) (default: given)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs per measurement, median reported (default: 1)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device (default: cuda if available, else cpu)",
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads, as on CI (default: 2)"
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with open(os.path.join(assets, "speech", "clips.jsonl")) as f:
        # All-zero silence is refused by WhisperScorer without any model work: leaving it in would
        # flatter ours.
        rows = [r for r in map(json.loads, f) if r["kind"] != "silence"]
    rows = [rows[i % len(rows)] for i in range(args.clips)]
    audios = [whisper_worker.read_wav(os.path.join(assets, "speech", r["wav"])) for r in rows]
    texts = [r["text"] for r in rows]
    kw = dict(batch_size=args.batch_size, window_s=args.window)
    scorer = scoring.WhisperScorer(args.whisper, device, args.language, **kw)
    decode_path = scoring.WhisperScorer(
        scorer.model, device, args.language, transcripts="whisper.decode", **kw
    )
    model = scorer.model
    dtype = torch.float16 if scorer.fp16 else torch.float32
    tokenizer = get_tokenizer(
        model.is_multilingual, num_languages=model.num_languages, language=args.language
    )
    if args.texts == "heard":
        texts = [score.transcript for score in scorer.score(audios, texts)]

    n_clips = len(audios)

    def ours(n=n_clips):
        return scorer.score(audios[:n], texts[:n])

    def whisper_decode_path(n=n_clips):
        return decode_path.score(audios[:n], texts[:n])

    def seed_way(n=n_clips):
        rewards = []
        for audio, text in zip(audios[:n], texts[:n]):
            mel = whisper.log_mel_spectrogram(
                whisper.pad_or_trim(audio), model.dims.n_mels, device=device
            )
            tokens = torch.tensor(
                [tokenizer.sot] + tokenizer.encode(" " + text) + [tokenizer.eot], device=device
            )
            features = model.encoder(mel[None].to(dtype))
            logits = model.decoder(tokens[None, :-1], features)[0]  # after a bare <|sot|>
            nll = F.cross_entropy(logits, tokens[1:]).item()
            transcript = model.transcribe(
                audio, language=args.language, temperature=0.0, fp16=scorer.fp16
            )["text"]
            rewards.append(tts_reward(char_error_rate(text, transcript), nll))
        return rewards

    def encoder_only():  # the floor of any scorer: Whisper's encoder on one window per clip
        for start in range(0, len(audios), args.batch_size):
            mel = [
                whisper.log_mel_spectrogram(
                    whisper.pad_or_trim(a, scorer.n_samples), model.dims.n_mels, device=device
                )
                for a in audios[start : start + args.batch_size]
            ]
            model.encoder(torch.stack(mel).to(dtype))

    fns = [ours, whisper_decode_path, encoder_only]
    if args.window == 30.0:  # the seed heard 30 s windows only
        fns.append(seed_way)
    with torch.inference_mode():
        ours(1)  # warm-up: tokenizer, mel filters, allocator
        whisper_decode_path(1)
        encoder_only()
        if seed_way in fns:
            seed_way(1)
        scorer.draft_stats = DraftStats()
        times = timed(fns, device, args.repeats)
        stats = dataclasses.replace(scorer.draft_stats)  # the timed runs' counts, copied
        verified = [(a.transcript, a.cer) for a in ours()]
        same = verified == [(b.transcript, b.cer) for b in whisper_decode_path()]
    clips = len(audios)
    row = dict(
        name="reward",
        model=os.path.basename(args.whisper),
        device=str(device),
        threads=args.threads,
        clips=clips,
        texts=args.texts,
        batch_size=args.batch_size,
        window_s=args.window,
        repeats=args.repeats,
        ours_clips_per_s=round(clips / times[0], 3),
        whisper_decode_clips_per_s=round(clips / times[1], 3),
        encoder_only_clips_per_s=round(clips / times[2], 3),
        fraction_of_encoder_bound=round(times[2] / times[0], 3),
        whisper_decode_fraction_of_encoder_bound=round(times[2] / times[1], 3),
        ratio_over_whisper_decode=round(times[1] / times[0], 3),
        draft_accepted_fraction=round(stats.accepted / max(stats.decided, 1), 3),
        decoder_calls_per_run=round(stats.calls / args.repeats, 1),
        transcripts_equal_whisper_decode=same,
    )
    if seed_way in fns:
        row.update(seed_clips_per_s=round(clips / times[3], 3), ratio=round(times[3] / times[0], 3))
    print(json.dumps(row), flush=True)


SECTIONS = {
    "sample": bench_decode.bench_sample,
    "step": bench_decode.bench_step,
    "codec": bench_codec,
    "reward": bench_reward,
    "gpu": bench_gpu.bench_gpu,
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SECTIONS:
        raise SystemExit(
            f"usage: python -m tools.bench SECTION [flags], SECTION one of {sorted(SECTIONS)} "
            f"(got {argv[0] if argv else 'nothing'!r}); "
            "`python -m tools.bench SECTION -h` lists its flags"
        )
    SECTIONS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
