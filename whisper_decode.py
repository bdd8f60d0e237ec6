"""Whisper's greedy transcript of each clip, verified against the text it should say, and that
text's NLL, from the same decoder passes (issue 29).

The teacher-forced pass that scores the intended text's NLL computes, at every position, the
logits given the text before it: the text is a draft for the greedy transcript. Wherever Whisper's
greedy choice there (whisper.decode's rules: blank and EOT suppressed at the first sampled
position, the suppressed-token set, argmax, the length bound) is the text's next token, the
transcript follows the text at no further cost. At the first mismatch that choice is the
transcript's next token, and decoding goes on from the pass's KV cache, each call also checking a
draft looked up in the text where the transcript rejoins it (prompt lookup). Each clip stops at
its own EOT or bound. The tokens are whisper.decode's for the clip decoded alone (greedy_options),
up to float rounding at an argmax tie, which batching changes in whisper.decode too.
"""
import dataclasses

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
    return whisper.DecodingOptions(language=language, without_timestamps=True, fp16=fp16,
                                   sample_len=sample_len, temperature=0.0)


@torch.inference_mode()
def verified_decode(model, features, targets, languages, bounds, stats=None,
                    draft_len=DRAFT_LEN) -> list[Verified]:
    """Greedy transcript and NLL of every clip of a batch.

    features [B, n_audio_ctx, n_audio_state]: the encoder's output, in the decoding dtype; targets:
    B lists of the intended text's token ids (no SOT sequence, no EOT); languages: B codes, None
    where Whisper detects it (multilingual models only, else ValueError); bounds: B greedy bounds
    (whisper.decode's sample_len, in [1, n_text_ctx - the SOT sequence's length], else ValueError),
    or None for a clip whose NLL only is wanted (silence); stats: a DraftStats to add to."""
    stats = DraftStats() if stats is None else stats
    device = features.device
    rules = _Rules(model)
    n_prefix = len(rules.prefix("en"))
    limit = model.dims.n_text_ctx - n_prefix
    if any(bound is not None and not 1 <= bound <= limit for bound in bounds):
        raise ValueError(f"greedy bounds must be None or in [1, {limit}], got {bounds}")
    longest = max(n_prefix + max(len(t), b or 0) for t, b in zip(targets, bounds))
    cache = _Cache(model, features, slots=longest + draft_len + 2)
    skip = 0  # leading tokens of every sequence already in the cache
    languages = list(languages)
    if None in languages:  # <|startoftranscript|> of every clip, then the language of these
        sot = torch.full((len(targets), 1), rules.sot, device=device)
        logits = _logits(model, cache.forward(sot, _starts(len(targets), 0, device)))
        stats.calls += 1
        languages = rules.detected(logits[:, 0], languages)
        skip = 1
    sequences = [rules.prefix(lang) + target for lang, target in zip(languages, targets)]
    hidden = cache.forward(_padded(sequences, skip, device), _starts(len(targets), skip, device))
    logits = _logits(model, hidden)  # [B, L, n_vocab]
    stats.calls += 1
    first = n_prefix - 1 - skip  # the position whose logits choose the first sampled token
    nlls = _nlls(logits, [target + [rules.eot] for target in targets], first)
    rules.suppress(logits, blank_at=first)
    greedy = logits[:, first:].argmax(-1).tolist()  # [B][j]: the choice after target[:j]
    del logits
    clips = []
    rows = []  # by cache row: the clip that decodes on, None where it has stopped
    for target, bound, choices in zip(targets, bounds, greedy):
        clip = _Clip(target + [rules.eot], bound, n_prefix)
        clips.append(clip)
        going = bound is not None and clip.follow(choices, rules.eot, stats)
        rows.append(clip if going else None)
    _decode_on(model, cache, rules, rows, draft_len, stats)
    return [Verified(tokens=clip.out, language=lang, nll=nll)
            for clip, lang, nll in zip(clips, languages, nlls)]


