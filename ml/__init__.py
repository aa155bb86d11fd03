"""radai's image processing and models on numpy/torch arrays: preprocessing, networks, training,
metrics, saliency and measurements.

It imports nothing of ours and nothing of DICOM, Celery or the database: arrays and spacings in,
arrays and numbers out.
"""
