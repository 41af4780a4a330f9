"""
Evaluation metrics of the CAV-MAE paper, with numpy, torch and scikit-learn (no metric scripts are downloaded).

- Classification: accuracy (single-label, VGGSound), mAP and mean ROC AUC over classes (multi-label, AudioSet), as
  the reference's `calculate_stats`; [`classification_metrics`] gives a `compute_metrics` for the `Trainer`.
- Retrieval: recall at 1, 5 and 10 and the median rank of the true pair, audio -> visual and visual -> audio,
  from L2-normalised embeddings by one matrix product ([`retrieval_metrics`]).
"""

import math
from statistics import NormalDist

import numpy as np
import torch

from .configuration_cav_mae import CavMaeConfigError

RECALL_AT = (1, 5, 10)


# ----------------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------------
def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().float().cpu().numpy()
    if isinstance(array, (tuple, list)) and array and not np.isscalar(array[0]):
        array = array[0]  # Trainer predictions may be a tuple (logits, ...)
    return np.asarray(array, dtype=np.float64)


def accuracy(scores, targets) -> float:
    """Share of clips whose highest score is at their (highest) target class: `argmax(scores) == argmax(targets)`.
    `targets` may be class indices `[N]` or (soft) one-hot / multi-hot `[N, C]`."""
    scores, targets = _as_numpy(scores), _as_numpy(targets)
    target_classes = targets.argmax(axis=1) if targets.ndim == 2 else targets.astype(np.int64)
    return float((scores.argmax(axis=1) == target_classes).mean())


def mean_average_precision(scores, targets) -> float:
    """Mean over classes of scikit-learn's average precision. Classes without a positive clip are left out (their AP
    is undefined). `targets` `[N, C]`, positive where >= 0.5."""
    from sklearn.metrics import average_precision_score

    scores, positives = _as_numpy(scores), _as_numpy(targets) >= 0.5
    values = [
        average_precision_score(positives[:, k], scores[:, k]) for k in range(scores.shape[1]) if positives[:, k].any()
    ]
    return float(np.mean(values)) if values else math.nan


def mean_auc(scores, targets) -> float:
    """Mean over classes of the ROC AUC; classes without both positive and negative clips are left out."""
    from sklearn.metrics import roc_auc_score

    scores, positives = _as_numpy(scores), _as_numpy(targets) >= 0.5
    values = [
        roc_auc_score(positives[:, k], scores[:, k])
        for k in range(scores.shape[1])
        if positives[:, k].any() and not positives[:, k].all()
    ]
    return float(np.mean(values)) if values else math.nan


def d_prime(auc: float) -> float:
    """The sensitivity index the reference reports beside the AUC: `sqrt(2) * Phi^-1(auc)`."""
    if not 0.0 < auc < 1.0:
        return math.nan
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def classification_metrics(problem_type: str = "single_label_classification"):
    """
    A `compute_metrics` for the `Trainer`. Scores are the logits (the metrics depend only on their order within a
    class or a clip, so logits and probabilities give the same values); with several frames per clip the
    classifier's logits are already those of the frame-averaged probabilities.

    - `"single_label_classification"`: `accuracy`.
    - `"multi_label_classification"`: `mAP`, `mAUC`, `d_prime` (and `accuracy`, as the reference prints it).
    """
    if problem_type not in ("single_label_classification", "multi_label_classification"):
        raise CavMaeConfigError(
            f"No classification metrics for problem_type={problem_type!r}: give 'single_label_classification' or "
            "'multi_label_classification'."
        )

    def compute_metrics(eval_prediction) -> dict[str, float]:
        scores, targets = eval_prediction.predictions, eval_prediction.label_ids
        results = {"accuracy": accuracy(scores, targets)}
        if problem_type == "multi_label_classification":
            results["mAP"] = mean_average_precision(scores, targets)
            results["mAUC"] = mean_auc(scores, targets)
            results["d_prime"] = d_prime(results["mAUC"])
        return results

    return compute_metrics


# ----------------------------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------------------------
def true_pair_ranks(query_embeds: torch.Tensor, target_embeds: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """
    Rank (1 = best) of each query's true pair (the target of the same index) among all targets, by cosine
    similarity. A rank counts the targets scoring strictly higher than the true pair, plus one (ties count in the
    pair's favour, as the reference's sort-based ranks). Queries go through in chunks of `chunk_size` rows of the
    similarity matrix.
    """
    if query_embeds.shape != target_embeds.shape:
        from .retrieval import RetrievalError  # here: retrieval.py imports the pipelines

        raise RetrievalError(
            f"Retrieval needs one target per query: got {tuple(query_embeds.shape)} and {tuple(target_embeds.shape)}."
        )
    queries = torch.nn.functional.normalize(torch.as_tensor(query_embeds).float(), dim=-1)
    targets = torch.nn.functional.normalize(torch.as_tensor(target_embeds).float(), dim=-1)
    ranks = []
    for start in range(0, len(queries), chunk_size):
        similarity = queries[start : start + chunk_size] @ targets.T
        rows = torch.arange(similarity.shape[0])
        true_scores = similarity[rows, rows + start]
        ranks.append((similarity > true_scores[:, None]).sum(dim=1) + 1)
    return torch.cat(ranks)


def recall_metrics(ranks: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """`R@1`, `R@5`, `R@10` (share of ranks <= k) and `median_rank` from the true-pair ranks."""
    ranks = torch.as_tensor(ranks).double()
    metrics = {f"{prefix}R@{k}": float((ranks <= k).double().mean()) for k in RECALL_AT}
    metrics[f"{prefix}median_rank"] = float(np.median(ranks.numpy()))
    return metrics


def retrieval_metrics(audio_embeds, visual_embeds) -> dict[str, float]:
    """
    Audio -> visual (`a2v_`) and visual -> audio (`v2a_`) retrieval metrics of paired embeddings `[N, D]` (clip i's
    audio belongs with clip i's frames), from cosine similarities: `R@1`, `R@5`, `R@10` and `median_rank`, plus
    `chance_R@1` (1 / N) for reference.
    """
    audio_embeds, visual_embeds = torch.as_tensor(audio_embeds), torch.as_tensor(visual_embeds)
    metrics = recall_metrics(true_pair_ranks(audio_embeds, visual_embeds), prefix="a2v_")
    metrics.update(recall_metrics(true_pair_ranks(visual_embeds, audio_embeds), prefix="v2a_"))
    metrics["chance_R@1"] = 1.0 / len(audio_embeds)
    return metrics


__all__ = [
    "accuracy",
    "classification_metrics",
    "d_prime",
    "mean_auc",
    "mean_average_precision",
    "recall_metrics",
    "retrieval_metrics",
    "true_pair_ranks",
]
