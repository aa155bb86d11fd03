"""The shared test kit: what the tests and the benchmarks in `bench/` both need to talk to real
peers on loopback (free ports, dcmtk's storescu and echoscu, private redis-server and Orthanc
processes). It imports the standard library and the project's packages; only `orthanc.py`
imports pytest (a missing Orthanc skips a test, or fails it under CI), and `bench/` uses the
other modules."""
