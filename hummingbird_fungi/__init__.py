"""hummingbird-fungi: in-context dense retrieval segmentation with FUNGI features."""

__version__ = "0.1.0"
