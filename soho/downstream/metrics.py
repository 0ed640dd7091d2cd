"""Downstream metrics: VQA soft accuracy, classification accuracy, retrieval recall@K.

Pure torch (plus the standard library): callers hand in tensors, these functions hand back Python floats.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

__all__ = [
    "normalize_vqa_answer",
    "vqa_answer_score",
    "vqa_soft_accuracy",
    "accuracy",
    "ranks_of_ground_truth",
    "recall_at_k",
    "retrieval_recalls",
]

# The VQA evaluation compares answers after a light normalisation (punctuation, number words, articles,
# a few contractions), so that "Two." and "2" count as the same answer.
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
    "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "im": "i'm",
    "ive": "i've", "youre": "you're", "thats": "that's", "whats": "what's", "hes": "he's", "shes": "she's",
}  # fmt: skip
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")
# A period is punctuation unless it sits inside a number ("2.5").
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
# A comma between digits is a thousands separator ("1,000" -> "1000"), not a word boundary.
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer the way the VQA evaluation does before comparing strings."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _DIGIT_COMMA.sub("", text)
    text = _PUNCT.sub(" ", text)
    text = _PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_answer_score(matches: int, num_annotators: int = 10) -> float:
    """Soft score of an answer given by `matches` of `num_annotators` humans.

    VQA counts an answer fully right when at least 3 humans gave it: acc = min(1, matches / 3), averaged
    over the `num_annotators` leave-one-out subsets of the annotators. With 10 annotators this gives
    0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, >=4 matches.
    """
    if num_annotators <= 0:
        raise ValueError(f"num_annotators must be positive, got {num_annotators}")
    if not 0 <= matches <= num_annotators:
        raise ValueError(f"matches={matches} must lie in [0, num_annotators={num_annotators}]")
    if num_annotators == 1:
        return min(1.0, matches / 3.0)
    # Leaving out one of the `matches` humans leaves matches-1; leaving out another leaves `matches`.
    left_out_match = matches * min(1.0, (matches - 1) / 3.0) if matches > 0 else 0.0
    left_out_other = (num_annotators - matches) * min(1.0, matches / 3.0)
    return (left_out_match + left_out_other) / num_annotators


def vqa_soft_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean VQA accuracy of predicted answer strings against each question's human answers (usually 10)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        raise ValueError("vqa_soft_accuracy needs at least one question")
    total = 0.0
    for pred, human in zip(predictions, answers, strict=True):
        if not human:
            raise ValueError(f"question with prediction {pred!r} has no human answers")
        norm = normalize_vqa_answer(pred)
        matches = sum(normalize_vqa_answer(a) == norm for a in human)
        total += vqa_answer_score(matches, len(human))
    return total / len(predictions)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label (NLVR2, SNLI-VE)."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} rows, labels {labels.shape[0]}")
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def ranks_of_ground_truth(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """0-based rank of the best-ranked positive in each row of a score matrix (higher score = better).

    scores (Q, N); positives (Q, N) bool with at least one True per row. A positive's rank counts the
    candidates scored strictly higher than it, so ties do not punish the ground truth (as with a stable
    sort that lists the positive first); use distinct scores when that matters.
    """
    if scores.shape != positives.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} differ")
    if not bool(positives.any(dim=1).all()):
        missing = (~positives.any(dim=1)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"rows without any positive (first: {missing})")
    neg_inf = torch.finfo(scores.dtype).min
    best_pos = torch.where(positives, scores, torch.full_like(scores, neg_inf)).amax(dim=1, keepdim=True)
    return (scores > best_pos).sum(dim=1)  # (Q,)


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@K in percent from 0-based ranks: the share of queries whose positive is in the top K."""
    if ranks.numel() == 0:
        raise ValueError("recall_at_k needs at least one query")
    return {int(k): 100.0 * (ranks < k).float().mean().item() for k in ks}


def retrieval_recalls(
    scores: torch.Tensor, image_of_text: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[int, float]]:
    """Recall@K in both directions from an (images, texts) score matrix.

    image_of_text (N_txt,) long: the image index each caption describes (an image may have several).
    "i2t" (text retrieval): each image queries all texts, any of its captions counts as a hit.
    "t2i" (image retrieval): each text queries all images, its own image is the hit.
    """
    n_img, n_txt = scores.shape
    if image_of_text.shape != (n_txt,):
        raise ValueError(f"image_of_text has shape {tuple(image_of_text.shape)}, expected ({n_txt},)")
    if n_txt and (int(image_of_text.min()) < 0 or int(image_of_text.max()) >= n_img):
        raise ValueError(f"image_of_text holds indices outside [0, {n_img})")
    # (N_img, N_txt): True where the caption describes the image
    pos = image_of_text.unsqueeze(0) == torch.arange(n_img, device=scores.device).unsqueeze(1)
    return {
        "i2t": recall_at_k(ranks_of_ground_truth(scores, pos), ks),
        "t2i": recall_at_k(ranks_of_ground_truth(scores.t(), pos.t()), ks),
    }
