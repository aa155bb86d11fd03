"""Data for training and evaluation: the real cases and how to load them, synthetic and inserted
lesions, and the perturbations that imitate other scanners. Never imported by the service.
Imports `ml.image` and `ml.runtime`."""
