"""VQA answer vocabulary and soft targets (the reference: the 3,129 most frequent answers)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from soho.downstream.metrics import normalize_vqa_answer, vqa_answer_score

__all__ = ["AnswerVocab"]


class AnswerVocab:
    """Normalised answer strings ↔ class indices, and the soft score targets of a question.

    Built from training answers: an answer enters when at least `min_count` humans gave it (over all
    questions), most frequent first, at most `max_answers`. Answers outside the vocabulary contribute no
    target, so the best reachable accuracy of a question can be below 1 (as in the reference).
    """

    def __init__(self, answers: Sequence[str]):
        if not answers:
            raise ValueError("AnswerVocab needs at least one answer")
        if len(set(answers)) != len(answers):
            raise ValueError("AnswerVocab answers must be unique")
        self.answers = list(answers)
        self.index = {a: i for i, a in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.answers)

    @classmethod
    def build(
        cls, human_answers: Iterable[Sequence[str]], min_count: int = 1, max_answers: int = 3129
    ) -> AnswerVocab:
        counts: Counter[str] = Counter()
        for answers in human_answers:
            counts.update(normalize_vqa_answer(a) for a in answers)
        kept = [a for a, c in sorted(counts.items(), key=lambda x: (-x[1], x[0])) if c >= min_count and a]
        if not kept:
            raise ValueError(f"no answer given at least {min_count} times")
        return cls(kept[:max_answers])

    def target_scores(self, human_answers: Sequence[str]) -> torch.Tensor:
        """(len(vocab),) float: each in-vocabulary answer's VQA score (0.3 per matching human, capped)."""
        target = torch.zeros(len(self.answers))
        counts = Counter(normalize_vqa_answer(a) for a in human_answers)
        for answer, c in counts.items():
            idx = self.index.get(answer)
            if idx is not None:
                target[idx] = vqa_answer_score(c, len(human_answers))
        return target

    def decode(self, indices: torch.Tensor) -> list[str]:
        return [self.answers[i] for i in indices.tolist()]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"answers": self.answers}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> AnswerVocab:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "answers" not in data:
            raise ValueError(f"{path}: expected {{'answers': [...]}}")
        return cls(data["answers"])
