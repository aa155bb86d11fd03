"""radai's Streamlit app for clinicians: login, worklist, viewer, review, audit and monitoring.

It may import `db` of ours (and `ml` for overlays); never `dicom_node`, `workers` or `radai`.
"""
