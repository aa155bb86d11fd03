"""Integration tests: a real node on a real socket with dcmtk as the outside client, real databases
(SQLite and PostgreSQL), Orthanc as the PACS peer, the pipeline run in-process."""
