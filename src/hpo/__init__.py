"""hpo: distributed hyperparameter optimisation of a DynamicCNN on Fashion-MNIST."""

__version__ = "0.1.0"