def _decode_on(model, cache, rules, rows, draft_len, stats):
    """Greedy decoding of the clips that left their text, each until it stops. rows: the clip of
    each cache row, None where it has stopped. One decoder call per step: each clip's last token
    and its draft; logits then only where they decide (the draft held up to there)."""
    device = cache.keys[0].device
    while any(rows):
        live = [row for row, clip in enumerate(rows) if clip is not None]
        if len(rows) - len(live) >= len(live):  # copying the live rows costs less than carrying
            cache.keep(live)
            rows = [rows[row] for row in live]
            live = list(range(len(rows)))
        fed = []
        positions = []
        for clip in rows:
            if clip is None:  # a stopped clip's row computes garbage until the cache drops it
                fed.append([0])
                positions.append(0)
            else:
                fed.append([clip.last] + clip.draft(draft_len))
                positions.append(clip.cached)
        positions = torch.tensor(positions, device=device)
        hidden = cache.forward(_padded(fed, 0, device), positions)  # [R, k, n_text_state]
        stats.calls += 1
        reading = live  # rows whose draft held up to position i
        for i in range(hidden.shape[1]):
            if not reading:
                break
            logits = _logits(model, hidden[reading, i][:, None])  # [r, 1, n_vocab]
            rules.suppress(logits, blank_at=None)
            choices = logits[:, 0].argmax(-1).tolist()
            held = []
            for row, choice in zip(reading, choices):
                if rows[row].take(i, choice, rules.eot, stats):
                    held.append(row)
            reading = held
        rows = [None if clip is None or clip.done else clip for clip in rows]


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

    def prefix(self, language) -> list[int]:
        """The SOT sequence (language, task, no timestamps) of `language`."""
        tokenizer = get_tokenizer(self.model.is_multilingual, language=language, task="transcribe",
                                  num_languages=self.model.num_languages)
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
        """In place on logits [R, L, n_vocab]: -inf at the tokens suppressed at every step, and at
        position blank_at (None: no position) at the first sampled position's too."""
        device = logits.device
        logits.index_fill_(-1, torch.tensor(self.always, device=device), -torch.inf)
        if blank_at is not None:
            logits[:, blank_at].index_fill_(-1, torch.tensor(self.first, device=device), -torch.inf)


class _Clip:
    """One clip's greedy decoding: its output so far, the draft source (target + EOT), how many
    leading positions of the cache hold its inputs (`cached`) and its last choice, not yet fed."""

    def __init__(self, source, bound, n_prefix):
        self.source = source
        self.bound = bound
        self.n_prefix = n_prefix
        self.out = []
        self.expected = 0  # where in `source` the output would go on, had it followed it
        self.cached = 0
        self.last = None
        self.drafted = []
        self.done = False

    def follow(self, choices, eot, stats) -> bool:
        """Walks the teacher-forced pass's choices (choices[j]: the greedy token after target[:j])
        while they are the target's; True if the clip must decode on."""
        for j, choice in enumerate(choices):
            stats.decided += 1
            stats.accepted += int(choice == self.source[j])
            if self._stops(choice, eot):
                return False
            if choice != self.source[j]:
                self.cached = self.n_prefix + j  # the SOT sequence and target[:j]
                self.last = choice
                self.expected = j + 1
                return True
        raise AssertionError("the target's EOT position is always a stop or a mismatch")

    def draft(self, draft_len) -> list[int]:
        """The source's tokens after a place where it has the output's last tokens (the longest
        such n-gram up to 3, the place nearest where the output would be), within the bound."""
        room = min(draft_len, self.bound - len(self.out) - 1)
        self.drafted = []
        for n in range(min(3, len(self.out)), 0, -1):
            tail = self.out[-n:]
            ends = [e for e in range(n - 1, len(self.source) - 1)
                    if self.source[e - n + 1:e + 1] == tail]
            if ends and room > 0:
                end = min(ends, key=lambda e: abs(e + 1 - self.expected))
                self.expected = end + 1
                self.drafted = self.source[end + 1:end + 1 + room]
                break
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
        self.cached += i + 1  # the last token and the draft's first i, taken
        self.last = choice
        self.expected += i + 1
        return False

    def _stops(self, choice, eot) -> bool:
        if choice == eot:
            return True
        self.out.append(choice)
        return len(self.out) == self.bound


