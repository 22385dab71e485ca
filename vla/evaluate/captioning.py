"""Captioning metrics: BLEU-4 and CIDEr-D against all references, pure Python.

Both reproduce the COCO caption evaluation code (pycocoevalcap's `Bleu(4)`, the CIDEr authors'
`CiderD`) on text tokenised PTB-style: lowercased, clitics split, punctuation tokens dropped.
pycocoevalcap runs Stanford's Java PTBTokenizer; `ptb_tokenize` is a regex approximation of it
that agrees on ordinary captions (words, hyphenated words, numbers, 's / n't, punctuation).

BLEU-4 (corpus level). Over all candidates, clipped n-gram matches m_n = Σ_cand Σ_g
min(count_cand(g), max_ref count_ref(g)) and guesses g_n = Σ_cand max(0, len − n + 1);
BLEU = BP · Π_{n=1..4} ((m_n + 1e-15) / (g_n + 1e-9))^{1/4}, BP = exp(1 − r/c) if c < r else 1,
c = total candidate length, r = Σ of each candidate's closest reference length (ties → shorter).
The 1e-15 / 1e-9 are pycocoevalcap's guards, so a perfect match scores 1 − O(1e-9).

CIDEr-D. Per image i with candidate c and references S_i: n-gram vectors g^n(x) with
g_k = tf_k(x) · (log|I| − log max(1, df_k)), df_k = #images whose references contain n-gram k;
sim_n(c, s) = Σ_k min(g_k(c), g_k(s)) · g_k(s) / (‖g^n(c)‖‖g^n(s)‖) · exp(−(l_c − l_s)² / (2σ²)),
σ = 6; CIDEr-D_i = 10 · mean_{n=1..4} mean_{s∈S_i} sim_n(c, s); the score is the mean over images.
The length l is the number of bigrams, as the reference code counts it (word count − 1, so the
penalty is the word-length one for any caption of ≥ 1 word).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

MAX_N = 4
CIDER_SIGMA = 6.0

# pycocoevalcap's PUNCTUATIONS, plus the raw quotes/brackets that PTB turns into ``, '', -LRB-, ...
_DROP = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
         "--", "...", ";", '"', "(", ")", "[", "]", "{", "}"}
_CLITIC = re.compile(r"(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[^\W_]+(?:[-./'][^\W_]+)*|\.\.\.|--|\S")


def ptb_tokenize(text: str) -> list[str]:
    """Lowercase, split PTB-style ("man's" → man 's, "don't" → do n't), drop punctuation."""
    text = _CLITIC.sub(r" \1", text.lower().replace("\n", " "))
    return [t for t in _TOKEN.findall(text) if t not in _DROP]


def _ngrams(words: Sequence[str], n: int = MAX_N) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                   for i in range(len(words) - k + 1))


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every candidate needs at least one reference")


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]],
         n: int = MAX_N) -> float:
    """Corpus BLEU-n with pycocoevalcap's 'closest' reference length (see the module doc)."""
    _check(candidates, references)
    matches, guesses = [0] * n, [0] * n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        words = ptb_tokenize(cand)
        ref_words = [ptb_tokenize(r) for r in refs]
        max_ref = Counter()
        for r in ref_words:
            max_ref |= _ngrams(r, n)  # `|` keeps the max count per n-gram
        for gram, count in _ngrams(words, n).items():
            matches[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(n):
            guesses[k] += max(0, len(words) - k)
        cand_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
    score = math.prod((m + 1e-15) / (g + 1e-9) for m, g in zip(matches, guesses)) ** (1.0 / n)
    ratio = (cand_len + 1e-15) / (ref_len + 1e-9)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def _tfidf(counts: Counter, df: Counter, log_n_images: float):
    """Per n-gram order {ngram: tf·idf} and its L2 norm; the bigram count (CIDEr-D's length)."""
    vec: list[dict] = [{} for _ in range(MAX_N)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * (log_n_images - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(v * v for v in vn.values())) for vn in vec]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, norms, length


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]],
            sigma: float = CIDER_SIGMA) -> float:
    """CIDEr-D with document frequencies from these references (see the module doc)."""
    _check(candidates, references)
    cand_counts = [_ngrams(ptb_tokenize(c)) for c in candidates]
    ref_counts = [[_ngrams(ptb_tokenize(r)) for r in refs] for refs in references]
    df = Counter(gram for refs in ref_counts for gram in set().union(*refs))
    log_n = math.log(float(len(candidates)))
    total = 0.0
    for cand, refs in zip(cand_counts, ref_counts):
        vec_c, norm_c, len_c = _tfidf(cand, df, log_n)
        per_order = [0.0] * MAX_N
        for ref in refs:
            vec_r, norm_r, len_r = _tfidf(ref, df, log_n)
            penalty = math.exp(-((len_c - len_r) ** 2) / (2 * sigma ** 2))
            for k in range(MAX_N):
                # clipping: a candidate n-gram earns at most the reference's own weight
                dot = sum(min(v, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0)
                          for g, v in vec_c[k].items())
                if norm_c[k] != 0 and norm_r[k] != 0:
                    dot /= norm_c[k] * norm_r[k]
                per_order[k] += dot * penalty
        total += 10.0 * sum(per_order) / MAX_N / len(refs)
    return total / len(candidates)


def captioning_metrics(candidates: Sequence[str],
                       references: Sequence[Sequence[str]]) -> dict[str, float]:
    """`bleu4` and `cider_d` of one generated caption per image against all its references."""
    return {"bleu4": bleu(candidates, references), "cider_d": cider_d(candidates, references)}
