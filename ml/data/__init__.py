"""Data for training and evaluation: the real cases and how to load them, synthetic and inserted
lesions, the perturbations that imitate other scanners, and synthetic chest pairs with a known
deformation for follow-up. Never imported by the service.
Imports `ml.image` and `ml.runtime`."""
