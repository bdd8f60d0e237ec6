"""Whisper's greedy transcript of each clip, verified against the text it should say, and that
text's NLL, from the same decoder passes (issue 29).

The teacher-forced pass that scores the intended text's NLL computes, at every position, the
logits given the text before it: the text is a draft for the greedy transcript. Wherever Whisper's
greedy choice there (whisper.decode's rules: blank and EOT suppressed at the first sampled
position, the suppressed-token set, argmax, the length bound) is the text's next token, the
transcript follows the text at no further cost. At the first mismatch that choice is the
transcript's next token, and decoding goes on from the pass's KV cache, each call also checking a
draft taken from the text where the transcript rejoins it (prompt lookup). Each clip stops at its
own EOT or bound and leaves the batch. Cross-attention folds its keys and values into the queries
(_cross_attention): no clip pays for keys and values at all 1500 audio positions. The tokens are
whisper.decode's for the clip decoded alone (greedy_options), up to float rounding at an argmax
tie, which batching changes in whisper.decode too.
"""

import dataclasses
import itertools

import torch
import torch.nn.functional as F
import whisper
from whisper.decoding import DecodingTask, SuppressBlank, SuppressTokens
from whisper.tokenizer import get_tokenizer

DRAFT_LEN = 8  # most draft tokens checked per clip and call after a mismatch


@dataclasses.dataclass
class Verified:
    """One clip's answer: `tokens`, its greedy transcript up to EOT (EOT excluded; special tokens
    kept, as whisper.decode's DecodingResult.tokens), [] for a clip not decoded; `language`, the
    code its SOT sequence used (detected where none was given); `nll`, the mean cross-entropy in
    nats per token of its target and EOT after that SOT sequence."""

    tokens: list[int]
    language: str
    nll: float


@dataclasses.dataclass
class DraftStats:
    """Running totals: decoder calls (language detection, teacher-forced pass, greedy continuation),
    greedy tokens decided (EOT included) and how many of them a draft had proposed."""

    calls: int = 0
    decided: int = 0
    accepted: int = 0


def greedy_options(language, sample_len: int, fp16: bool) -> whisper.DecodingOptions:
    """whisper.decode's options for the transcript that verified_decode reproduces: temperature 0,
    no timestamps, the SOT sequence of `language` (None: detected), at most sample_len tokens, the
    default suppress_blank and suppress_tokens "-1"."""
    return whisper.DecodingOptions(
        language=language,
        without_timestamps=True,
        fp16=fp16,
        sample_len=sample_len,
        temperature=0.0,
    )


@torch.inference_mode()
def verified_decode(
    model, features, targets, languages, bounds, stats=None, draft_len=DRAFT_LEN
) -> list[Verified]:
    """Greedy transcript and NLL of every clip of a batch.

    features [B, n_audio_ctx, n_audio_state]: the encoder's output, in the decoding dtype; targets:
    B lists of the intended text's token ids (no SOT sequence, no EOT); languages: B codes, None
    where Whisper detects it (multilingual models only, else ValueError); bounds: B greedy bounds
    (whisper.decode's sample_len, in [1, n_text_ctx - the SOT sequence's length], else ValueError),
    or None for a clip whose NLL only is wanted (silence); stats: a DraftStats to add to;
    draft_len: most draft tokens a clip's decoder call checks."""
    stats = DraftStats() if stats is None else stats
    rules = _Rules(model)
    n_prefix = len(rules.prefix("en"))
    limit = model.dims.n_text_ctx - n_prefix
    if any(bound is not None and not 1 <= bound <= limit for bound in bounds):
        raise ValueError(f"greedy bounds must be None or in [1, {limit}], got {bounds}")
    longest = max(n_prefix + max(len(t), b or 0) for t, b in zip(targets, bounds))
    cache = _Cache(model, features, slots=longest + draft_len + 2)
    languages = list(languages)
    skip = 0  # leading tokens of every sequence already in the cache
    if None in languages:
        languages = _detect(model, cache, rules, languages, stats)
        skip = 1
    sequences = [rules.prefix(lang) + target for lang, target in zip(languages, targets)]
    answers = [target + [rules.eot] for target in targets]  # due from the first sampled position
    nlls, choices = _teacher_forced(model, cache, rules, sequences, answers, skip, stats)
    clips = []
    decoding = []  # by batch row: the clip if it decodes on, else None
    for target, bound, after_prefixes in zip(targets, bounds, choices):
        clip = _Clip(rules.draft_source(target), bound, n_prefix, draft_len)
        clips.append(clip)
        going = bound is not None and clip.follow(after_prefixes, rules.eot, stats)
        decoding.append(clip if going else None)
    _decode_on(model, cache, rules, decoding, stats)
    return [
        Verified(tokens=clip.out, language=lang, nll=nll)
        for clip, lang, nll in zip(clips, languages, nlls)
    ]


