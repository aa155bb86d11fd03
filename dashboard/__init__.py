"""radai's Streamlit app for clinicians: login, worklist, viewer, review, audit and monitoring.

It may import `db` and `dicom_io` of ours (and `ml` for overlays); never `dicom_node`, `workers`
or `radai`.
`server` is what `radai dashboard` serves (`st.App` running `app` behind `access`'s guard of
`/media/` and internal endpoints), `app` the Streamlit main script (session check, then
`st.navigation` over the role's pages in `views/`), `session` login, logout and expiry,
`resources` the cached engine, series and overlays, `store` the reads and writes in `db` terms
with the role checks (`store.PERMISSIONS`), `imaging` the CT volume, SEG and saliency overlays
in numpy, `comparison` the prior-and-current pairing of nodules and slices (the study page's
"Compare with prior", `views/compare.py`).
"""
