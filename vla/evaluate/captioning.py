"""Captioning metrics: BLEU-4 and CIDEr-D against all references, exactly as pycocoevalcap.

pycocoevalcap's pipeline is `PTBTokenizer().tokenize` (Stanford CoreNLP 3.4.1's Java
PTBTokenizer with ``-preserveLines -lowerCase``, then its PUNCTUATIONS tokens dropped) followed
by `Bleu(4)` and `Cider` (CIDEr-D) on the space-joined tokens. `tokenize_captions` runs that very
tokenizer — the jar pycocoevalcap ships, through ``java`` — whenever both are present
(``tokenizer="auto"``, the default, or ``"java"`` to insist), so `vla eval`'s numbers equal
pycocoevalcap's pipeline (tested end to end on captions with brackets, ``3:30``, ``1,000``,
``u.s.``, ``cannot``, ``gonna``). Without java, ``"python"``: `ptb_tokenize`, a re-implementation
of the PTBTokenizer rules captions exercise (lowercasing; brackets as -lrb-/-rrb-/-lsb-/-rsb-/
-lcb-/-rcb-, which pycocoevalcap keeps, since its list holds only the upper-case forms; clitics
's n't 're 've 'll 'd 'm; cannot/gonna/gotta/wanna/lemme/gimme/'tis split; numbers with , . : / -
kept whole; letter-period abbreviations and common ones like mr. etc. vs. kept; $ % # + = & split;
quotes and PUNCTUATIONS dropped). Its stated difference: rules beyond those — Stanford's full
abbreviation lists and their context (``no. 3`` keeps the period, a final ``no.`` loses it),
number+unit splits (``10:00am`` → ``10:00 am`` but ``10am`` whole), ``#tag``/``@user``, SGML,
Unicode punctuation — are not reproduced, so a caption using them can tokenise differently
(tests pin agreement on the tricky captions and one such difference).

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
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Sequence

from vla.errors import UserError

MAX_N = 4
CIDER_SIGMA = 6.0
TOKENIZERS = ("auto", "java", "python")

# pycocoevalcap's PUNCTUATIONS, compared after lowercasing as it compares them (so "-lrb-" stays)
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# whole words PTB splits in two (PTBLexer's "cannot", "gonna", ...)
_SPLIT_WORDS = re.compile(r"(?<![\w'])(can)(not)(?!\w)|(?<![\w'])(gon|wan|got)(na|ta)(?!\w)|"
                          r"(?<![\w'])(lem|gim)(me)(?!\w)|(?<![\w])('t)(is|was)(?!\w)|(?<![\w'])(y')(all|know)(?!\w)")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "mt", "jr", "sr", "prof", "etc", "vs", "inc", "co",
                  "corp", "ltd", "jan", "feb", "mar", "apr", "aug", "sept", "sep", "oct", "nov", "dec",
                  "fig", "ave", "calif", "gen", "gov", "sen", "rep", "col", "lt", "sgt", "capt", "messrs"}
_CLITIC = r"n't|'(?:s|re|ve|ll|d|m)(?![a-z0-9])"
_TOKEN = re.compile(
    r"(?:https?://|www\.)\S+"                           # URLs whole
    r"|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"                    # e-mail addresses whole
    rf"|{_CLITIC}|'(?:t|em|cause|n'|\d0s)(?![a-z])"     # clitics, 't (of 'tis), 'em, '90s
    rf"|(?:{'|'.join(sorted(_ABBREVIATIONS))})\.(?![a-z])"  # mr.  etc.  vs.
    r"|(?:[a-z]\.){2,}|[a-z]\.$|y'(?![a-z])"                        # u.s.  e.g.  p.m.  and a lone "a."
    r"|\d+(?:[,.:/-]\d+)+(?:-[^\W_]+)*|[,.]\d+"      # 3:30  1,000  3.5  1/2  2007-08  .5
    r"|[^\W_][\w\u0300-\u036f]*(?:[-/'.][^\W_][\w\u0300-\u036f]*)*"  # words: co-op  x-ray  a/b  o'clock  u.s
    r"|\.\.\.|--|[?!]+|\S"                              # ...  --  ?!  and any other one character
)


def ptb_tokenize(text: str) -> list[str]:
    """The pure-Python PTBTokenizer (see the module docstring): lowercased tokens, punctuation
    dropped as pycocoevalcap drops it ("man's" → man 's, "cannot" → can not, "(a dog)" → -lrb- a
    dog -rrb-)."""
    text = text.lower().replace("\n", " ")
    text = _SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), text)
    text = re.sub(rf"(?<=[a-z0-9])({_CLITIC})", r" \1", text)  # "ca n't", "man 's"
    text = re.sub(r"(?<=s)'(?=\s|$)", " '", text)  # "dogs' toys": the apostrophe alone
    tokens = (_BRACKETS.get(t, t) for chunk in text.split() for t in _TOKEN.findall(chunk))
    return [t for t in tokens if t not in PUNCTUATIONS and t != '"']


def java_tokenizer() -> tuple[str, Path] | None:
    """(java, pycocoevalcap's Stanford CoreNLP jar) when both are installed, else None."""
    import importlib.util

    java = shutil.which("java")
    spec = importlib.util.find_spec("pycocoevalcap")
    if java is None or spec is None or spec.submodule_search_locations is None:
        return None
    jar = Path(list(spec.submodule_search_locations)[0]) / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    return (java, jar) if jar.is_file() else None


def java_ptb_tokenize(texts: Sequence[str]) -> list[list[str]]:
    """pycocoevalcap's `PTBTokenizer.tokenize`, one call for all texts: the same jar, class and
    flags, one line per text, its PUNCTUATIONS dropped. UserError when java or the jar is missing."""
    found = java_tokenizer()
    if found is None:
        raise UserError("captioning tokenizer java: needs java on PATH and pycocoevalcap installed "
                        "(make install does both); or set the tokenizer to python")
    if not texts:
        return []
    java, jar = found
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_bytes("\n".join(t.replace("\n", " ") for t in texts).encode())
        proc = subprocess.run([java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", str(path)], capture_output=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"java PTBTokenizer failed ({proc.stderr.decode(errors='replace').strip()[-200:]}); "
                        "set the captioning tokenizer to python")
    lines = proc.stdout.decode().split("\n")[: len(texts)]
    if len(lines) != len(texts):
        raise UserError(f"java PTBTokenizer returned {len(lines)} lines for {len(texts)} captions")
    return [[w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS and w] for line in lines]


def resolve_tokenizer(tokenizer: str = "auto") -> str:
    """``java`` or ``python``: what ``auto`` means on this machine (java when it is there)."""
    if tokenizer not in TOKENIZERS:
        raise UserError(f"captioning tokenizer {tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    if tokenizer == "auto":
        return "java" if java_tokenizer() is not None else "python"
    return tokenizer


def tokenize_captions(texts: Sequence[str], tokenizer: str = "auto") -> list[list[str]]:
    """Every text's PTB tokens, by the java tokenizer or `ptb_tokenize` (`resolve_tokenizer`)."""
    if resolve_tokenizer(tokenizer) == "java":
        return java_ptb_tokenize(texts)
    return [ptb_tokenize(t) for t in texts]

def _ngrams(words: Sequence[str], n: int = MAX_N) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                   for i in range(len(words) - k + 1))


def _check(candidates: Sequence, references: Sequence[Sequence]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every candidate needs at least one reference")


def _tokenized(candidates: Sequence[str], references: Sequence[Sequence[str]],
               tokenizer: str) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Candidates' and references' tokens from ONE tokenizer call (one JVM for java)."""
    _check(candidates, references)
    flat = list(candidates) + [r for refs in references for r in refs]
    tokens = tokenize_captions(flat, tokenizer)
    cands, rest = tokens[: len(candidates)], iter(tokens[len(candidates):])
    return cands, [[next(rest) for _ in refs] for refs in references]


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]],
         n: int = MAX_N, tokenizer: str = "auto") -> float:
    """Corpus BLEU-n with pycocoevalcap's 'closest' reference length (see the module doc)."""
    return bleu_tokens(*_tokenized(candidates, references, tokenizer), n=n)


def bleu_tokens(candidates: Sequence[list[str]], references: Sequence[Sequence[list[str]]],
                n: int = MAX_N) -> float:
    """`bleu` on tokenised text."""
    _check(candidates, references)
    matches, guesses = [0] * n, [0] * n
    cand_len = ref_len = 0
    for words, ref_words in zip(candidates, references):
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
            sigma: float = CIDER_SIGMA, tokenizer: str = "auto") -> float:
    """CIDEr-D with document frequencies from these references (see the module doc)."""
    return cider_d_tokens(*_tokenized(candidates, references, tokenizer), sigma=sigma)


def cider_d_tokens(candidates: Sequence[list[str]], references: Sequence[Sequence[list[str]]],
                   sigma: float = CIDER_SIGMA) -> float:
    """`cider_d` on tokenised text."""
    _check(candidates, references)
    cand_counts = [_ngrams(c) for c in candidates]
    ref_counts = [[_ngrams(r) for r in refs] for refs in references]
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


def captioning_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]],
                       tokenizer: str = "auto") -> dict[str, float]:
    """`bleu4` and `cider_d` of one generated caption per image against all its references,
    the text tokenised once (`tokenize_captions`)."""
    cands, refs = _tokenized(candidates, references, tokenizer)
    return {"bleu4": bleu_tokens(cands, refs), "cider_d": cider_d_tokens(cands, refs)}
