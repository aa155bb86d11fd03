"""The shared test kit: what the tests and the benchmarks in `bench/` both need to talk to real
peers on loopback (free ports, dcmtk's storescu and echoscu, private redis-server and Orthanc
processes). It imports only the standard library and the project's packages, never pytest, so
`bench/` can use it as it is."""