def _detect(model, cache, rules, languages, stats) -> list[str]:
    """languages, each None replaced by the language Whisper detects in its clip; the decoder call
    on <|startoftranscript|> leaves that position of every clip in the cache."""
    device = cache.features.device
    batch = len(languages)
    sot = torch.full((batch, 1), rules.sot, device=device)
    logits = _logits(model, cache.forward(sot, _starts(batch, 0, device))[:, 0])  # [B, n_vocab]
    stats.calls += 1
    return rules.detected(logits, languages)


def _teacher_forced(model, cache, rules, sequences, answers, skip, stats):
    """One decoder call on every sequence (SOT sequence + target; its first `skip` tokens already
    in the cache). Returns the NLL of each row's answers (target + EOT, due from the first sampled
    position on) and, per row, the greedy choice at each of those positions."""
    device = cache.features.device
    hidden = cache.forward(_padded(sequences, skip, device), _starts(len(sequences), skip, device))
    stats.calls += 1
    first = len(sequences[0]) - len(answers[0]) - skip  # the first sampled position's logits
    due = torch.zeros(hidden.shape[:2], dtype=torch.bool)  # [B, L]: True where a token is due
    for row, answer in enumerate(answers):
        due[row, first : first + len(answer)] = True
    logits = _logits(model, hidden[due.to(device)])  # [N, n_vocab]: the due positions in order
    labels = torch.tensor([token for answer in answers for token in answer], device=device)
    counts = [len(answer) for answer in answers]
    losses = F.cross_entropy(logits, labels, reduction="none").split(counts)
    nlls = torch.stack([loss.mean() for loss in losses]).tolist()
    starts = [0] + list(itertools.accumulate(counts))[:-1]  # each row's first due position in N
    rules.suppress(logits, blank_at=starts)
    choices = logits.argmax(-1).tolist()
    return nlls, [choices[start : start + count] for start, count in zip(starts, counts)]


def _decode_on(model, cache, rules, clips, stats):
    """Greedy decoding of the clips that left their text, each until it stops. clips: the clip of
    each batch row, None where it does not decode on. One decoder call per step computes the rows
    still decoding: each clip's last token and its draft."""
    device = cache.features.device
    rows = [row for row, clip in enumerate(clips) if clip is not None]
    while rows:
        cache.select(rows)
        fed = []
        for row in rows:
            fed.append([clips[row].last] + clips[row].draft())
        positions = torch.tensor([clips[row].cached for row in rows], device=device)
        hidden = cache.forward(_padded(fed, 0, device), positions)  # [R, k, n_text_state]
        stats.calls += 1
        lengths = torch.tensor([len(tokens) for tokens in fed], device=device)
        fed_at = torch.arange(hidden.shape[1], device=device) < lengths[:, None]  # [R, k]
        logits = _logits(model, hidden[fed_at])  # [N, n_vocab]: the fed positions only
        rules.suppress(logits, blank_at=[])
        choices = logits.argmax(-1).tolist()
        going = []
        for row, tokens in zip(rows, fed):
            clip = clips[row]
            for i, choice in enumerate(choices[: len(tokens)]):
                if not clip.take(i, choice, rules.eot, stats):
                    break
            choices = choices[len(tokens) :]
            if not clip.done:
                going.append(row)
        rows = going


