"""Data: image and mask reading, the benchmark transforms, segmentation datasets (VOC, ADE20K,
folder datasets with a dataset.yaml) and the image-classification sets used by kNN.

Masks are always read as raw class ids; every random draw of a transform is seeded by
(seed, epoch, image index), so a dataset gives the same samples on every run and rank.
"""
