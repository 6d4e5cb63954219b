"""Data: image and mask reading, the benchmark transforms, segmentation datasets (VOC, ADE20K,
Cityscapes, COCO-Stuff/Things, folder datasets with a dataset.yaml, any torch Dataset), roots inside
tar archives, seeded subsets and file sets, and the image-classification sets used by kNN.

Masks are always read as raw class ids; every random draw of a transform is seeded by
(seed, epoch, image index), so a dataset gives the same samples on every run and rank. Importing
the package registers every segmentation dataset kind (COCO and Cityscapes from their modules).
"""

from hummingbird_fungi.data import cityscapes, coco  # noqa: F401  (they register their dataset kinds)
