"""Data layer: split files, layout readers, datasets, transforms, samplers, synthetic data."""

from protoseg.data.datasets import (
    CITYSCAPES_LABEL_ID_TO_TRAIN_ID,
    LAYOUTS,
    Sample,
    SegmentationDataset,
    build_dataset,
)
from protoseg.data.palette import colorize, save_mask_png, voc_palette
from protoseg.data.sampling import (
    GlobalBatchSampler,
    build_eval_loader,
    build_train_loader,
    split_batch_sizes,
)
from protoseg.data.splits import DataError, make_split, read_split, write_split
from protoseg.data.synthetic import (
    DEFAULT_LABEL_COUNTS,
    DEFAULT_NUM_TRAIN,
    SYNTHETIC_CLASSES,
    generate_synthetic,
)
from protoseg.data.transforms import denormalize, eval_transform, train_transform

__all__ = [
    "CITYSCAPES_LABEL_ID_TO_TRAIN_ID",
    "DataError",
    "GlobalBatchSampler",
    "LAYOUTS",
    "SYNTHETIC_CLASSES",
    "Sample",
    "SegmentationDataset",
    "build_dataset",
    "build_eval_loader",
    "build_train_loader",
    "colorize",
    "denormalize",
    "eval_transform",
    "generate_synthetic",
    "DEFAULT_LABEL_COUNTS",
    "DEFAULT_NUM_TRAIN",
    "make_split",
    "read_split",
    "save_mask_png",
    "split_batch_sizes",
    "train_transform",
    "voc_palette",
    "write_split",
]
