"""What a worker runs: the networks, the model registry (weights, cards, checksums), inference
with its lesion-call candidates and Grad-CAM, the per-nodule malignancy score (the LIDC readers'
impression, `malignancy`), input QA, triage (suspicion score to priority), the saliency map of
the baseline and the CAD (`saliency`: each lesion painted with its score), the nodule CAD and its
second stage (`cad`, `cad_rerank`) and follow-up (nodules
matched to the prior study, growth, doubling time, growth triage).
The only part of `ml/` that `workers/` imports. Imports `ml.image` and `ml.runtime` only."""