class _Cache:
    """The decoder's keys and values for a batch: self-attention [R, slots, n_text_state] per layer,
    written in place at each token's position, and cross-attention [R, n_audio_ctx, n_text_state]
    per layer, computed once from the audio features."""

    def __init__(self, model, features, slots):
        self.decoder = model.decoder
        shape = (features.shape[0], slots, model.dims.n_text_state)
        self.keys = [features.new_zeros(shape) for _ in self.decoder.blocks]
        self.values = [features.new_zeros(shape) for _ in self.decoder.blocks]
        self.audio_keys = [block.cross_attn.key(features) for block in self.decoder.blocks]
        self.audio_values = [block.cross_attn.value(features) for block in self.decoder.blocks]

    def forward(self, tokens, start):
        """The decoder's last hidden states [R, k, n_text_state] of tokens [R, k], the first at
        position start [R] of its row (the cache holds every earlier position); their keys and
        values are written at their positions. Rows padded at the end compute garbage there."""
        decoder = self.decoder
        n_ctx = decoder.positional_embedding.shape[0]
        positions = start[:, None] + torch.arange(tokens.shape[1], device=start.device)  # [R, k]
        x = decoder.positional_embedding[positions.clamp(max=n_ctx - 1)]  # padding past n_ctx
        x = decoder.token_embedding(tokens) + x
        x = x.to(self.audio_keys[0].dtype)
        n_keys = int(positions.max()) + 1
        keys_at = torch.arange(n_keys, device=start.device)
        visible = keys_at <= positions[:, :, None]  # [R, k, n_keys]: causal, True where seen
        rows = torch.arange(tokens.shape[0], device=start.device)[:, None]
        for block, keys, values, audio_keys, audio_values in zip(
                decoder.blocks, self.keys, self.values, self.audio_keys, self.audio_values):
            h = block.attn_ln(x)
            keys[rows, positions] = block.attn.key(h)
            values[rows, positions] = block.attn.value(h)
            a = _attention(block.attn, h, keys[:, :n_keys], values[:, :n_keys], visible)
            x = x + block.attn.out(a)
            a = _attention(block.cross_attn, block.cross_attn_ln(x), audio_keys, audio_values, None)
            x = x + block.cross_attn.out(a)
            x = x + block.mlp(block.mlp_ln(x))
        return decoder.ln(x)

    def keep(self, rows):
        """Only these rows, in this order, from now on."""
        if rows == list(range(self.keys[0].shape[0])):
            return
        index = torch.tensor(rows, device=self.keys[0].device)
        for tensors in (self.keys, self.values, self.audio_keys, self.audio_values):
            tensors[:] = [t.index_select(0, index) for t in tensors]


def _attention(attention, h, keys, values, visible):
    """whisper.model.MultiHeadAttention's scaled-dot-product path on given keys and values: h [R, k,
    n_state] queries through attention.query; visible [R, k, S] bool, or None for all."""
    q = attention.query(h)
    heads = attention.n_head
    q = q.view(*q.shape[:2], heads, -1).transpose(1, 2)
    k = keys.view(*keys.shape[:2], heads, -1).transpose(1, 2)
    v = values.view(*values.shape[:2], heads, -1).transpose(1, 2)
    mask = None if visible is None else visible[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def _logits(model, hidden):
    """Float32 logits [R, k, n_vocab] of hidden states [R, k, n_text_state], as TextDecoder's."""
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
        tokens[row, :len(sequence) - skip] = torch.tensor(sequence[skip:])
    return tokens.to(device)


def _nlls(logits, answers, first) -> list[float]:
    """Mean cross-entropy per row of logits [B, L, n_vocab] against answers[b], the tokens due from
    position `first` on."""
    batch, length = logits.shape[:2]
    labels = torch.zeros(batch, length, dtype=torch.long)
    scored = torch.zeros(batch, length, dtype=torch.bool)  # [B, L]: True where a token is due
    for row, answer in enumerate(answers):
        labels[row, first:first + len(answer)] = torch.tensor(answer)
        scored[row, first:first + len(answer)] = True
    labels = labels.to(logits.device)
    scored = scored.to(logits.device)
    ce = torch.zeros(batch, length, device=logits.device)
    ce[scored] = F.cross_entropy(logits[scored], labels[scored], reduction="none")
    return (ce.sum(1) / scored.sum(1)).tolist()
