"""Offline image classification: a folder of images in, committed Parquet shards out."""

__version__ = "0.1.0"
