"""Image operations on numpy arrays in (z, y, x) order with physical spacing: windowing and
normalisation, resampling, morphology, lung segmentation, the shape measurements that reproduce
pyradiomics, and the registration of a prior study onto the current one. The bottom layer of
`ml/`: imports nothing of ours outside `ml.image`."""
