"""Formats: how coral-torch describes what it stores, defined once. Pure, no I/O.

- :mod:`.documents`: the canonical JSON encoding of remote documents and their checksum.
- :mod:`.objects`: the one description of a stored object (weight or delta) and its mapping to HDF5
  attributes and remote metadata documents; the payload checksum.

Every store and push/pull use these; a format change touches one module.
"""
