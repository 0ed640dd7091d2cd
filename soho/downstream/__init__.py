"""Downstream tasks on top of SOHO: VQA, NLVR2, SNLI-VE and image-text retrieval (paper §4).

Pure torch: heads, losses and metrics here; readers for the datasets' files live in
`data_pipeline.downstream`, fine-tuning and evaluation loops in `orchestration.finetune`.
"""

from soho.downstream.heads import ContrastiveProjection, MLPClassifier, info_nce_loss, vqa_bce_loss
from soho.downstream.metrics import (
    accuracy,
    normalize_vqa_answer,
    ranks_of_ground_truth,
    recall_at_k,
    retrieval_recalls,
    vqa_answer_score,
    vqa_soft_accuracy,
)
from soho.downstream.retrieval import (
    RetrievalResult,
    exhaustive_retrieval,
    prefilter_rerank_retrieval,
    score_pairs,
)

__all__ = [
    "ContrastiveProjection",
    "MLPClassifier",
    "info_nce_loss",
    "vqa_bce_loss",
    "accuracy",
    "normalize_vqa_answer",
    "ranks_of_ground_truth",
    "recall_at_k",
    "retrieval_recalls",
    "vqa_answer_score",
    "vqa_soft_accuracy",
    "RetrievalResult",
    "exhaustive_retrieval",
    "prefilter_rerank_retrieval",
    "score_pairs",
]