class _Rules:
    """whisper.decode's greedy rules for `model`: its SOT sequences, the tokens suppressed at every
    step and at the first sampled one (read from whisper's logit filters), its language tokens."""

    def __init__(self, model):
        self.model = model
        task = DecodingTask(model, greedy_options("en", 1, False))
        tokenizer = task.tokenizer
        self.sot = tokenizer.sot
        self.eot = tokenizer.eot
        self.always = []
        self.first = []
        for logit_filter in task.logit_filters:
            if isinstance(logit_filter, SuppressTokens):
                self.always = list(logit_filter.suppress_tokens)
            elif isinstance(logit_filter, SuppressBlank):
                self.first = tokenizer.encode(" ") + [tokenizer.eot]  # SuppressBlank.apply's
            else:
                raise TypeError(f"unexpected whisper logit filter {type(logit_filter).__name__}")
        self.tokenizer = tokenizer

    def draft_source(self, target) -> list[int]:
        """What the greedy transcript is drafted from: the target, a period unless it ends with
        one (Whisper ends most transcripts with one; a wrong draft token costs no decoder call),
        EOT."""
        period = self.tokenizer.encode(".")
        if target[-len(period) :] == period:
            return target + [self.eot]
        return target + period + [self.eot]

    def prefix(self, language) -> list[int]:
        """The SOT sequence (language, task, no timestamps) of `language`."""
        tokenizer = get_tokenizer(
            self.model.is_multilingual,
            language=language,
            task="transcribe",
            num_languages=self.model.num_languages,
        )
        return list(tokenizer.sot_sequence_including_notimestamps)

    def detected(self, logits, languages) -> list[str]:
        """languages with each None replaced by the argmax language of logits [B, n_vocab] (the
        logits after <|startoftranscript|>), as whisper.decoding.detect_language chooses."""
        if not self.model.is_multilingual:
            raise ValueError("this Whisper model is English-only: it cannot detect a language")
        tokens = list(self.tokenizer.all_language_tokens)
        codes = list(self.tokenizer.all_language_codes)
        choices = logits[:, tokens].argmax(-1).tolist()
        detected = [codes[choice] for choice in choices]
        return [language or code for language, code in zip(languages, detected)]

    def suppress(self, logits, blank_at):
        """In place on logits [N, n_vocab]: -inf at the tokens suppressed at every step, and at
        the rows blank_at (a list) at the first sampled position's too."""
        device = logits.device
        logits.index_fill_(-1, torch.tensor(self.always, device=device), -torch.inf)
        if blank_at:
            rows = torch.tensor(blank_at, device=device)[:, None]
            logits[rows, torch.tensor(self.first, device=device)] = -torch.inf


