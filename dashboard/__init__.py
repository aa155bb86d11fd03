"""radai's Streamlit app for clinicians: login, worklist, viewer, review, audit and monitoring.

It may import `db` and `dicom_io` of ours (and `ml` for overlays); never `dicom_node`, `workers`
or `radai`.
`app` is the Streamlit entry point (`streamlit run dashboard/app.py`), `store` its reads and
writes in `db` terms, `imaging` the CT volume, SEG and saliency overlays in numpy.
"""
