"""Fail when any two of radai's modules import each other, directly or through others (import
cycles, deferred imports inside functions included). import-linter checks the layers between
packages; this checks every module. Run by scripts/test.sh."""

from __future__ import annotations

import sys

import grimp

PACKAGES = ("ml", "db", "dicom_io", "dicom_node", "dicomweb", "workers", "dashboard", "radai")


def cycles() -> list[tuple[str, str]]:
    graph = grimp.build_graph(*PACKAGES)
    found = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(importer=imported, imported=module):
                found.add(tuple(sorted((module, imported))))
    return sorted(found)


if __name__ == "__main__":
    bad = cycles()
    for a, b in bad:
        print(f"import cycle: {a} <-> {b}")
    sys.exit(1 if bad else 0)