class _Clip:
    """One clip's greedy decoding: its output so far, its draft source (_Rules.draft_source), how
    many leading positions of the cache hold its inputs (`cached`), its last choice (not yet fed)
    and its draft's length (`size`: halved when its first token is wrong, doubled if all hold)."""

    def __init__(self, source, bound, n_prefix, draft_len):
        self.source = source
        self.bound = bound
        self.n_prefix = n_prefix
        self.out = []
        self.expected = 0  # where in `source` the output would go on, had it followed it
        self.cached = 0
        self.last = None
        self.drafted = []
        self.draft_len = draft_len
        self.size = draft_len
        self.done = False

    def follow(self, choices, eot, stats) -> bool:
        """Walks the teacher-forced pass's choices (choices[j]: the greedy token after target[:j])
        while they are the target's; True if the clip must decode on."""
        for j, choice in enumerate(choices):
            stats.decided += 1
            drafted = choice == self.source[j]
            stats.accepted += int(drafted)
            if self._stops(choice, eot):
                return False
            if not drafted or j == len(choices) - 1:  # the pass has no logits after this choice
                self.cached = self.n_prefix + j  # the SOT sequence and target[:j]
                self.last = choice
                self._moved(j + 1)
                return True
        raise AssertionError("a teacher-forced pass always has a choice")

    def draft(self) -> list[int]:
        """`size` source tokens (within the bound) from where the output rejoins the source: after
        the longest n-gram (up to 3) ending the output that the source has (the occurrence nearest
        where the output would be); without one, from where the output would be had its last
        token taken the place of the source's."""
        room = min(self.size, self.bound - len(self.out) - 1)
        for n in range(min(3, len(self.out)), 0, -1):
            tail = self.out[-n:]
            ends = [
                e
                for e in range(n - 1, len(self.source) - 1)
                if self.source[e - n + 1 : e + 1] == tail
            ]
            if ends:
                self.expected = min(ends, key=lambda e: abs(e + 1 - self.expected)) + 1
                break
        self.drafted = self.source[self.expected : self.expected + max(room, 0)]
        return self.drafted

    def take(self, i, choice, eot, stats) -> bool:
        """Takes the greedy choice after the last token (i = 0) or after draft token i - 1; True if
        it is the draft's next token and the clip goes on (the choice at i + 1 is wanted)."""
        stats.decided += 1
        drafted = i < len(self.drafted) and choice == self.drafted[i]
        stats.accepted += int(drafted)
        if self._stops(choice, eot):
            self.done = True
            return False
        if drafted:
            return True
        if self.drafted and i == len(self.drafted):
            self.size = min(2 * self.size, self.draft_len)
        elif self.drafted and i == 0:
            self.size = max(1, self.size // 2)
        self.cached += i + 1  # the last token and the draft's first i, taken
        self.last = choice
        self._moved(self.expected + i + 1)
        return False

    def _moved(self, expected):
        # The output goes on from there in the source, had its last token taken the place of the
        # source's; never past the source's EOT (an output that did not stop inserted a token).
        self.expected = min(expected, len(self.source) - 1)

    def _stops(self, choice, eot) -> bool:
        if choice == eot:
            return True
        self.out.append(choice)
        return len(self.out) == self.bound


class _Cache:
    """A batch's decoder state: the self-attention keys and values [B, slots, n_text_state] per
    layer, written in place at each token's position, and the audio features [B, n_audio_ctx,
    n_audio_state] that cross-attention reads (_cross_attention: no keys or values stored)."""

    def __init__(self, model, features, slots):
        self.decoder = model.decoder
        self.features = features
        shape = (features.shape[0], slots, model.dims.n_text_state)
        self.keys = [features.new_zeros(shape) for _ in self.decoder.blocks]
        self.values = [features.new_zeros(shape) for _ in self.decoder.blocks]
        self.rows = list(range(features.shape[0]))
        self.index = torch.arange(features.shape[0], device=features.device)
        self.audio = features  # the features of `rows`

    def select(self, rows):
        """The batch rows that the next calls compute, in this order."""
        if rows == self.rows:
            return
        self.rows = rows
        self.index = torch.tensor(rows, device=self.features.device)
        self.audio = self.features.index_select(0, self.index)

    def forward(self, tokens, start):
        """The decoder's last hidden states [R, k, n_text_state] of tokens [R, k] of the selected
        rows, the first at position start [R] of its row (the cache holds every earlier one);
        their keys and values are written at their positions. Padding computes garbage."""
        decoder = self.decoder
        n_ctx = decoder.positional_embedding.shape[0]
        positions = start[:, None] + torch.arange(tokens.shape[1], device=start.device)  # [R, k]
        x = decoder.positional_embedding[positions.clamp(max=n_ctx - 1)]  # padding past n_ctx
        x = decoder.token_embedding(tokens) + x
        x = x.to(self.features.dtype)
        n_keys = int(positions.max()) + 1
        keys_at = torch.arange(n_keys, device=start.device)
        visible = keys_at <= positions[:, :, None]  # [R, k, n_keys]: causal, True where seen
        rows = self.index[:, None]
        for block, keys, values in zip(decoder.blocks, self.keys, self.values):
            h = block.attn_ln(x)
            keys[rows, positions] = block.attn.key(h)
            values[rows, positions] = block.attn.value(h)
            seen_keys = keys[self.index, :n_keys]
            seen_values = values[self.index, :n_keys]
            x = x + block.attn.out(_attention(block.attn, h, seen_keys, seen_values, visible))
            h = block.cross_attn_ln(x)
            x = x + block.cross_attn.out(_cross_attention(block.cross_attn, h, self.audio))
            x = x + block.mlp(block.mlp_ln(x))
        return decoder.ln(x)


def _attention(attention, h, keys, values, visible):
    """whisper.model.MultiHeadAttention's scaled-dot-product path on given keys and values: h [R, k,
    n_state] queries through attention.query; visible [R, k, S] bool."""
    q = attention.query(h)
    heads = attention.n_head
    q = q.view(*q.shape[:2], heads, -1).transpose(1, 2)
    k = keys.view(*keys.shape[:2], heads, -1).transpose(1, 2)
    v = values.view(*values.shape[:2], heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])  # [R, H, k, d_head]
    return out.transpose(1, 2).flatten(2)


