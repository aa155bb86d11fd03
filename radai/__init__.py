"""radai's composition root: the `radai` command and the one settings object.

This package wires the others together (it may import all of them: `db`, `ml`, `dicom_node`,
`workers`, `dashboard`); nothing else imports it. Research software, not for clinical use.
"""

__version__ = "0.1.0"
