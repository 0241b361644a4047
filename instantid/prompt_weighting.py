"""The official demo's long-prompt weighting (``LongPromptWeight`` in ``pipeline_stable_diffusion_xl_instantid_full.py``,
itself from diffusers' community ``lpw_stable_diffusion_xl``), reproduced step for step:

- parsing: ``(text)`` x1.1, ``[text]`` /1.1, ``(text:1.3)``, backslash escapes, ``BREAK`` (which, as there,
  becomes the literal word "BREAK" with weight -1), runs of equal weight merged;
- each piece tokenised by the FIRST tokenizer without start/end tokens; the prompt and the negative prompt are
  padded with the end token to the same length, then cut into 75-token chunks, each wrapped in start/end tokens
  (the last chunk is not padded: a short prompt is a short sequence, not 77 tokens);
- the same ids go to both text encoders (penultimate hidden states, concatenated); the pooled embedding is the
  second encoder's of the LAST chunk;
- a weight w != 1 moves a token's embedding away from the chunk's last (end-token) embedding:
  ``e_last + (e - e_last) * w``, with w rounded to float16 as the reference does.

Start and end ids are the tokenizer's own (the reference hard-codes CLIP's 49406/49407, which they are for every
SDXL tokenizer). The reference cannot take a missing negative prompt; here it is the empty string.
"""

from __future__ import annotations

import re

import torch

from . import defaults

MODES = defaults.PROMPT_WEIGHTINGS
DEFAULT = defaults.PROMPT_WEIGHTING
CHUNK = 75  # tokens between the start and end token of one text-encoder pass

_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_weighted_prompt(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces, as the reference's ``parse_prompt_attention``."""
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    pieces.append(["BREAK", -1])
                pieces.append([part, 1.0])
    for start in round_open:  # unclosed brackets still weigh, in the order they opened
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    if not pieces:
        pieces = [["", 1.0]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def weighted_tokens(tokenizer, prompt: str) -> tuple[list[int], list[float]]:
    """Token ids (no start/end) and one weight per token, for a prompt of any length."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_weighted_prompt(prompt):
        piece_ids = tokenizer(piece, truncation=False).input_ids[1:-1]
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    return ids, weights


def chunk_tokens(ids: list[int], weights: list[float], bos: int, eos: int):
    """75-token chunks wrapped in start/end (weight 1); a final, possibly empty, unpadded chunk always follows."""
    chunks = []
    full = len(ids) // CHUNK
    for k in range(full + 1):
        part = slice(k * CHUNK, (k + 1) * CHUNK)
        chunks.append(([bos, *ids[part], eos], [1.0, *weights[part], 1.0]))
    return chunks


def _encode_chunk(pipe, ids: list[int], weights: list[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    hidden = []
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        out = encoder(tokens, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    pooled = out[0]  # the second encoder's projected pooled output
    embeds = torch.cat(hidden, dim=-1)[0]
    w16 = torch.tensor(weights, dtype=torch.float16, device=device)
    weighted = w16 != 1.0
    if weighted.any():
        last = embeds[-1]
        scaled = last + (embeds - last) * w16.to(embeds.dtype)[:, None]
        embeds = torch.where(weighted[:, None], scaled, embeds)
    return embeds[None], pooled


def encode_weighted_prompt(pipe, prompt: str, negative_prompt: str | None, device):
    """(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled), each with batch 1, as the reference."""
    tokenizer = pipe.tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids, weights = weighted_tokens(tokenizer, prompt)
    neg_ids, neg_weights = weighted_tokens(tokenizer, negative_prompt or "")
    pad = len(ids) - len(neg_ids)  # the shorter one is padded with the end token
    if pad > 0:
        neg_ids, neg_weights = neg_ids + [eos] * pad, neg_weights + [1.0] * pad
    else:
        ids, weights = ids + [eos] * -pad, weights + [1.0] * -pad
    results = []
    for token_ids, token_weights in ((ids, weights), (neg_ids, neg_weights)):
        embeds, pooled = [], None
        for chunk_ids, chunk_weights in chunk_tokens(token_ids, token_weights, bos, eos):
            e, pooled = _encode_chunk(pipe, chunk_ids, chunk_weights, device)
            embeds.append(e)
        results.append((torch.cat(embeds, dim=1), pooled))
    (pos, pos_pooled), (neg, neg_pooled) = results
    return pos, neg, pos_pooled, neg_pooled