def _cross_attention(attention, h, audio):
    """Whisper's cross-attention of h [R, k, n_state] over audio [R, A, n_state] (before its `out`
    projection), with the keys and values folded into the queries: per head, q . (x W_k) =
    (q W_k^T) . x, and softmax . (x W_v + b_v) = (softmax . x) W_v + b_v, as the softmax sums to
    1. Keys and values at all A positions cost 2 A n_state^2 per layer and clip; the folded form
    2 A n_state n_head per query: less below 64 queries per clip (Whisper's head size)."""
    batch, length, width = h.shape
    heads = attention.n_head
    q = attention.query(h).view(batch, length, heads, width // heads)  # [R, k, H, d_head]
    key = attention.key.weight.to(h.dtype).view(heads, width // heads, width)  # [H, d_head, n]
    q = torch.einsum("rkhe,hen->rhkn", q, key).reshape(batch, 1, heads * length, width)
    # One attention "head" of width n_state whose keys and values are both the audio: read once.
    scale = (width // heads) ** -0.5
    # [R, 1, H k, n_state]
    mixed = F.scaled_dot_product_attention(q, audio[:, None], audio[:, None], scale=scale)
    mixed = mixed.view(batch, heads, length, width)
    value = attention.value.weight.to(h.dtype).view(heads, width // heads, width)
    out = torch.einsum("rhkn,hen->rkhe", mixed, value).reshape(batch, length, width)
    return out + attention.value.bias.to(h.dtype)


def _logits(model, hidden):
    """Float32 logits [..., n_vocab] of hidden states [..., n_text_state], as TextDecoder's."""
    embedding = model.decoder.token_embedding.weight.to(hidden.dtype)
    return (hidden @ torch.transpose(embedding, 0, 1)).float()


def _starts(batch, position, device):
    """Every row's first position [batch]: `position`."""
    return torch.full((batch,), position, dtype=torch.long, device=device)


def _padded(sequences, skip: int, device):
    """Token ids [R, k]: each sequence without its first `skip` tokens, right-padded with 0."""
    length = max(len(sequence) for sequence in sequences) - skip
    tokens = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence) - skip] = torch.tensor(sequence[skip:])
    return tokens.to(device)
