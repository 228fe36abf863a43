"""digitflow: an MNIST CNN that ingests, validates, trains, tracks and promotes itself."""

__version__ = "0.1.0"
