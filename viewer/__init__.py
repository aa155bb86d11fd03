"""The OHIF viewer served beside radai's DICOMweb: the published `@ohif/app` build (MIT, fetched
at setup time by `scripts/fetch_ohif.sh` into `var/ohif/`, never at run time) as static files on
the DICOMweb port, same origin as `/dicomweb`, so the browser needs no CORS and OHIF's
`?token=` hands the dashboard user's bearer token to every DICOMweb request. radai writes
`app-config.js` itself (one data source: this server's `/dicomweb`). Imports nothing of ours.
"""
