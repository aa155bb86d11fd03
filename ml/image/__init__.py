"""Image operations on numpy arrays in (z, y, x) order with physical spacing: windowing and
normalisation, resampling, morphology, lung segmentation, and the shape measurements that reproduce
pyradiomics. The bottom layer of `ml/`: imports nothing of ours outside `ml.image`."""
