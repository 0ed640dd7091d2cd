"""The figures papers print, computed the way their benchmarks' own evaluations do, next to ours.

**VQA accuracy as the VQA evaluation server computes it** (written from the evaluation's published
description, not from its script). A predicted answer is normalised before it is compared:

1. newlines and tabs become spaces, the ends are stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted where the answer has it
   next to a space or where the answer holds a comma between two digits ("1,000" → "1000"), and becomes a
   space otherwise ("red-white" → "red white"); apostrophes, colons and the other signs (``% $ # & *``)
   stay;
3. a period is deleted unless a digit follows it (a decimal point stays: "2.5"; "2." → "2");
4. lower case; number words zero … ten (and "none") become digits; the articles a, an, the are dropped;
5. a contraction written without its apostrophe gets it back ("dont" → "don't", "couldntve" →
   "couldn't've"), except where the bare form is an English word of its own ("its", "well", "were", "hell",
   "shell", "ill", "id", "wed", "shed", "lets" stay as they are).

The human answers are compared as the annotation file has them (the VQA v2 release ships them
normalised), except that where the ten humans did not all give the same string, step 2's punctuation
handling is applied to them too. An answer's accuracy is ``min(#humans who gave it / 3, 1)`` averaged over
the 10 choose 9 subsets of the humans (each human left out once); ``overall`` is the mean over questions in
percent, as the server reports it, with ``perAnswerType`` ("yes/no", "number", "other") beside it when the
annotations carry answer types.

**Retrieval**: ``r_mean`` is the mean of the six recalls (image→text and text→image R@1/5/10, in %),
``rsum`` their sum (RSUM, in % points, as the retrieval papers print it).

Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "vqa_punctuation",
    "normalize_vqa_prediction",
    "vqa_official_score",
    "vqa_official_accuracy",
    "retrieval_summary",
    "RECALL_KEYS",
    "CONTRACTIONS",
]

_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})


def _contractions() -> dict[str, str]:
    """Every spelling of an English contraction that misses one or more of its apostrophes → the contraction.
    Built from the contractions themselves (below), so that each one also covers its half-written forms
    ("couldnt've", "couldn'tve" and "couldntve" for "couldn't've")."""
    words: list[str] = []
    words += ("ain't aren't can't couldn't didn't doesn't don't hadn't hasn't haven't isn't mightn't mustn't "
              "needn't shan't shouldn't wasn't weren't won't wouldn't").split()
    words += [f"{w}'ve" for w in ("could", "i", "might", "must", "should", "they", "we", "would", "you",
                                  "who", "what", "where", "there")]
    words += [f"{w}'ll" for w in ("he", "she", "it", "i", "they", "we", "you", "who", "that", "there",
                                  "what")]
    words += [f"{w}'d" for w in ("he", "she", "i", "they", "we", "you", "who", "it", "that", "there",
                                 "what", "where", "how")]
    words += [f"{w}'re" for w in ("they", "we", "you", "who", "what")]
    words += [f"{w}'s" for w in ("he", "she", "it", "that", "there", "what", "where", "who", "how", "here",
                                 "let", "somebody", "someone", "something", "everyone", "nobody")]
    words += ["i'm", "y'all", "ma'am", "o'clock"]
    words += [f"{w}n't've" for w in ("could", "should", "would", "might", "must")]
    words += [f"{w}'d've" for w in ("i", "he", "she", "it", "they", "we", "you", "who")]
    english = {"its", "well", "were", "hell", "shell", "ill", "id", "wed", "shed", "lets"}
    table: dict[str, str] = {}
    for word in words:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        for r in range(1, len(cuts) + 1):
            for drop in itertools.combinations(cuts, r):
                bare = "".join(ch for i, ch in enumerate(word) if i not in drop)
                if bare.replace("'", "") in english and "'" not in bare:
                    continue
                table.setdefault(bare, word)
    return table


CONTRACTIONS: dict[str, str] = _contractions()


def vqa_punctuation(text: str) -> str:
    """Step 2 and 3 of the normalisation (punctuation and periods)."""
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if p not in out:
            continue
        gone = delete or f"{p} " in text or f" {p}" in text
        out = out.replace(p, "" if gone else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_vqa_prediction(answer: str) -> str:
    """A predicted answer as the VQA evaluation compares it (steps 1-5 of the module doc)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    text = vqa_punctuation(text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_official_score(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy (0..1) of one predicted answer against the question's human answers (usually 10)."""
    if not human_answers:
        raise ValueError(f"prediction {prediction!r}: the question has no human answers to score against")
    pred = normalize_vqa_prediction(prediction)
    humans = [a.replace("\n", " ").replace("\t", " ").strip() for a in human_answers]
    if len(set(humans)) > 1:
        humans = [vqa_punctuation(a) for a in humans]
    same = [h == pred for h in humans]
    total = sum(same)
    # leave each human out once: the others that agree with the prediction count, capped at 3
    return sum(min(1.0, (total - s) / 3.0) for s in same) / len(humans)


def vqa_official_accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]],
                          answer_types: Sequence[str | None] | None = None) -> dict[str, object]:
    """``{"overall": %, "perAnswerType": {type: %}}`` (percent, as the evaluation server reports them; the
    per-type table only when ``answer_types`` are given)."""
    if len(predictions) != len(human_answers):
        raise ValueError(f"{len(predictions)} predictions for {len(human_answers)} questions")
    if not predictions:
        raise ValueError("vqa_official_accuracy needs at least one question")
    scores = [vqa_official_score(p, h) for p, h in zip(predictions, human_answers, strict=True)]
    out: dict[str, object] = {"overall": 100.0 * sum(scores) / len(scores)}
    if answer_types is not None and any(t for t in answer_types):
        if len(answer_types) != len(scores):
            raise ValueError(f"{len(answer_types)} answer types for {len(scores)} questions")
        by_type: dict[str, list[float]] = defaultdict(list)
        for t, s in zip(answer_types, scores, strict=True):
            by_type[t or "unknown"].append(s)
        out["perAnswerType"] = {t: 100.0 * sum(v) / len(v) for t, v in sorted(by_type.items())}
    return out


RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def retrieval_summary(recalls: Mapping[str, float]) -> dict[str, float]:
    """``{"r_mean", "rsum"}`` of the six recalls (percent) in ``recalls`` (``{"i2t_r1": 41.0, ...}``)."""
    missing = [k for k in RECALL_KEYS if k not in recalls]
    if missing:
        raise ValueError(f"retrieval_summary needs the six recalls {RECALL_KEYS}; missing {missing}")
    values: Iterable[float] = (float(recalls[k]) for k in RECALL_KEYS)
    rsum = sum(values)
    return {"r_mean": rsum / len(RECALL_KEYS), "rsum": rsum}
