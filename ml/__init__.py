"""radai's image processing and models on numpy/torch arrays, by lifecycle:

- `ml.image`: image operations (windowing, resampling, morphology, lungs, measurements);
- `ml.runtime`: what a worker runs (networks, registry, inference, QA, triage, malignancy,
  follow-up, and `ml.runtime.baseline`, the classical pipeline: a peer of the models that a site
  can run instead, `RADAI_PIPELINE=baseline`);
- `ml.data`: real cases, synthetic lesions, perturbations (training and evaluation only);
- `ml.evaluation`: metrics, the held-out evaluation and its report;
- `ml.training`: training the networks.

Each layer imports only those above it in this list (checked by import-linter in
`scripts/test.sh`). It imports nothing of ours outside `ml/` and nothing of DICOM, Celery or the
database: arrays and spacings in, arrays and numbers out.
"""
