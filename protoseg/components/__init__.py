"""Parts that methods assemble: losses, EMA teacher, pseudo-labels, augmentation, prototypes.

None of them holds a training loop; a method's module reads top to bottom by calling them.
"""

from protoseg.components.augment import (
    PARTNERS,
    STRONG_AUGMENTATIONS,
    box_masks,
    partner_of,
    strong_augment,
)
from protoseg.components.contrast import ClassQueues, ContrastConfig, contrastive_loss
from protoseg.components.feature_dropout import (
    FeatureTransform,
    FeatureTransformNetwork,
    complementary_channel_masks,
    complementary_dropout,
    require_feature_transform,
    takes_feature_transform,
)
from protoseg.components.losses import (
    SegmentationLoss,
    SupervisedObjective,
    masked_cross_entropy,
)
from protoseg.components.photometric import PhotometricAugment
from protoseg.components.prototype_branch import (
    PROTOTYPE_HEAD,
    PrototypeBranch,
    PrototypeConfig,
    PrototypeInputs,
    PrototypePlugIn,
    build_prototype_head,
)
from protoseg.components.prototypes import PrototypeBank, PrototypeSegmenter
from protoseg.components.pseudo_label import (
    SelfTrainingSettings,
    check_strong_augmentation,
    confident,
    confident_fraction,
    hard_labels,
    valid_pixels,
)
from protoseg.components.reliability import (
    above_percentile,
    below_percentile,
    percentile,
    pixel_entropy,
    reliable_cross_entropy,
)
from protoseg.components.teacher import EMATeacher, TeacherSettings
from protoseg.components.weak_strong import (
    WeakToStrongSettings,
    cutmix_boxes,
    eval_pass_labels,
    strong_view,
)
from protoseg.lifecycle import InitContext

__all__ = [
    "PARTNERS",
    "PROTOTYPE_HEAD",
    "STRONG_AUGMENTATIONS",
    "ClassQueues",
    "ContrastConfig",
    "EMATeacher",
    "FeatureTransform",
    "FeatureTransformNetwork",
    "InitContext",
    "PhotometricAugment",
    "PrototypeBank",
    "PrototypeBranch",
    "PrototypeConfig",
    "PrototypeInputs",
    "PrototypePlugIn",
    "PrototypeSegmenter",
    "SegmentationLoss",
    "SelfTrainingSettings",
    "SupervisedObjective",
    "TeacherSettings",
    "WeakToStrongSettings",
    "above_percentile",
    "below_percentile",
    "box_masks",
    "build_prototype_head",
    "check_strong_augmentation",
    "complementary_channel_masks",
    "complementary_dropout",
    "confident",
    "confident_fraction",
    "contrastive_loss",
    "cutmix_boxes",
    "eval_pass_labels",
    "hard_labels",
    "masked_cross_entropy",
    "partner_of",
    "percentile",
    "pixel_entropy",
    "reliable_cross_entropy",
    "require_feature_transform",
    "strong_augment",
    "strong_view",
    "takes_feature_transform",
    "valid_pixels",
]
