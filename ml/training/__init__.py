"""Training: the segmentation U-Net (`segmenter`), the screening CNN (`screener`), the per-nodule
malignancy CNN on the LIDC readers' ratings (`malignancy`) and their shared progress log; on real
data, the composited-study source (`real_samples`) and the runs that train and register both
networks on it (`real_training`). Used by `radai train` only. Imports `ml.image`, `ml.runtime`,
`ml.data`, `ml.runtime.baseline` and `ml.evaluation.metrics`."""
