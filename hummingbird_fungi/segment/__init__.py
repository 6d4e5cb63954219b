"""In-context segmentation for users: `InContextSegmenter` (a few annotated examples or a saved bank
-> masks of new images), folder runs with reports, visualisation, and the synthetic demo scenes.
"""
