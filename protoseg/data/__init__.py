"""Data layer: image reading, split files, layout readers, datasets, transforms, samplers,
synthetic data and the preparation of real datasets."""

from protoseg.data.datasets import (
    CITYSCAPES_LABEL_ID_TO_TRAIN_ID,
    LAYOUTS,
    Sample,
    SegmentationDataset,
    build_dataset,
)
from protoseg.data.io import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_PIXELS_ENV,
    image_size,
    max_image_pixels,
    open_image,
    read_rgb,
    to_rgb,
)
from protoseg.data.palette import colorize, save_mask_png, voc_palette
from protoseg.data.prepare import (
    CityscapesSummary,
    VocSummary,
    prepare_cityscapes,
    prepare_voc,
    read_sbd_mat,
)
from protoseg.data.sampling import (
    GlobalBatchSampler,
    build_eval_loader,
    build_train_loader,
    split_batch_sizes,
)
from protoseg.data.splits import DataError, make_split, read_split, split_list, write_split
from protoseg.data.synthetic import (
    DEFAULT_LABEL_COUNTS,
    DEFAULT_NUM_TRAIN,
    SYNTHETIC_CLASSES,
    generate_synthetic,
)
from protoseg.data.transforms import denormalize, eval_transform, train_transform

__all__ = [
    "CITYSCAPES_LABEL_ID_TO_TRAIN_ID",
    "CityscapesSummary",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DataError",
    "GlobalBatchSampler",
    "LAYOUTS",
    "MAX_PIXELS_ENV",
    "SYNTHETIC_CLASSES",
    "Sample",
    "VocSummary",
    "SegmentationDataset",
    "build_dataset",
    "build_eval_loader",
    "build_train_loader",
    "colorize",
    "denormalize",
    "eval_transform",
    "generate_synthetic",
    "image_size",
    "max_image_pixels",
    "open_image",
    "prepare_cityscapes",
    "prepare_voc",
    "read_rgb",
    "read_sbd_mat",
    "split_list",
    "to_rgb",
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
