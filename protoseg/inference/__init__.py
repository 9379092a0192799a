"""Inference below the engine and the analyses: the core, evaluation, model files, Predictor."""

from protoseg.inference.core import infer_logits
from protoseg.inference.metrics import (
    ConfusionMatrix,
    EvalResult,
    evaluate,
    format_table,
    save_result,
)
from protoseg.inference.model_file import ModelFile, model_payload, read_model_file
from protoseg.inference.predictor import Predictor, load

__all__ = [
    "ConfusionMatrix",
    "EvalResult",
    "ModelFile",
    "Predictor",
    "evaluate",
    "format_table",
    "infer_logits",
    "load",
    "model_payload",
    "read_model_file",
    "save_result",
]
