"""What a worker runs: the networks, the model registry (weights, cards, checksums), inference
with its lesion-call candidates and Grad-CAM, the per-nodule malignancy score (the LIDC readers'
impression, `malignancy`), input QA, and triage (suspicion score to priority).
The only part of `ml/` that `workers/` imports. Imports `ml.image` and `ml.runtime` only."""
