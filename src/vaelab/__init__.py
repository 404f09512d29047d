"""vaelab: a reproducible DVC + MLflow pipeline for the variational autoencoder of the Keras tutorial."""

__version__ = "0.1.0"
