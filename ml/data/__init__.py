"""Data for training and evaluation: the real cases and how to load them (`cases`, `backgrounds`,
`nodules`), drawn synthetic lesions (`synth`), real LIDC nodules inserted into real lungs
(`compose`), splits by patient and by anatomy (`splits`, with the committed `lidc_split.json`), the
perturbations and augmentations that imitate other scanners (`perturb`, `scanner_aug`), and
synthetic chest pairs with a known deformation for follow-up (`chest_phantom`). Never imported by
the service. Imports `ml.image` and `ml.runtime`."""
